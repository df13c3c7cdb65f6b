"""Ensembles, clean-up and the do-no-harm guard (rnca_cli.guard), alone and through rnca refine."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from rnca_cli import guard as G
from rnca_cli.checkpoint import load_model, save_checkpoint
from rnca_cli.cli import app
from rnca_cli.options import MAX_SEED

from conftest import ring, tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LIMITS = G.GuardLimits()


def rnca(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def read_report(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


@pytest.mark.parametrize("min_size, kept_sizes", [(0, [1, 4, 9]), (1, [1, 4, 9]), (4, [4, 9]), (5, [9]), (10, [])])
def test_remove_small_drops_components_under_min_size(min_size, kept_sizes):
    mask = np.zeros((12, 12), bool)
    mask[0, 0] = True  # 1 px
    mask[4:6, 4:6] = True  # 4 px
    mask[8:11, 8:11] = True  # 9 px
    out = G.remove_small(mask, min_size)
    assert sorted(np.bincount(ndimage.label(out, np.ones((3, 3)))[0].ravel())[1:]) == kept_sizes
    assert not (out & ~mask).any()


def test_remove_small_counts_diagonal_neighbours_as_one_component():
    mask = np.eye(5, dtype=bool)  # 5 pixels touching at corners: one 8-connected component
    assert G.remove_small(mask, 5).sum() == 5


@pytest.mark.parametrize("a, b, expected", [
    (np.zeros(4, bool), np.zeros(4, bool), 1.0),  # both empty: they agree
    (np.array([1, 1, 0, 0], bool), np.array([1, 1, 0, 0], bool), 1.0),
    (np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool), 0.0),
    (np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool), 2 / 3),
])
def test_dice_table(a, b, expected):
    assert G.dice(a, b) == pytest.approx(expected)


def test_run_seeds_start_at_the_seed_and_stay_in_range():
    assert G.run_seed(7, 0) == 7
    assert len({G.run_seed(7, r) for r in range(8)}) == 8
    assert all(0 <= G.run_seed(MAX_SEED - 1, r) < MAX_SEED for r in range(8))


def test_identical_runs_are_trusted_with_zero_uncertainty():
    target = ring(32, 9, 3)
    coarse = ring(32, 9, 3, gap=True).astype(np.float32)
    probs = np.stack([target.astype(np.float32)] * 3)
    mean, mask, std, verdict = G.combine(probs, coarse, 0.5, 0, LIMITS, ensemble=3)
    assert verdict.refined and verdict.agreement == 1.0 and verdict.uncertainty == 0.0
    np.testing.assert_array_equal(mask, target)
    assert std.shape == target.shape and not std.any()


def test_growth_beyond_the_limit_keeps_the_input():
    coarse = ring(32, 9, 2).astype(np.float32)
    grown = np.ones((2, 32, 32), np.float32)  # the whole image claimed
    _, mask, _, verdict = G.combine(grown, coarse, 0.5, 0, LIMITS)
    assert verdict.kept.startswith("changed ") and "it grew by" in verdict.kept
    np.testing.assert_array_equal(mask, coarse >= 0.5)
    _, mask, _, verdict = G.combine(grown, coarse, 0.5, 0, G.GuardLimits(enabled=False))
    assert verdict.refined and mask.all()


def test_shrinking_beyond_the_limit_keeps_the_input():
    coarse = ring(32, 9, 3).astype(np.float32)
    _, _, _, verdict = G.combine(np.zeros((2, 32, 32), np.float32), coarse, 0.5, 0, LIMITS)
    assert verdict.kept.startswith("changed 100% of the foreground") and "it shrank by 100%" in verdict.kept


def test_a_mask_moved_elsewhere_is_kept_though_its_size_is_the_same():
    """Net growth 0, but every pixel moved: the changed share (added + removed) catches it."""
    coarse = np.zeros((32, 32), np.float32)
    coarse[4:10, 4:10] = 1
    moved = np.zeros((2, 32, 32), np.float32)
    moved[:, 20:26, 20:26] = 1
    _, mask, _, verdict = G.combine(moved, coarse, 0.5, 0, LIMITS)
    assert verdict.change == 0 and verdict.changed == 2.0 and verdict.kept.startswith("changed 200%")
    np.testing.assert_array_equal(mask, coarse >= 0.5)


def test_runs_that_disagree_keep_the_input():
    coarse = ring(32, 9, 3).astype(np.float32)
    left = coarse.copy()
    left[:, 16:] = 0
    right = coarse.copy()
    right[:, :16] = 0
    _, mask, _, verdict = G.combine(np.stack([left, right]), coarse, 0.5, 0, G.GuardLimits(max_change=10))
    assert verdict.kept.startswith("seeded runs disagree") and verdict.agreement < 0.9
    np.testing.assert_array_equal(mask, coarse >= 0.5)


def verdict(change: float, agreement: float) -> G.Verdict:
    return G.Verdict(100, int(100 * (1 + change)), change, abs(change), agreement, 0.0, "")


@pytest.mark.parametrize("verdicts, expected", [
    ([], {"guard_change": 0.5, "guard_agreement": 0.9}),  # nothing seen: the defaults
    ([verdict(0.1, 0.99), verdict(-0.2, 0.97)], {"guard_change": 0.5, "guard_agreement": 0.9}),
    ([verdict(0.6, 0.99), verdict(0.1, 0.9)], {"guard_change": 0.9, "guard_agreement": 0.85}),
    ([verdict(-0.8, 0.5)], {"guard_change": 1.2, "guard_agreement": 0.45}),
])
def test_calibrated_limits_trust_every_validation_case_with_a_margin(verdicts, expected):
    assert G.calibrated_limits(verdicts) == pytest.approx(expected)


def test_limits_come_from_the_options_then_the_model_then_the_defaults():
    stored = {"guard_change": 1.2, "guard_agreement": 0.8}
    assert G.limits_for({}, True, None, None) == G.DEFAULT_LIMITS
    assert G.limits_for(stored, True, None, None) == G.GuardLimits(True, 1.2, 0.8)
    assert G.limits_for(stored, False, 0.3, None) == G.GuardLimits(False, 0.3, 0.8)


def test_ensemble_mean_uses_the_first_runs_only():
    probs = np.stack([np.full((4, 4), v, np.float32) for v in (0.2, 0.6, 1.0)])
    mean, _, std, _ = G.combine(probs, np.zeros((4, 4), np.float32), 0.5, 0, G.GuardLimits(enabled=False), ensemble=2)
    assert mean == pytest.approx(np.full((4, 4), 0.4))
    assert std == pytest.approx(np.full((4, 4), np.std([0.2, 0.6, 1.0])))


# -- through rnca refine -------------------------------------------------------------------------


def test_guard_keeps_out_of_domain_cases_and_refines_in_domain_ones(tmp_path):
    """The shipped models on their own kind of mask are trusted; the fill model on rings, which it
    would fill in (growth of 400 % and more), is not, and those cases are written as given."""
    for model, kind, masks in (("rings", "rings", "masks"), ("fill", "synth-blobs", "states")):
        out = tmp_path / f"{model}-in"
        result = rnca("refine", "-i", EXAMPLES / kind / "images", "-m", EXAMPLES / kind / masks, "-o", out, "--model", model)
        assert result.exit_code == 0 and "guard:" not in result.output, result.output
        assert {row["status"] for row in read_report(out / "refine.csv").values()} == {"refined"}
    out = tmp_path / "fill-on-rings"
    result = rnca("refine", "-i", EXAMPLES / "rings/images", "-m", EXAMPLES / "rings/masks", "-o", out, "--model", "fill")
    assert result.exit_code == 0, result.output
    assert "guard: kept the input mask of 3 of 3 case(s)" in result.output
    report = read_report(out / "refine.csv")
    assert {row["status"] for row in report.values()} == {"kept"}
    for case, row in report.items():  # a kept case is its input mask
        written = np.asarray(Image.open(out / f"{case}.png")) > 127
        given = np.asarray(Image.open(EXAMPLES / "rings/masks" / f"{case}.png")) >= 128
        np.testing.assert_array_equal(written, given)
        assert row["reason"].startswith("changed ") and float(row["change"]) > 1 and float(row["changed"]) > 1
    unguarded = tmp_path / "unguarded"
    assert rnca("refine", "-i", EXAMPLES / "rings/images", "-m", EXAMPLES / "rings/masks", "-o", unguarded,
                "--model", "fill", "--no-guard", "-q").exit_code == 0
    assert {row["status"] for row in read_report(unguarded / "refine.csv").values()} == {"refined"}


def test_ensemble_writes_mean_and_uncertainty_maps(tmp_path):
    out, spread = tmp_path / "out", tmp_path / "spread"
    result = rnca("refine", "-i", EXAMPLES / "rings/images", "-m", EXAMPLES / "rings/masks", "-o", out,
                  "--ensemble", 4, "--save-uncertainty", spread, "--save-prob", "-q")
    assert result.exit_code == 0, result.output
    report = read_report(out / "refine.csv")
    for case in ("example_500", "example_503", "example_507"):
        mask = np.asarray(Image.open(EXAMPLES / "rings/masks" / f"{case}.png"))
        for folder in (out, out / "prob", spread):
            assert np.asarray(Image.open(folder / f"{case}.png")).shape == mask.shape
        assert float(report[case]["uncertainty"]) > 0
    assert np.asarray(Image.open(spread / "example_507.png")).max() > 0


def test_uncertainty_is_zero_at_fire_rate_zero(tmp_path):
    still = save_checkpoint(tmp_path / "still.pt", tiny_model(fire_rate=0.0))
    out = tmp_path / "out"
    result = rnca("refine", "-i", EXAMPLES / "rings/images", "-m", EXAMPLES / "rings/masks", "-o", out,
                  "--model", still, "--ensemble", 3, "--save-uncertainty", tmp_path / "spread", "-q")
    assert result.exit_code == 0, result.output
    assert {float(row["uncertainty"]) for row in read_report(out / "refine.csv").values()} == {0.0}
    assert not np.asarray(Image.open(tmp_path / "spread/example_500.png")).any()


def test_save_uncertainty_needs_an_ensemble(tmp_path):
    result = rnca("refine", "-i", EXAMPLES / "rings/images", "-m", EXAMPLES / "rings/masks", "-o", tmp_path / "o",
                  "--save-uncertainty", tmp_path / "s")
    assert result.exit_code == 2 and "--ensemble 2 or more" in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_a_model_carries_its_min_size_and_refine_can_override_it(tmp_path):
    carried = save_checkpoint(tmp_path / "clean.pt", tiny_model(), refine={"min_size": 10_000})
    assert load_model(carried).refine_defaults == {"min_size": 10_000}
    out = tmp_path / "out"
    args = ["-i", EXAMPLES / "rings/images/example_500.png", "-m", EXAMPLES / "rings/masks/example_500.png",
            "--model", carried, "--no-guard", "-q"]
    assert rnca("refine", *args, "-o", out / "default.png").exit_code == 0
    assert not np.asarray(Image.open(out / "default.png")).any()  # every component is under 10000 px
    assert rnca("refine", *args, "-o", out / "off.png", "--min-size", 0).exit_code == 0
    assert np.asarray(Image.open(out / "off.png")).any()


@pytest.mark.parametrize("bad", [{"min_size": -1}, {"min_size": 2.5}, {"guard_change": "x"}, {"guard_change": 0},
                                 {"guard_agreement": 1.5}, {"guard_change": float("inf")}, "not a dict"])
def test_a_checkpoint_with_invalid_refine_defaults_is_refused_with_one_line(tmp_path, bad):
    import torch

    path = save_checkpoint(tmp_path / "m.pt", tiny_model())
    payload = torch.load(path, weights_only=True)
    payload["refine"] = bad
    torch.save(payload, path)
    result = rnca("refine", "-i", EXAMPLES / "rings/images/example_500.png", "-m", EXAMPLES / "rings/masks/example_500.png",
                  "-o", tmp_path / "out.png", "--model", path)
    assert result.exit_code == 1 and "refine defaults" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out.png").exists()
