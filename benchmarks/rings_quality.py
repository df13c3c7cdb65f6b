"""Held-out quality of a ring refiner on ../shared/data/rings-train (the cases training held out).

    python benchmarks/rings_quality.py --model rings --first 449 --last 512

Prints, for the coarse masks and for their refinement (threshold 0.5): mean Dice against the
ground truth, and the share of cases that are a whole ring (exactly one component and one hole,
i.e. Betti numbers (1, 1)). Writes the same as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rnca_cli import load_model, refine_array
from rnca_cli.io import read_image, read_mask
from rnca_cli.metrics import betti_numbers, dice

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rings-train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="rings")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--first", type=int, default=449)
    parser.add_argument("--last", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = load_model(args.model)
    rows = []
    start = time.perf_counter()
    for k in range(args.first, args.last + 1):
        name = f"example_{k:03d}.png"
        image = read_image(args.data / "images" / name).data
        gt = read_mask(args.data / "labels" / name).data >= 0.5
        coarse = read_mask(args.data / "states" / name).data
        refined = refine_array(model, image, coarse, steps=args.steps, seed=args.seed) >= 0.5
        rows.append({
            "dice_before": dice(coarse >= 0.5, gt), "dice_after": dice(refined, gt),
            "whole_before": betti_numbers(coarse >= 0.5) == (1, 1), "whole_after": betti_numbers(refined) == (1, 1),
            "gt_whole": betti_numbers(gt) == (1, 1),
        })
    seconds = time.perf_counter() - start
    summary = {
        "model": str(args.model), "cases": len(rows), "steps": args.steps, "seed": args.seed,
        **{key: float(np.mean([r[key] for r in rows])) for key in rows[0]},
        "seconds": round(seconds, 1),
    }
    print(f"{summary['cases']} held-out cases, {args.steps} steps, {seconds:.1f}s")
    print(f"  Dice          {summary['dice_before']:.4f} -> {summary['dice_after']:.4f}")
    print(f"  whole rings   {summary['whole_before']:.1%} -> {summary['whole_after']:.1%}"
          f"  (ground truth whole: {summary['gt_whole']:.1%})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
