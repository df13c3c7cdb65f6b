"""How much Dice a vessel refiner could win on held-out coarse masks, and from which errors.

    python benchmarks/vessels_headroom.py                      # data/drive-coarse/unseen, cases 36-40
    python benchmarks/vessels_headroom.py --coarse data/drive-coarse/oof --json out.json

A refiner changes a coarse mask in three ways (pruning fragments, filling gaps, moving walls),
and each has a ceiling that needs no model to measure; the last three columns ask how much of it
the image shows. Per case, against the DRIVE label:

* ``fragments``: Dice after removing exactly the connected components (8-connected) of which
  less than half is vessel: a perfect pruner of stray fragments;
* ``gaps``: Dice after adding every missed vessel pixel more than 1 px from the coarse mask: a
  perfect repair of breaks and missing tips, walls left as they are;
* ``walls``: Dice after also removing every false positive within 1 px of a vessel (on top of
  ``gaps``): what remains is moving walls;
* ``trim``: the best Dice, over thresholds, of removing the coarse mask's edge pixels whose
  locally normalised green intensity (``z``, as ``--image-norm 10`` shows it to the model) is
  above the threshold: whether one pixel of the image says where the wall is;
* ``pixel AUC``: how well the same normalised intensity tells the missed vessel pixels (``gaps``)
  from background pixels 2-8 px from the coarse mask (0.5: not at all);
* ``line AUC``: the same for a line detector (:func:`line_response`), which sees 15 px along a
  vessel instead of one pixel: what an automaton could gain from an image input wider than 3x3.

``QUALITY.md`` (vessels) has the last result and what it means for the targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.stats import rankdata

from rnca_cli.metrics import dice
from rnca_cli.preprocess import SPAN, normalise

ROOT = Path(__file__).resolve().parents[1]
DRIVE = ROOT.parent / "shared" / "data" / "drive-train"
TRIM_THRESHOLDS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # z; vessels are darker than their surroundings
NORM_SIGMA = 10.0  # the --image-norm of every vessels run in models/README.md


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (Mann-Whitney)."""
    ranks = rankdata(np.concatenate([positive, negative]))
    n = len(positive)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * len(negative)))


def line_response(green: np.ndarray, length: int = 15, angles: int = 12) -> np.ndarray:
    """(H, W) largest mean darkness along a ``length`` px line through each pixel, over ``angles``
    orientations, minus the mean darkness of the ``length`` x ``length`` square around it (the line
    detector of Ricci and Perfetti, IEEE TMI 2007)."""
    dark = 1.0 - green
    best = np.full(dark.shape, -np.inf)
    c = length // 2
    for k in range(angles):
        theta = np.pi * k / angles
        kernel = np.zeros((length, length))
        t = np.linspace(-c, c, 4 * length)
        kernel[np.rint(c + t * np.sin(theta)).astype(int), np.rint(c + t * np.cos(theta)).astype(int)] = 1.0
        best = np.maximum(best, ndimage.convolve(dark, kernel / kernel.sum(), mode="mirror"))
    return best - ndimage.uniform_filter(dark, length, mode="mirror")


def headroom(coarse: np.ndarray, truth: np.ndarray, green: np.ndarray) -> dict[str, float]:
    """The module docstring's ceilings for one case: masks (H, W) bool, green (H, W) float."""
    to_coarse = ndimage.distance_transform_edt(~coarse)
    near_coarse = to_coarse <= 1.5  # 8-neighbours of the mask
    near_truth = ndimage.distance_transform_edt(~truth) <= 1.5
    labels, _ = ndimage.label(coarse, np.ones((3, 3), bool))
    size = np.bincount(labels.ravel())
    vessel = np.bincount(labels.ravel(), weights=truth.ravel())
    keep = vessel >= 0.5 * size
    keep[0] = False
    gaps = truth & ~coarse & ~near_coarse
    repaired = coarse | gaps
    bright = (normalise(green[..., None], NORM_SIGMA)[..., 0] - 0.5) * 2 * SPAN  # z, clipped at +-SPAN
    edge = coarse & ~ndimage.binary_erosion(coarse)
    line = line_response(green)
    background = ~truth & ~coarse & ~near_coarse & (to_coarse <= 8)
    comparable = gaps.any() and background.any()  # else no AUC
    return {
        "coarse": dice(coarse, truth),
        "fragments": dice(keep[labels], truth),
        "gaps": dice(repaired, truth),
        "walls": dice(repaired & ~(near_truth & ~truth), truth),
        "trim": max(dice(coarse & ~(edge & (bright > t)), truth) for t in TRIM_THRESHOLDS),
        "pixel_auc": auc(-bright[gaps], -bright[background]) if comparable else float("nan"),
        "line_auc": auc(line[gaps], line[background]) if comparable else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coarse", type=Path, default=ROOT / "data" / "drive-coarse" / "unseen")
    parser.add_argument("--data", type=Path, default=DRIVE, help="DRIVE folder with images/ and labels/")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = {}
    for path in sorted(args.coarse.glob("*.png")):
        truth = read(args.data / "labels" / path.name) > 127
        green = read(args.data / "images" / path.name)[..., 1].astype(np.float64) / 255.0
        rows[path.stem] = headroom(read(path) > 127, truth, green)
    if not rows:
        raise SystemExit(f"{args.coarse}: no PNG coarse masks")
    columns = list(next(iter(rows.values())))
    print("| case | " + " | ".join(columns) + " |\n| --- |" + " --- |" * len(columns))
    for case, row in [*rows.items(), ("mean", {c: float(np.nanmean([r[c] for r in rows.values()])) for c in columns})]:
        print(f"| {case} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1).replace("NaN", "null") + "\n")  # no gaps: no AUC


if __name__ == "__main__":
    main()
