"""Training objectives and stability options compared on held-out cases: each configuration is one
`rnca train` run on rings-train (10 % held out, the same cases for all), and the table holds the
held-out scores of its best checkpoint (`final.csv`).

    python benchmarks/objectives.py [--iterations 300] [--out /tmp/objectives]

About 4-5 minutes per configuration on the 2-core development CPU at the defaults below.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rings-train"
CONFIGS = {  # name -> options on top of the common ones
    "mse (paper)": ["--loss", "mse"],
    "mse, far-weight 4": ["--loss", "mse", "--far-weight", "4"],
    "mse + cldice 0.5": ["--loss", "mse+cldice:0.5"],
    "mse + dice 0.5": ["--loss", "mse+dice:0.5"],
    "bce": ["--loss", "bce"],
    "mse, far-weight 4, ema 0.99": ["--loss", "mse", "--far-weight", "4", "--ema", "0.99"],
    "mse + cldice 0.5, cosine, warm-up 30": ["--loss", "mse+cldice:0.5", "--schedule", "cosine", "--warmup", "30"],
    "mse + cldice 0.5, ema 0.9": ["--loss", "mse+cldice:0.5", "--ema", "0.9"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/objectives"))
    args = parser.parse_args()
    common = ["--images", str(DATA / "images"), "--labels", str(DATA / "labels"), "--states", str(DATA / "states"),
              "--val-fraction", "0.1", "--batch", "8", "--lr", "2e-3", "--iterations", str(args.iterations),
              "--val-every", "50", "--save-every", "100", "--device", "cpu", "-q", "--overwrite"]
    print("| configuration | seed | iteration | Dice | clDice | β0 err | β1 err | topology correct | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, options in CONFIGS.items():
        for seed in args.seeds:
            run = args.out / f"{name.split(',')[0].replace(' ', '')}-{abs(hash(name)) % 10**6}-s{seed}"
            start = time.time()
            subprocess.run([sys.executable, "-m", "rnca_cli", "train", *common, *options, "--seed", str(seed),
                            "-o", str(run)], check=True)
            with open(run / "final.csv") as f:
                best = next(r for r in csv.DictReader(f) if r["masks"] == "best")
            print(f"| {name} | {seed} | {best['iteration']} | {float(best['dice']):.3f} | {float(best['cldice']):.3f} | "
                  f"{float(best['betti0_err']):.2f} | {float(best['betti1_err']):.2f} | "
                  f"{100 * float(best['topology']):.0f} % | {(time.time() - start) / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
