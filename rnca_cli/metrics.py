"""Metric functions on numpy arrays. Pure: no I/O, no state.

Masks are boolean (or anything where nonzero means foreground) of equal shape.
"""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|P & G| / (|P| + |G|). Both empty: 1.0 (nothing to find, nothing found)."""
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    if p.shape != g.shape:
        raise ValueError(f"dice: shapes differ {p.shape} vs {g.shape}")
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total


def betti_numbers(mask: np.ndarray) -> tuple[int, ...]:
    """Betti numbers of a binary mask: (β0, β1) in 2D, (β0, β1, β2) in 3D.

    Convention (DESIGN §6): the mask is padded by one background voxel; foreground is 8-connected
    in 2D / 26-connected in 3D, background 4- / 6-connected. β0 = foreground components,
    β2 = background components not connected to the padded border (cavities),
    β1 = β0 + β2 - χ with χ the Euler characteristic. An empty mask has all zeros.
    """
    from scipy import ndimage
    from skimage.measure import euler_number

    m = np.pad(np.asarray(mask) != 0, 1)
    if m.ndim not in (2, 3):
        raise ValueError(f"betti_numbers: expected a 2D or 3D mask, got shape {mask.shape}")
    full = np.ones((3,) * m.ndim, bool)  # 8 / 26 connectivity
    beta0 = int(ndimage.label(m, structure=full)[1])
    chi = int(euler_number(m, connectivity=m.ndim))
    if m.ndim == 2:
        return beta0, beta0 - chi
    background, n_bg = ndimage.label(~m, structure=ndimage.generate_binary_structure(3, 1))
    beta2 = n_bg - 1  # the padded border is one component; the others are enclosed cavities
    return beta0, beta0 + beta2 - chi, beta2
