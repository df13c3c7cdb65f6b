"""Validation that measures repair: held-out cases refined at full size, as ``rnca refine`` would,
and scored on what a refiner is for.

Per validation round (:func:`score`), means over the cases of: Dice, clDice, the Betti errors
(``betti0_err``: fragments, ``betti1_err``: loops, ``betti_err``: their sum), ``topology`` (the
share of cases whose Betti numbers equal the ground truth's) and ``changed`` (the share of pixels
the refiner changes on cases whose coarse mask was already correct; NaN when there is none).
:data:`~rnca_cli.options.SELECT_METRICS` says which direction is better for each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .metrics import betti_errors, cldice, dice
from .options import SELECT_METRICS

METRICS = ("dice", "cldice", "betti0_err", "betti1_err", "betti_err", "topology", "changed")


@dataclass
class ValCase:
    """One 2D validation case: image (H, W, C) float32, ground truth (H, W) bool, coarse (H, W) float32."""

    case_id: str
    image: np.ndarray
    target: np.ndarray
    coarse: np.ndarray


def score(predictions: list[np.ndarray], cases: list[ValCase]) -> dict[str, float]:
    """Mean metrics (module docstring) of binary ``predictions`` against the cases' ground truth."""
    rows = []
    changed = []
    for pred, case in zip(predictions, cases):
        errors = betti_errors(pred, case.target)
        rows.append({"dice": dice(pred, case.target), "cldice": cldice(pred, case.target), **errors,
                     "topology": float(errors["betti_err"] == 0)})
        coarse = case.coarse >= 0.5
        if np.array_equal(coarse, case.target):
            changed.append(float(np.mean(pred != coarse)))
    out = {name: float(np.mean([r[name] for r in rows])) for name in METRICS if name != "changed"}
    out["changed"] = float(np.mean(changed)) if changed else math.nan
    return out


def coarse_score(cases: list[ValCase]) -> dict[str, float]:
    """:func:`score` of the coarse masks themselves: what the refiner starts from."""
    return score([c.coarse >= 0.5 for c in cases], cases)


def probabilities(model, cases: list[ValCase], steps: int, seed: int) -> list[np.ndarray]:
    """Refined probabilities of the cases, as ``rnca refine --seed seed`` computes them
    (equal-size cases share forward passes)."""
    from .refine import refine_batch

    out: list[np.ndarray | None] = [None] * len(cases)
    by_shape: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        by_shape.setdefault(case.target.shape, []).append(i)
    for indices in by_shape.values():
        images = np.stack([cases[i].image for i in indices])
        masks = np.stack([cases[i].coarse for i in indices])
        for i, prob in zip(indices, refine_batch(model, images, masks, steps, [seed] * len(indices))):
            out[i] = prob
    return out


def refine_cases(model, cases: list[ValCase], steps: int, seed: int, min_size: int = 0) -> list[np.ndarray]:
    """Binary refinements of the cases, exactly as ``rnca refine --seed seed --min-size min_size
    --no-guard`` makes them."""
    from .guard import remove_small

    return [remove_small(p >= 0.5, min_size) for p in probabilities(model, cases, steps, seed)]


def guard_limits(model, cases: list[ValCase], steps: int, seed: int, min_size: int = 0) -> dict[str, float]:
    """Guard limits that trust the model on these cases (:func:`rnca_cli.guard.calibrated_limits`),
    from the two seeded runs ``rnca refine`` makes."""
    from .guard import DEFAULT_LIMITS, calibrated_limits, combine, run_seed

    runs = [probabilities(model, cases, steps, run_seed(seed, r)) for r in range(2)]
    verdicts = [combine(np.stack([a, b]), case.coarse, 0.5, min_size, DEFAULT_LIMITS)[3]
                for a, b, case in zip(*runs, cases)]
    return calibrated_limits(verdicts)


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` improves on ``old`` (None: nothing yet) for ``metric``; NaN never does."""
    if math.isnan(new):
        return False
    return old is None or math.isnan(old) or SELECT_METRICS[metric] * (new - old) > 0
