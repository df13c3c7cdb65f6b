"""Synthetic datasets and the synth command."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from rnca_cli import perturb, synth
from rnca_cli.cli import app
from rnca_cli.io import list_files, read_image, read_mask
from rnca_cli.metrics import betti_numbers, dice


@pytest.mark.parametrize("kind", synth.KINDS)
def test_cases_are_deterministic_and_carry_image_evidence(kind):
    steps = perturb.parse_recipe(synth.DEFAULT_RECIPES[kind])
    a = synth.make_case(kind, 3, 64, 0, steps, 0.0)
    b = synth.make_case(kind, 3, 64, 0, steps, 0.0)
    c = synth.make_case(kind, 4, 64, 0, steps, 0.0)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.state, b.state)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and 0 <= a.image.min() and a.image.max() <= 1
    assert a.label.any() and a.ops
    # the structure differs from the background in the image
    inside, outside = a.image[a.label].mean(), a.image[~a.label].mean()
    assert abs(inside - outside) > 0.05


def test_rings_are_whole_rings_and_blobs_have_no_holes():
    steps = perturb.parse_recipe("erode:0")
    for k in range(5):
        assert betti_numbers(synth.make_case("rings", k, 64, 0, steps, 1.0).label) == (1, 1)
        assert betti_numbers(synth.make_case("blobs", k, 64, 0, steps, 1.0).label) == (1, 0)


def test_coarse_masks_are_corrupted_but_close():
    steps = perturb.parse_recipe(synth.DEFAULT_RECIPES["rings"])
    scores = [dice(c.state, c.label) for c in (synth.make_case("rings", k, 64, 1, steps, 0.0) for k in range(6))]
    assert all(0.5 < s < 1.0 for s in scores)


def test_cli_synth_writes_matching_triples_and_preview(tmp_path):
    result = CliRunner().invoke(app, ["synth", "--kind", "vessels", "--n", "3", "--size", "48", "--out",
                                      str(tmp_path / "ds"), "--preview", "--seed", "2"])
    assert result.exit_code == 0, result.output
    names = [[p.name for p in list_files(tmp_path / "ds" / sub)] for sub in ("images", "labels", "states")]
    assert names[0] == names[1] == names[2] == ["vessels_0000.png", "vessels_0001.png", "vessels_0002.png"]
    assert read_image(tmp_path / "ds" / "images" / "vessels_0000.png").data.shape == (48, 48, 1)
    assert read_mask(tmp_path / "ds" / "labels" / "vessels_0000.png").data.shape == (48, 48)
    assert (tmp_path / "ds" / "preview.png").exists() and (tmp_path / "ds" / "manifest.csv").exists()
    again = CliRunner().invoke(app, ["synth", "--kind", "vessels", "--n", "3", "--out", str(tmp_path / "ds")])
    assert again.exit_code == 1 and "already holds a dataset" in again.output


def test_cli_synth_bad_kind():
    result = CliRunner().invoke(app, ["synth", "--kind", "trees", "--n", "1", "--out", "unused"])
    assert result.exit_code == 2 and "unknown kind 'trees'; valid: vessels, rings, blobs" in result.output
