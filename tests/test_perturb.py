"""Corruption operators and recipes, 2D and 3D, and the perturb command."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from rnca_cli import perturb as P
from rnca_cli.cli import app
from rnca_cli.metrics import betti_numbers

from conftest import ring, write_nifti, write_png

ZERO = {"erode": {"radius": 0}, "dilate": {"radius": 0}, "open": {"radius": 0}, "close": {"radius": 0},
        "thin": {"fraction": 0}, "holes": {"count": 0}, "breaks": {"count": 0}, "specks": {"count": 0},
        "drop": {"fraction": 0}, "jitter": {"amplitude": 0}, "soften": {"sigma": 0}}


def blob2d():
    yy, xx = np.mgrid[:40, :40]
    return (yy - 20) ** 2 / 12**2 + (xx - 20) ** 2 / 9**2 <= 1


def blob3d():
    zz, yy, xx = np.mgrid[:24, :24, :24]
    return (zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 8**2


def tree2d():
    m = np.zeros((40, 40), bool)
    m[5:35, 18:22] = True  # trunk, 4 px: survives an opening of radius 1
    m[12, 6:18] = m[25, 22:35] = True  # one-pixel branches: thin
    return m


def tube3d():
    m = np.zeros((16, 16, 30), bool)
    m[6:10, 6:10, 2:28] = True
    return m


MASKS = {"2d": blob2d(), "3d": blob3d()}


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("name", sorted(P.OPERATORS))
def test_every_operator_keeps_shape_and_type_and_zero_is_identity(name, dims):
    mask = MASKS[dims]
    out = P.apply(name, mask, np.random.default_rng(0))
    assert out.shape == mask.shape
    if name == "soften":
        assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    else:
        assert out.dtype == np.bool_
    identity = P.apply(name, mask, np.random.default_rng(0), **ZERO[name])
    np.testing.assert_array_equal(identity, mask)


@pytest.mark.parametrize("mask", [blob2d(), blob3d(), tree2d()], ids=["2d", "3d", "tree"])
def test_erode_never_adds_and_dilate_never_removes(mask):
    rng = np.random.default_rng(0)
    for radius in (1, 2):
        assert not (P.apply("erode", mask, rng, radius=radius) & ~mask).any()
        assert not (mask & ~P.apply("dilate", mask, rng, radius=radius)).any()
        assert not (P.apply("open", mask, rng, radius=radius) & ~mask).any()
        assert not (mask & ~P.apply("close", mask, rng, radius=radius)).any()


def comb(teeth: int) -> np.ndarray:
    """A comb: a spine with ``teeth`` 1-px teeth, 30 px each, 4 px apart (centreline grows with teeth)."""
    m = np.zeros((40, 8 + 4 * teeth), bool)
    m[2, 2 : 4 * teeth + 2] = True
    for k in range(teeth):
        m[2:34, 2 + 4 * k] = True
    return m


@pytest.mark.parametrize("teeth", [2, 20])
def test_density_scales_the_count_with_the_centreline(teeth):
    """Density is per 100 px of skeleton: the expected count follows the object, not the image."""
    from skimage.morphology import skeletonize

    mask = comb(teeth)
    length = skeletonize(mask).sum()
    counts = [P.centreline_count(mask, 2.0, np.random.default_rng(s)) for s in range(400)]
    assert np.mean(counts) == pytest.approx(2.0 * length / 100, rel=0.1)
    assert set(counts) <= {int(2.0 * length / 100), int(2.0 * length / 100) + 1}


def test_breaks_density_cuts_a_long_structure_more_often():
    short, long = comb(2), comb(20)
    fragments = {}
    for name, mask in (("short", short), ("long", long)):
        fragments[name] = np.mean([betti_numbers(P.apply("breaks", mask, np.random.default_rng(s), density=1.0, length=3))[0]
                                   - betti_numbers(mask)[0] for s in range(6)])
    assert fragments["short"] <= 1.5 and fragments["long"] >= 4


def test_specks_density_follows_the_object():
    few = betti_numbers(P.apply("specks", comb(2), np.random.default_rng(0), density=2.0))[0]
    many = betti_numbers(P.apply("specks", comb(20), np.random.default_rng(0), density=2.0))[0]
    assert few <= 3 and many >= 10


def test_count_and_density_together_are_refused():
    with pytest.raises(P.PerturbError, match="count or density"):
        P.parse_recipe("breaks:1:count=2:density=0.5")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mask", [ring(48, 15, 4), tree2d(), tube3d()], ids=["ring", "tree", "tube3d"])
def test_breaks_raise_beta0(mask, seed):
    out = P.apply("breaks", mask, np.random.default_rng(seed), count=2, length=4)
    assert betti_numbers(out)[0] > betti_numbers(mask)[0]
    assert not (out & ~mask).any()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mask", [blob2d(), blob3d()], ids=["2d", "3d"])
def test_holes_raise_beta1_or_beta2_of_a_blob(mask, seed):
    out = P.apply("holes", mask, np.random.default_rng(seed), count=1, size=0.3)
    # a cut away from the border makes a hole (2D beta1) or a cavity (3D beta2); one that reaches
    # the border is a bite; over seeds, holes must appear
    before, after = betti_numbers(mask), betti_numbers(out)
    assert out.sum() < mask.sum() and not (out & ~mask).any()
    assert after[-1] >= before[-1]


def test_holes_make_holes():
    made = [betti_numbers(P.apply("holes", blob2d(), np.random.default_rng(s), count=2, size=0.25))[1]
            for s in range(10)]
    assert sum(made) > 0


@pytest.mark.parametrize("mask", [blob2d(), blob3d()], ids=["2d", "3d"])
def test_specks_raise_beta0(mask):
    out = P.apply("specks", mask, np.random.default_rng(0), count=3)
    assert betti_numbers(out)[0] == betti_numbers(mask)[0] + 3
    assert not (mask & ~out).any()


def test_drop_removes_components_but_keeps_one():
    mask = P.apply("specks", blob2d(), np.random.default_rng(1), count=4)
    out = P.apply("drop", mask, np.random.default_rng(0), fraction=0.5)
    assert betti_numbers(out)[0] == 5 - 2 and not (out & ~mask).any()
    assert P.apply("drop", mask, np.random.default_rng(0), fraction=1.0).any()


def test_thin_removes_only_thin_structure():
    out = P.apply("thin", tree2d(), np.random.default_rng(0), fraction=1.0, radius=1)
    np.testing.assert_array_equal(out, tree2d() & _thick(tree2d()))  # everything thin gone, the rest kept
    half = P.apply("thin", tree2d(), np.random.default_rng(0), fraction=0.5, radius=1)
    assert (tree2d() & _thick(tree2d())).sum() < half.sum() < tree2d().sum()


def _thick(mask):
    from scipy import ndimage

    return ndimage.binary_opening(np.pad(mask, 1), np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool))[1:-1, 1:-1]


def test_jitter_moves_the_contour_a_little():
    mask = blob2d()
    out = P.apply("jitter", mask, np.random.default_rng(0), amplitude=1.5)
    changed = (out ^ mask).sum()
    assert 0 < changed < 0.25 * mask.sum()
    assert betti_numbers(out) == (1, 0)


def test_recipe_parsing_and_seeds():
    steps = P.parse_recipe("soften:0.1,breaks:0.5:count=3,holes:1")
    assert [s.name for s in steps] == ["breaks", "holes", "soften"]
    assert steps[0].params == {"count": 3, "length": 4.0, "density": 0.0}
    mask = blob2d()
    a = P.apply_recipe(mask, steps, np.random.default_rng(3))
    b = P.apply_recipe(mask, steps, np.random.default_rng(3))
    c = P.apply_recipe(mask, steps, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    kept, ops = P.apply_recipe(mask, steps, np.random.default_rng(0), keep=1.0)
    assert ops == [] and np.array_equal(kept, mask)


def test_every_output_not_kept_is_corrupted():
    steps = P.parse_recipe("breaks:0.01,holes:0.01")
    for seed in range(20):
        out, ops = P.apply_recipe(blob2d(), steps, np.random.default_rng(seed))
        assert len(ops) >= 1


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("bogus:0.5", "unknown operator 'bogus'; valid: erode, dilate"),
        ("erode:1.5", "probability 1.5 outside"),
        ("erode:0.5:radius=-1", "radius='-1' out of range"),
        ("holes:0.5:count=2.5", "count='2.5' out of range; expected int"),
        ("holes:0.5:width=2", "unknown parameter(s) width"),
        ("", "empty recipe"),
    ],
)
def test_bad_recipes_are_refused(recipe, message):
    with pytest.raises(P.PerturbError) as info:
        P.parse_recipe(recipe)
    assert message in str(info.value)


# -- files and CLI --------------------------------------------------------------------------------

runner = CliRunner()


def labels_folder(root):
    for k in range(3):
        write_png(root / "labels" / f"c{k}.png", ring(32, 9, 3).astype(np.uint8) * 255)
    return root / "labels"


def test_cli_perturb_writes_n_per_case_and_a_manifest(tmp_path):
    labels = labels_folder(tmp_path)
    result = runner.invoke(app, ["perturb", "--labels", str(labels), "--out", str(tmp_path / "out"), "--n", "2",
                                 "--ops", "breaks:0.6,specks:0.5", "--keep", "0.2", "--seed", "7"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["c0_0.png", "c0_1.png", "c1_0.png", "c1_1.png", "c2_0.png", "c2_1.png", "manifest.csv"]
    with open(tmp_path / "out" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["output"] == "c0_0.png" and rows[0]["case"] == "c0"
    again = runner.invoke(app, ["perturb", "--labels", str(labels), "--out", str(tmp_path / "again"), "--n", "2",
                                "--ops", "breaks:0.6,specks:0.5", "--keep", "0.2", "--seed", "7"])
    assert again.exit_code == 0
    for name in files:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_perturb_nifti_keeps_geometry(tmp_path):
    volume = np.zeros((20, 20, 6), np.uint8)
    volume[4:16, 4:16, 1:5] = 1
    write_nifti(tmp_path / "labels" / "v.nii.gz", volume)
    P.perturb_folder(tmp_path / "labels", tmp_path / "out", 1, "holes:1", seed=0)
    out = nib.load(str(tmp_path / "out" / "v_0.nii.gz"))
    src = nib.load(str(tmp_path / "labels" / "v.nii.gz"))
    np.testing.assert_allclose(out.affine, src.affine)
    assert out.shape == src.shape and np.asarray(out.dataobj).sum() < volume.sum()


@pytest.mark.parametrize("case", ["soft", "labels", "bad_op", "range"])
def test_cli_perturb_bad_input_writes_nothing(tmp_path, case):
    labels = labels_folder(tmp_path)
    ops = "breaks:0.5"
    if case == "soft":
        write_png(labels / "c1.png", (np.arange(32 * 32).reshape(32, 32) % 200 + 50).astype(np.uint8))
        expected = "c1.png: label is not binary"
    elif case == "labels":
        write_png(labels / "c2.png", (np.arange(32 * 32).reshape(32, 32) % 3).astype(np.uint8))
        expected = "c2.png: mask holds several labels"
    elif case == "bad_op":
        ops, expected = "breaks:0.5,smudge:0.2", "unknown operator 'smudge'; valid: erode"
    else:
        ops, expected = "erode:0.5:radius=99", "radius='99' out of range"
    result = runner.invoke(app, ["perturb", "--labels", str(labels), "--out", str(tmp_path / "out"), "--ops", ops])
    assert result.exit_code == (2 if case in ("bad_op", "range") else 1)  # a bad recipe is a usage error
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
