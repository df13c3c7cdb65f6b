"""Each shipped model loads by name and repairs the error it is made for on a small case of its task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rnca_cli import load_model, refine_array
from rnca_cli.checkpoint import available_models
from rnca_cli.metrics import betti_errors, cldice, dice
from rnca_cli.perturb import parse_recipe
from rnca_cli.synth import make_case

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.float32) / 255.0


def test_every_model_card_names_a_shipped_model():
    card = (Path(__file__).resolve().parents[1] / "models" / "README.md").read_text()
    assert set(available_models()) <= {name for name in available_models() if f"`{name}.pt`" in card}


def test_rings_closes_the_bundled_broken_rings():
    """Three held-out rings, each broken: refined, every one is exactly one closed ring."""
    model = load_model("rings")
    for case in ("example_500", "example_503", "example_507"):
        coarse = gray(EXAMPLES / "rings/masks" / f"{case}.png") >= 0.5
        truth = gray(EXAMPLES / "rings/labels" / f"{case}.png") >= 0.5
        refined = refine_array(model, gray(EXAMPLES / "rings/images" / f"{case}.png"), coarse.astype(np.float32)) >= 0.5
        assert betti_errors(coarse, truth)["betti_err"] >= 1
        assert betti_errors(refined, truth)["betti_err"] == 0
        assert dice(refined, truth) > dice(coarse, truth) and dice(refined, truth) >= 0.97


@pytest.mark.parametrize("kind", ["blobs", "vessels"])
def test_default_leaves_correct_masks_of_other_kinds_alone(kind):
    """The default model runs on masks nobody checked: on correct generated blobs and vessels (the
    latter never in its training) it keeps the topology and changes under 3 % of the foreground."""
    model = load_model("rings")
    for k in range(4):
        case = make_case(kind, k, 64, 123, parse_recipe("holes:1"), 1.0)  # keep 1.0: the mask is the label
        truth = case.label.astype(bool)
        refined = refine_array(model, case.image, truth.astype(np.float32)) >= 0.5
        assert betti_errors(refined, truth)["betti_err"] == 0
        assert (refined != truth).sum() < 0.03 * truth.sum()


@pytest.mark.skipif("fill" not in available_models(), reason="the fill model is not shipped")
def test_fill_closes_holes_of_generated_organs():
    """Generated blobs with holes cut (the fill model's task): the holes go, Dice rises."""
    model = load_model("fill")
    gains = []
    for k in range(4):
        case = make_case("blobs", k, 64, 123, parse_recipe("holes:1:count=3"), 0.0)
        coarse = case.state >= 0.5
        refined = refine_array(model, case.image, coarse.astype(np.float32)) >= 0.5
        assert betti_errors(refined, case.label)["betti1_err"] <= betti_errors(coarse, case.label)["betti1_err"]
        gains.append(dice(refined, case.label) - dice(coarse, case.label))
    assert np.mean(gains) > 0.01


@pytest.mark.skipif("vessels" not in available_models(), reason="the vessels model is not shipped")
def test_vessels_joins_broken_generated_vessels():
    """Generated vessel trees with 5 px breaks, drawn dark on a fundus-like orange (the model reads
    colour fundus images): the automaton alone, without its clean-up, joins fragments and raises clDice."""
    model = load_model("vessels")
    coarse_b0, refined_b0, coarse_cl, refined_cl = [], [], [], []
    for k in range(6):
        case = make_case("vessels", k, 128, 5, parse_recipe("breaks:1:count=3:length=5"), 0.0)
        image = np.stack([0.8 * case.image + 0.2, 0.5 * case.image, 0.2 * case.image], axis=-1)
        coarse = case.state >= 0.5
        refined = refine_array(model, image, coarse.astype(np.float32)) >= 0.5
        coarse_b0.append(betti_errors(coarse, case.label)["betti0_err"])
        refined_b0.append(betti_errors(refined, case.label)["betti0_err"])
        coarse_cl.append(cldice(coarse, case.label))
        refined_cl.append(cldice(refined, case.label))
    assert sum(refined_b0) < 0.75 * sum(coarse_b0)
    assert np.mean(refined_cl) > np.mean(coarse_cl) + 0.02
