"""Training objectives on the visible channel at the loss step, per sample.

A ``--loss`` (parsed by :func:`rnca_cli.options.parse_loss`) is a ``+``-joined list of terms, each with an optional weight (``mse``,
``mse+cldice:0.5``, ``bce+dice``), summed per sample:

* ``mse``: the paper's mean squared error of the visible channel against the ground truth;
* ``bce``: binary cross-entropy of the visible channel (clamped into (0, 1)) as a probability;
* ``dice``: soft Dice loss, 1 - 2 sum(p g) / (sum p + sum g);
* ``cldice``: soft clDice loss (Shit et al., CVPR 2021): 1 - the harmonic mean of the soft
  skeleton precision and sensitivity, with skeletons from iterated soft morphology.

Two pixel weights (:func:`pixel_weights`) multiply the ``mse`` and ``bce`` terms, and leave
``dice`` and ``cldice`` as they are:

* ``far_weight`` W: pixels more than ``FAR`` pixels from the ground truth weigh 1 + W. The MSE of a
  patch is dominated by thin foreground the coarse mask missed, which no refiner can invent, so stray
  fragments far from the truth cost it almost nothing and a refiner trained on it does not learn to
  prune them.
* ``miss_weight`` W: the sample's gaps (:func:`gaps`: missed ground-truth pixels more than one
  pixel from its coarse mask, and their missed neighbours) weigh 1 + W. On thin structures a gap
  is a few pixels among thousands of background pixels beside the vessel walls, which look alike
  to a 3x3 rule, so without it the objective favours the identity. A wall the coarse mask drew a
  pixel too thin is left out: weighting it taught a DRIVE refiner to thicken every vessel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


FAR = 3  # pixels: a false positive farther than this from the ground truth is a stray fragment


def far_from(targets: np.ndarray) -> np.ndarray:
    """(N, P, P) bool: pixels more than :data:`FAR` pixels from each target's foreground (all of
    them for an empty target)."""
    out = np.ones(targets.shape, bool)
    for i, t in enumerate(targets):
        if t.any():
            out[i] = ndimage.distance_transform_edt(~t.astype(bool)) > FAR
    return out


def _soft_erode(x: torch.Tensor) -> torch.Tensor:
    return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)), -F.max_pool2d(-x, (1, 3), 1, (0, 1)))


def _soft_skeleton(x: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Soft skeleton of (N, 1, H, W) probabilities by iterated soft erosion and opening."""
    dilate = lambda y: F.max_pool2d(y, 3, 1, 1)  # noqa: E731
    skel = F.relu(x - dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - dilate(_soft_erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def gaps(target: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """(n, P, P) bool: the pixels of ``target`` that ``coarse`` missed (both (n, P, P) bool) and that
    lie more than one pixel (8-neighbourhood) from its foreground, or next to such a pixel: a gap,
    with the pixels where growth across it starts, but not a wall drawn a pixel too thin."""
    dilate = lambda x: F.max_pool2d(x[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0  # noqa: E731
    missed = target & ~coarse
    return missed & dilate(missed & ~dilate(coarse))


def pixel_weights(far: torch.Tensor, far_weight: float, missed: torch.Tensor | None,
                  miss_weight: float) -> torch.Tensor | None:
    """(n, P, P) weights of the pixel terms (module docstring) from the ``far`` pixels and the
    ``missed`` ones (:func:`gaps`), both (n, P, P) bool; ``missed`` is only read when
    ``miss_weight`` is not 0. None when both weights are 0."""
    if far_weight == 0 and miss_weight == 0:
        return None
    weight = 1.0 + far_weight * far.float()
    return weight + miss_weight * missed.float() if miss_weight else weight


def sample_losses(terms: list[tuple[str, float]], pred: torch.Tensor, target: torch.Tensor,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) losses of visible channels ``pred`` (n, P, P) against ``target`` (n, P, P) in {0, 1};
    ``weight`` (n, P, P) multiplies the pixel terms (:func:`pixel_weights`)."""
    total = pred.new_zeros(pred.shape[0])
    eps = 1e-6
    for name, w in terms:
        if name in ("mse", "bce"):
            if name == "mse":
                per_pixel = (pred - target) ** 2
            else:
                p = pred.clamp(1e-4, 1 - 1e-4)
                per_pixel = -(target * p.log() + (1 - target) * (1 - p).log())
            if weight is not None:
                per_pixel = per_pixel * weight
            total = total + w * per_pixel.mean(dim=(1, 2))
        elif name == "dice":
            p = pred.clamp(0, 1)
            total = total + w * (1 - (2 * (p * target).sum((1, 2)) + eps) / (p.sum((1, 2)) + target.sum((1, 2)) + eps))
        else:  # cldice
            p = pred.clamp(0, 1)[:, None]
            g = target[:, None]
            sp, sg = _soft_skeleton(p), _soft_skeleton(g)
            tprec = ((sp * g).sum((1, 2, 3)) + eps) / (sp.sum((1, 2, 3)) + eps)
            tsens = ((sg * p).sum((1, 2, 3)) + eps) / (sg.sum((1, 2, 3)) + eps)
            total = total + w * (1 - 2 * tprec * tsens / (tprec + tsens))
    return total
