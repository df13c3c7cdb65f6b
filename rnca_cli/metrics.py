"""Metric functions on binary numpy masks, 2D or 3D. Pure: no I/O, no state.

Inputs are arrays of equal shape where nonzero means foreground (binarise soft masks first; see
``rnca_cli.evaluate``). ``spacing`` is the voxel size per axis (default 1). The conventions are
chosen to agree with MONAI, MetricsReloaded and the clDice authors' code:

* every mask is padded by one background voxel before surfaces, skeletons and components are
  computed, so the image border is never a surface and never closes a hole;
* foreground connectivity is 8 (2D) / 26 (3D), background 4 / 6;
* empty masks: overlap scores are 1 when both are empty and 0 when exactly one is; distances are 0
  when both are empty and NaN when exactly one is (:func:`status` names which).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

OVERLAP = ("dice", "cldice", "precision", "recall")
DISTANCES = ("hd", "hd95", "assd")
HIGHER_IS_BETTER = {"dice", "cldice", "precision", "recall"}


def _binary(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask) != 0
    if m.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D mask, got shape {m.shape}")
    return m


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _binary(pred), _binary(gt)
    if p.shape != g.shape:
        raise ValueError(f"shapes differ: prediction {p.shape}, ground truth {g.shape}")
    return p, g


def status(pred: np.ndarray, gt: np.ndarray) -> str:
    """'ok', 'both empty', 'pred empty' or 'gt empty'."""
    p_any, g_any = bool(np.any(pred)), bool(np.any(gt))
    if p_any and g_any:
        return "ok"
    return "both empty" if not (p_any or g_any) else ("pred empty" if g_any else "gt empty")


# -- overlap -------------------------------------------------------------------------------------


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|P & G| / (|P| + |G|). Both empty: 1. Exactly one empty: 0."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P & G| / |P|. Both empty: 1. Empty prediction, non-empty truth: 0/0 = NaN."""
    p, g = _pair(pred, gt)
    n = int(p.sum())
    if n == 0:
        return 1.0 if not g.any() else math.nan
    return int(np.logical_and(p, g).sum()) / n


