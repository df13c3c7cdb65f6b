"""Metric functions: tables of hand-computed cases and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rnca_cli import metrics as M

from conftest import ring


def square(shape=(10, 10), top=2, left=2, size=4):
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def cube(n=8, lo=2, size=4, shift=0):
    m = np.zeros((n, n, n), bool)
    m[lo : lo + size, lo : lo + size, lo + shift : lo + size + shift] = True
    return m


def hollow_cube():
    m = np.zeros((7, 7, 7), bool)
    m[1:6, 1:6, 1:6] = True
    m[3, 3, 3] = False
    return m


def two_blobs():
    m = np.zeros((10, 12), bool)
    m[2:5, 2:5] = m[2:5, 7:10] = True
    return m


def one_blob():
    m = np.zeros((10, 12), bool)
    m[2:5, 2:10] = True
    return m


def line(length):
    m = np.zeros((5, 14), bool)
    m[2, 2 : 2 + length] = True
    return m


# (name, pred, gt, spacing, expected values)
CASES = [
    ("identical square", square(), square(), None,
     dict(dice=1, cldice=1, precision=1, recall=1, betti0_err=0, betti1_err=0, hd=0, hd95=0, assd=0)),
    ("disjoint squares", square(left=0, size=3), square(left=6, size=3), None,
     dict(dice=0, cldice=0, precision=0, recall=0, betti0_err=0)),
    # 4x4 squares one column apart: overlap 12; 6 of 12 surface pixels at distance 1 each way.
    ("shifted square", square(left=3), square(left=2), None,
     dict(dice=0.75, precision=0.75, recall=0.75, hd=1, hd95=1, assd=0.5)),
    # Same shift along axis 1 with spacing 2 on that axis (computed by hand: 10 + 10 over 24 distances).
    ("shifted square, anisotropic", square(left=3), square(left=2), (1.0, 2.0),
     dict(dice=0.75, hd=2, hd95=2, assd=20 / 24)),
    # The spacing of the other axis does not stretch a shift along axis 1.
    ("shifted square, other axis stretched", square(left=3), square(left=2), (3.0, 1.0),
     dict(hd=1, hd95=1, assd=0.5)),
    ("ring vs broken ring", ring(gap=True), ring(), None, dict(betti0_err=0, betti1_err=1, betti_err=1)),
    ("two blobs vs one", two_blobs(), one_blob(), None, dict(betti0_err=1, betti1_err=0, betti_err=1)),
    # Half a line: its skeleton lies in the truth (Tprec 1), it covers half the truth's (Tsens 0.5).
    ("half line", line(5), line(10), None, dict(cldice=2 * 0.5 / 1.5, precision=1, recall=0.5)),
    ("hollow cube vs solid", hollow_cube(), cube(7, 1, 5), None,
     dict(betti0_err=0, betti1_err=0, betti2_err=1, betti_err=1)),
    ("shifted cube", cube(shift=1), cube(), None, dict(dice=0.75, hd=1, hd95=1)),
    ("shifted cube, anisotropic", cube(shift=1), cube(), (1.0, 1.0, 2.5), dict(hd=2.5, hd95=2.5)),
    ("both empty", np.zeros((6, 6)), np.zeros((6, 6)), None,
     dict(status="both empty", dice=1, cldice=1, precision=1, recall=1, betti_err=0, hd=0, hd95=0, assd=0)),
    ("prediction empty", np.zeros((6, 6)), square((6, 6), 1, 1, 3), None,
     dict(status="pred empty", dice=0, cldice=0, precision=math.nan, recall=0, betti0_err=1, betti1_err=0,
          hd=math.nan, hd95=math.nan, assd=math.nan)),
    ("truth empty", square((6, 6), 1, 1, 3), np.zeros((6, 6)), None,
     dict(status="gt empty", dice=0, cldice=0, precision=0, recall=math.nan, hd=math.nan)),
]


@pytest.mark.parametrize("name, pred, gt, spacing, expected", CASES, ids=[c[0] for c in CASES])
def test_known_values(name, pred, gt, spacing, expected):
    row = M.case_metrics(pred, gt, spacing)
    for key, value in expected.items():
        if isinstance(value, str):
            assert row[key] == value
        elif math.isnan(value):
            assert math.isnan(row[key]), key
        else:
            assert row[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize(
    "mask, betti",
    [
        (np.zeros((5, 5)), (0, 0)),
        (ring(), (1, 1)),
        (ring(gap=True), (1, 0)),
        (two_blobs(), (2, 0)),
        (np.ones((6, 6)), (1, 0)),  # touches the border: padding keeps it a blob, not a hole
        (hollow_cube(), (1, 0, 1)),
        (cube(), (1, 0, 0)),
    ],
)
def test_betti_numbers(mask, betti):
    assert M.betti_numbers(mask) == betti


def test_betti_of_a_solid_torus_and_diagonal_connectivity():
    torus = np.zeros((9, 9, 5), bool)
    torus[1:8, 1:8, 1:4] = True
    torus[3:6, 3:6, :] = False
    assert M.betti_numbers(torus) == (1, 1, 0)
    diagonal = np.eye(4, dtype=bool)  # 8-connected foreground: one component
    assert M.betti_numbers(diagonal) == (1, 0)
    # a diamond of 4 pixels enclosing one: the hole is 4-connected background, so it counts
    diamond = np.zeros((5, 5), bool)
    diamond[1, 2] = diamond[2, 1] = diamond[2, 3] = diamond[3, 2] = True
    assert M.betti_numbers(diamond) == (1, 1)


def test_surface_is_the_face_boundary_and_ignores_the_image_border():
    full = np.ones((4, 4), bool)
    s = M.surface(full)
    assert s.sum() == 12 and not s[1:3, 1:3].any()


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        M.dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="unknown metrics"):
        M.case_metrics(np.zeros((3, 3)), np.zeros((3, 3)), which=["iou"])


masks = arrays(bool, st.tuples(st.integers(3, 9), st.integers(3, 9)))


@settings(max_examples=60, deadline=None)
@given(masks, st.data())
def test_invariants(pred, data):
    gt = data.draw(arrays(bool, pred.shape))
    for a, b in ((pred, gt), (gt, pred)):
        assert 0 <= M.dice(a, b) <= 1 and 0 <= M.cldice(a, b) <= 1
    assert M.dice(pred, gt) == pytest.approx(M.dice(gt, pred))
    assert M.cldice(pred, gt) == pytest.approx(M.cldice(gt, pred))
    d = M.distances(pred, gt)
    if pred.any() and gt.any():
        assert d["hd"] >= d["hd95"] - 1e-12 and d["hd95"] >= 0 and d["hd"] >= d["assd"] >= 0
        assert d == pytest.approx(M.distances(gt, pred))
    for mask in (pred, gt):
        self_row = M.case_metrics(mask, mask)
        assert self_row["dice"] == 1 and self_row["cldice"] == 1 and self_row["betti_err"] == 0
        assert self_row["hd"] == self_row["hd95"] == self_row["assd"] == 0


@settings(max_examples=20, deadline=None)
@given(arrays(bool, (5, 6, 4)), arrays(bool, (5, 6, 4)))
def test_invariants_3d(pred, gt):
    assert 0 <= M.dice(pred, gt) <= 1 and 0 <= M.cldice(pred, gt) <= 1
    if pred.any() and gt.any():
        d = M.distances(pred, gt, (0.5, 1.0, 2.0))
        assert d["hd"] >= d["hd95"] >= 0
    assert M.betti_errors(pred, pred)["betti_err"] == 0
