"""What happens to refined probabilities before they are written: ensembles, clean-up, the guard.

A refiner trained on one kind of mask can damage another kind (the fill model fills the hole of a
ring). ``rnca refine`` therefore judges every case from numbers it already has, and keeps
the input mask where the refinement looks unreliable:

* **runs**: the automaton is stochastic, so a case is refined with ``runs`` seeds (run ``r`` uses
  :func:`run_seed`); run 0 uses the seed itself, so one run gives exactly the plain refinement.
  The written probability is the mean of the first ``ensemble`` runs (``--ensemble N``).
* **uncertainty**: the per-pixel standard deviation of all runs' probabilities (the ensemble's,
  or the guard's two with ``--ensemble 1``). Its per-case
  score is the mean of that map over the pixels that any run or the input calls foreground, so
  that a large empty background does not dilute it; it is 0 when all runs agree exactly (a
  fire rate of 0 or 1 makes the automaton deterministic).
* **clean-up**: with ``min_size`` > 0, connected components (8-connected in 2D, 26 in 3D) of
  fewer pixels are removed from the mask; a model can store its own default (``rnca train
  --min-size``), and the probability map is left as the automaton wrote it.
* **the guard**: a case is *kept* (its input mask written instead) when the refinement changed
  more than ``max_change`` of the input's foreground (pixels added plus pixels removed, so that a
  mask emptied in one place and grown in another does not pass as unchanged), or when the seeded
  runs disagree: the lowest
  Dice between a run's mask and the result is below ``min_agreement``. The guard needs two runs at
  least; with ``--ensemble 1`` it runs a second one.
* **limits per model**: how much a good refinement changes a mask depends on the task (a ring with
  a wide gap grows by half), so ``rnca train`` measures it on its validation cases and stores
  limits in the checkpoint (:func:`calibrated_limits`); a model without them gets
  :data:`DEFAULT_LIMITS`, and the command line overrides either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .options import MAX_SEED

RUN_STRIDE = 1 << 32  # seed distance between the runs of one case, far beyond any slice offset


def run_seed(seed: int, run: int) -> int:
    """Seed of the ``run``-th seeded rollout of a case refined with ``seed`` (run 0: ``seed``)."""
    return (seed + run * RUN_STRIDE) % MAX_SEED


def remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` (bool) without its connected components of fewer than ``min_size`` pixels."""
    if min_size <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of any shape; 1.0 when both are empty (metrics.dice's convention,
    without its 2D/3D check, since runs are compared pixel for pixel)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass(frozen=True)
class GuardLimits:
    """When a refinement is not trusted (module docstring). ``enabled`` False: never kept."""

    enabled: bool = True
    max_change: float = 0.5
    min_agreement: float = 0.9


DEFAULT_LIMITS = GuardLimits()


def limits_for(refine_defaults: dict, enabled: bool, max_change: float | None, min_agreement: float | None) -> GuardLimits:
    """The limits a refine uses: those given, else the model's stored ones, else the defaults."""
    return GuardLimits(
        enabled,
        max_change if max_change is not None else float(refine_defaults.get("guard_change", DEFAULT_LIMITS.max_change)),
        min_agreement if min_agreement is not None else float(
            refine_defaults.get("guard_agreement", DEFAULT_LIMITS.min_agreement)),
    )


def calibrated_limits(verdicts: list["Verdict"]) -> dict[str, float]:
    """Limits that trust every one of a model's own validation cases with a margin: the change
    limit is 1.5 x the largest changed share seen (at least the default), the agreement limit 0.05 below
    the lowest agreement seen (at most the default)."""
    largest = max((v.changed for v in verdicts), default=0.0)
    lowest = min((v.agreement for v in verdicts), default=1.0)
    return {"guard_change": max(DEFAULT_LIMITS.max_change, math.ceil(150 * largest) / 100),
            "guard_agreement": min(DEFAULT_LIMITS.min_agreement, max(0.0, math.floor(100 * lowest - 5) / 100))}


@dataclass(frozen=True)
class Verdict:
    """One case's numbers and decision. ``kept`` names the reason the input was written, or is ''."""

    foreground_before: int
    foreground_refined: int
    change: float  # net growth: (refined - before) / max(before, 1)
    changed: float  # pixels added plus pixels removed / max(before, 1): what the guard limits
    agreement: float  # lowest Dice between a run's mask and the result; 1.0 with one run
    uncertainty: float  # mean per-pixel std of the runs over the foreground union; 0.0 with one run
    kept: str

    @property
    def refined(self) -> bool:
        return not self.kept


def combine(probs: np.ndarray, coarse: np.ndarray, threshold: float, min_size: int, limits: GuardLimits,
            ensemble: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, Verdict]:
    """Judge one case from its runs.

    probs: (runs, *shape) refined probabilities, run 0 first; coarse: (*shape) the input mask in
    [0, 1]. Returns (probability: the mean of the first ``ensemble`` runs, mask to write, per-pixel
    std over all runs, verdict). The mask is the input's binary mask when the verdict keeps it,
    else the thresholded probability after ``min_size`` clean-up.
    """
    mean = probs[:ensemble].mean(0) if ensemble > 1 else probs[0]
    std = probs.std(0) if len(probs) > 1 else np.zeros_like(probs[0])
    before = coarse >= threshold
    runs = [remove_small(p >= threshold, min_size) for p in probs]
    refined = runs[0] if ensemble == 1 else remove_small(mean >= threshold, min_size)
    agreement = min(dice(r, refined) for r in runs) if len(probs) > 1 else 1.0
    union = before | (probs >= threshold).any(0)
    uncertainty = float(std[union].mean()) if union.any() and len(probs) > 1 else 0.0
    n_before, n_after = int(before.sum()), int(refined.sum())
    change = (n_after - n_before) / max(n_before, 1)
    changed = int((refined != before).sum()) / max(n_before, 1)
    kept = ""
    if limits.enabled:
        if changed > limits.max_change:
            kept = (f"changed {changed:.0%} of the foreground (limit {limits.max_change:.0%}; "
                    f"it {'grew' if change >= 0 else 'shrank'} by {abs(change):.0%})")
        elif agreement < limits.min_agreement:
            kept = f"seeded runs disagree (Dice {agreement:.3f} < {limits.min_agreement:g})"
    verdict = Verdict(n_before, n_after, change, changed, agreement, uncertainty, kept)
    return mean, (before if kept else refined), std, verdict