def recall(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P & G| / |G|. Both empty: 1. Empty truth, non-empty prediction: 0/0 = NaN."""
    p, g = _pair(pred, gt)
    n = int(g.sum())
    if n == 0:
        return 1.0 if not p.any() else math.nan
    return int(np.logical_and(p, g).sum()) / n


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Skeleton by scikit-image ``skeletonize`` (Zhang in 2D, Lee in 3D) of the padded mask."""
    from skimage.morphology import skeletonize

    m = np.pad(_binary(mask), 1)
    return skeletonize(m)[(slice(1, -1),) * m.ndim].astype(bool)


def cldice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Centreline Dice = 2 Tprec Tsens / (Tprec + Tsens).

    Tprec = |S(P) & G| / |S(P)|, Tsens = |S(G) & P| / |S(G)|, S = :func:`skeleton`.
    Both empty: 1. Exactly one empty (or Tprec + Tsens = 0): 0.
    """
    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    sp, sg = skeleton(p), skeleton(g)
    tprec = np.logical_and(sp, g).sum() / max(int(sp.sum()), 1)
    tsens = np.logical_and(sg, p).sum() / max(int(sg.sum()), 1)
    return 0.0 if tprec + tsens == 0 else float(2 * tprec * tsens / (tprec + tsens))


# -- topology ------------------------------------------------------------------------------------


def betti_numbers(mask: np.ndarray) -> tuple[int, ...]:
    """Betti numbers: (β0, β1) in 2D, (β0, β1, β2) in 3D.

    β0 = foreground components (8/26-connected); β2 = background components (4/6-connected) not
    connected to the padded border, i.e. enclosed cavities; β1 = β0 + β2 - χ with χ the Euler
    characteristic (scikit-image ``euler_number``, foreground connectivity 8/26). An empty mask
    gives all zeros.
    """
    from skimage.measure import euler_number

    m = np.pad(_binary(mask), 1)
    full = np.ones((3,) * m.ndim, bool)
    beta0 = int(ndimage.label(m, structure=full)[1])
    chi = int(euler_number(m, connectivity=m.ndim))
    if m.ndim == 2:
        return beta0, beta0 - chi
    n_background = ndimage.label(~m, structure=ndimage.generate_binary_structure(3, 1))[1]
    beta2 = n_background - 1  # the component touching the padded border is the outside
    return beta0, beta0 + beta2 - chi, beta2


def betti_errors(pred: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    """|Δβk| per k as ``betti{k}_err`` plus their sum ``betti_err``."""
    p, g = _pair(pred, gt)
    errors = {f"betti{k}_err": abs(a - b) for k, (a, b) in enumerate(zip(betti_numbers(p), betti_numbers(g)))}
    errors["betti_err"] = sum(errors.values())
    return errors


# -- surface distances ---------------------------------------------------------------------------


def surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face-neighbour in the background (of the padded mask)."""
    m = _binary(mask)
    padded = np.pad(m, 1)
    eroded = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(m.ndim, 1))
    return (padded & ~eroded)[(slice(1, -1),) * m.ndim]


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (pred surface -> nearest gt surface, gt surface -> nearest pred surface).

    Euclidean between voxel centres, scaled by ``spacing``. Both masks must be non-empty. Work is
    cropped to the bounding box of both masks (exact: every surface voxel lies inside it).
    """
    p, g = _pair(pred, gt)
    spacing = tuple(float(s) for s in (spacing or (1.0,) * p.ndim))
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {spacing} does not match a {p.ndim}D mask")
    if not p.any() or not g.any():
        raise ValueError("surface distances need two non-empty masks")
    both = np.argwhere(p | g)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(both.min(0), both.max(0)))
    sp, sg = surface(p[box]), surface(g[box])
    to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_g[sp], to_p[sg]


def distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> dict[str, float]:
    """HD, HD95 and ASSD in spacing units.

    HD = max of the two directed maxima; HD95 = max of the two directed 95th percentiles (linear
    interpolation); ASSD = mean of all surface distances of both directions pooled.
    Both empty: 0. Exactly one empty: NaN.
    """
    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return {"hd": 0.0, "hd95": 0.0, "assd": 0.0}
    if not p.any() or not g.any():
        return {"hd": math.nan, "hd95": math.nan, "assd": math.nan}
    d_pg, d_gp = surface_distances(p, g, spacing)
    return {
        "hd": float(max(d_pg.max(), d_gp.max())),
        "hd95": float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))),
        "assd": float(np.concatenate([d_pg, d_gp]).mean()),
    }


def hausdorff(pred, gt, spacing=None) -> float:
    """Hausdorff distance; see :func:`distances`."""
    return distances(pred, gt, spacing)["hd"]


def hd95(pred, gt, spacing=None) -> float:
    """95th-percentile Hausdorff distance; see :func:`distances`."""
    return distances(pred, gt, spacing)["hd95"]


def assd(pred, gt, spacing=None) -> float:
    """Average symmetric surface distance; see :func:`distances`."""
    return distances(pred, gt, spacing)["assd"]


# -- everything for one case ---------------------------------------------------------------------

METRIC_GROUPS = ("dice", "cldice", "precision", "recall", "betti", "hd", "hd95", "assd")


def case_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, which: Sequence[str] = METRIC_GROUPS
) -> dict[str, float | int | str]:
    """The selected metrics of one case plus its ``status``. ``betti`` expands to the error columns."""
    p, g = _pair(pred, gt)
    unknown = set(which) - set(METRIC_GROUPS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRIC_GROUPS)}")
    row: dict[str, float | int | str] = {"status": status(p, g)}
    functions = {"dice": dice, "cldice": cldice, "precision": precision, "recall": recall}
    for name in which:
        if name in functions:
            row[name] = functions[name](p, g)
    if "betti" in which:
        row.update(betti_errors(p, g))
    if set(which) & set(DISTANCES):
        row.update({k: v for k, v in distances(p, g, spacing).items() if k in which})
    return row
