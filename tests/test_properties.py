"""Property-based tests (hypothesis): I/O round trips over random shapes, dtypes, spacings and
affines, and the invariants of the perturb operators on random masks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from rnca_cli import io
from rnca_cli import perturb as P

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def binary_masks(draw, ndim=2, low=6, high=28):
    """A random mask of random shape: a few random rectangles (may be empty)."""
    shape = tuple(draw(st.integers(low, high)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for _ in range(draw(st.integers(0, 4))):
        lo = [int(rng.integers(0, n)) for n in shape]
        hi = [min(n, a + int(rng.integers(1, max(2, n // 2)))) for a, n in zip(lo, shape)]
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


@st.composite
def affines(draw):
    """A random NIfTI affine: positive spacings, a rotation about z, an offset."""
    zooms = [draw(st.floats(0.25, 4.0)) for _ in range(3)]
    angle = draw(st.floats(-np.pi, np.pi))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = [draw(st.floats(-200, 200)) for _ in range(3)]
    return affine


@SETTINGS
@given(binary_masks(ndim=3, low=2, high=12), affines(), st.sampled_from([np.uint8, np.int16, np.float32]),
       st.sampled_from([".nii", ".nii.gz"]))
def test_nifti_masks_round_trip_with_their_geometry(mask, affine, dtype, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"in{suffix}"
        nib.save(nib.Nifti1Image(mask.astype(dtype), affine), str(source))
        loaded = io.read_mask(source)
        np.testing.assert_array_equal(loaded.data >= 0.5, mask)
        target = io.write_mask(Path(tmp) / f"out{suffix}", loaded.data >= 0.5, loaded)
        again = io.read_mask(target)
        np.testing.assert_array_equal(again.data >= 0.5, mask)
        np.testing.assert_allclose(again.meta["affine"], loaded.meta["affine"], atol=1e-5)
        np.testing.assert_allclose(again.spacing, loaded.spacing, rtol=1e-5)


@SETTINGS
@given(binary_masks(ndim=2, low=1, high=40), st.sampled_from([".png", ".tif"]))
def test_2d_masks_round_trip_exactly(mask, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"in{suffix}"
        from PIL import Image

        Image.fromarray(mask.astype(np.uint8) * 255).save(source)
        loaded = io.read_mask(source)
        target = io.write_mask(Path(tmp) / f"out{suffix}", loaded.data >= 0.5, loaded)
        np.testing.assert_array_equal(io.read_mask(target).data >= 0.5, mask)
        assert io.peek_shape(target) == mask.shape


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_soft_masks_round_trip_to_within_one_grey_level(h, w, seed):
    prob = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        Image.fromarray(np.zeros((h, w), np.uint8)).save(Path(tmp) / "ref.png")
        like = io.read_mask(Path(tmp) / "ref.png")
        back = io.read_image(io.write_mask(Path(tmp) / "p.png", prob, like, soft=True)).data[..., 0]
        assert np.abs(back - prob).max() <= 0.5 / 255 + 1e-6  # stored as 0..255 grey levels


SHRINKING = ["erode", "open", "thin", "holes", "breaks", "drop"]
GROWING = ["dilate", "close"]


@SETTINGS
@given(binary_masks(), st.sampled_from(sorted(P.OPERATORS)), st.integers(0, 2**32 - 1))
def test_every_operator_keeps_shape_is_seeded_and_moves_the_right_way(mask, name, seed):
    out = P.apply(name, mask, np.random.default_rng(seed))
    again = P.apply(name, mask, np.random.default_rng(seed))
    assert out.shape == mask.shape
    np.testing.assert_array_equal(out, again)  # the same seed, the same corruption
    if name in SHRINKING:
        assert not (out & ~mask).any()
    if name in GROWING:
        assert not (mask & ~out).any()
    if name == "soften":
        assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


@SETTINGS
@given(binary_masks(), st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_specks_never_touch_the_object_nor_change_it(mask, count, seed):
    out = P.apply("specks", mask, np.random.default_rng(seed), count=count)
    assert (out & mask).sum() == mask.sum()  # the object is kept
    added = out & ~mask
    if added.any() and mask.any():
        near = ndimage.binary_dilation(mask, np.ones((3, 3), bool))
        assert not (added & near).any()  # no speck touches the object
    labels, n = ndimage.label(added, np.ones((3, 3)))
    assert n <= count


@SETTINGS
@given(binary_masks(), st.floats(0, 3), st.integers(0, 2**32 - 1))
def test_density_counts_have_the_expected_mean(mask, density, seed):
    from skimage.morphology import skeletonize

    counts = [P.centreline_count(mask, density, np.random.default_rng([seed, k])) for k in range(50)]
    expected = density * skeletonize(np.pad(mask, 1)).sum() / 100
    assert min(counts) >= int(np.floor(expected)) and max(counts) <= int(np.floor(expected)) + 1
