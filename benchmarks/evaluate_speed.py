"""How long `rnca evaluate` takes on the sizes users have (issue: "seconds, not minutes").

    python benchmarks/evaluate_speed.py [--jobs 2] [--json benchmarks/evaluate_speed.json]

Builds, in a temporary folder, 20 vessel-like 2D masks of 584x565 (DRIVE size) with predictions
that drop and shift branches, and one 128^3 NIfTI pair (a thick spherical shell and a dented
copy), then times the full evaluation (all metrics, file reading included) of each set with one
process and with --jobs processes. Prints a table; --json also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from rnca_cli import evaluate as ev


def vessel_mask(rng: np.random.Generator, shape=(584, 565)) -> np.ndarray:
    """Random smooth curves thickened to 1-4 px: a crude vessel tree."""
    mask = np.zeros(shape, bool)
    for _ in range(25):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(80, 300))):
            angle += rng.normal(0, 0.08)
            y, x = y + np.sin(angle), x + np.cos(angle)
            if 0 <= y < shape[0] and 0 <= x < shape[1]:
                mask[int(y), int(x)] = True
    return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))


def corrupt(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for _ in range(15):  # cut gaps
        y, x = rng.integers(0, mask.shape[0] - 8), rng.integers(0, mask.shape[1] - 8)
        out[y : y + 8, x : x + 8] = False
    return np.roll(out, 1, axis=1)


def build(root: Path) -> tuple[Path, Path, Path, Path]:
    rng = np.random.default_rng(0)
    for sub in ("gt2d", "pred2d", "gt3d", "pred3d"):
        (root / sub).mkdir()
    for k in range(20):
        gt = vessel_mask(rng)
        Image.fromarray(gt.astype(np.uint8) * 255).save(root / "gt2d" / f"v{k:02d}.png")
        Image.fromarray(corrupt(rng, gt).astype(np.uint8) * 255).save(root / "pred2d" / f"v{k:02d}.png")
    zz, yy, xx = np.mgrid[:128, :128, :128] - 63.5
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    gt = ((r > 35) & (r < 50)).astype(np.uint8)
    pred = gt.copy()
    pred[60:70, 60:70, :] = 0  # a tunnel through the shell
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    nib.save(nib.Nifti1Image(gt, affine), str(root / "gt3d" / "vol.nii.gz"))
    nib.save(nib.Nifti1Image(pred, affine), str(root / "pred3d" / "vol.nii.gz"))
    return root / "pred2d", root / "gt2d", root / "pred3d", root / "gt3d"


def timed(pred: Path, gt: Path, jobs: int) -> tuple[float, dict]:
    start = time.perf_counter()
    result = ev.evaluate(ev.pair_files(pred, gt)[0], ev.EvalOptions(jobs=jobs))
    return time.perf_counter() - start, result.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pred2d, gt2d, pred3d, gt3d = build(Path(tmp))
        figures = {}
        for name, (pred, gt) in {"20 x 584x565 PNG": (pred2d, gt2d), "1 x 128^3 NIfTI": (pred3d, gt3d)}.items():
            for jobs in sorted({1, args.jobs}):
                seconds, summary = timed(pred, gt, jobs)
                figures[f"{name}, jobs={jobs}"] = {
                    "seconds": round(seconds, 2), "dice": round(summary["dice"]["mean"], 4),
                    "betti_err": round(summary["betti_err"]["mean"], 3),
                }
    print(f"{'set':32} {'seconds':>8} {'dice':>7} {'betti_err':>9}")
    for name, f in figures.items():
        print(f"{name:32} {f['seconds']:8.2f} {f['dice']:7.4f} {f['betti_err']:9.3f}")
    if args.json:
        machine = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"machine": machine, "figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
