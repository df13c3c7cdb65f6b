"""Realistic coarse vessel masks for DRIVE: predictions of small U-Nets on images they never saw.

A refiner must learn from the errors a real segmentation network makes (breaks at low contrast,
missing thin tips, stray fragments), not only from synthetic damage. This script makes them:

1. The cases are split into *train* cases (the refiner's) and *test* cases (held out, by default
   the last 5 case ids).
2. The train cases are split into ``--folds`` folds. For each fold a U-Net (width 16, depth 3, or
   ``--oof-depth``) is trained on the other folds and predicts the fold: ``out/oof/`` holds one
   out-of-fold coarse mask per train case, the refiner's training states.
3. A different network (one level deeper: width 16, depth 4, another seed) is trained on all train cases and predicts
   the test cases: ``out/unseen/``. The refiner never sees this network nor these images, so its
   scores there say how it does on a segmentation model it was not trained for.

Masks are the probabilities thresholded at 0.5 inside the field of view, written as 0/255 PNG, with
``manifest.csv`` (case, role, network, Dice against the label). Run from the repository root:

    python scripts/coarse_unet.py --data ../shared/data/drive-train --out data/drive-coarse

About 5 minutes per network on 2 CPU cores at the defaults (4 networks).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def read_case(data: Path, cid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (3, H, W) float32 normalised inside the field of view, label bool, fov bool)."""
    image = np.asarray(Image.open(data / "images" / f"{cid}.png").convert("RGB"), np.float32) / 255.0
    label = np.asarray(Image.open(data / "labels" / f"{cid}.png")) > 127
    fov = np.asarray(Image.open(data / "fov" / f"{cid}.png")) > 127
    inside = image[fov]
    image = (image - inside.mean(0)) / (inside.std(0) + 1e-6)
    image[~fov] = 0.0
    return image.transpose(2, 0, 1).copy(), label, fov


class UNet(nn.Module):
    """A plain U-Net: ``depth`` levels of two 3x3 convolutions, width doubling per level."""

    def __init__(self, width: int = 16, depth: int = 3, in_channels: int = 3):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        widths = [width * 2**k for k in range(depth)]
        self.down = nn.ModuleList([block(cin, cout) for cin, cout in zip([in_channels] + widths[:-1], widths)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[k + 1], widths[k], 2, stride=2) for k in range(depth - 1)])
        self.merge = nn.ModuleList([block(2 * widths[k], widths[k]) for k in range(depth - 1)])
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):  # (B, 3, H, W), H and W divisible by 2^(depth-1) -> logits (B, 1, H, W)
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for k in reversed(range(len(self.up))):
            x = self.merge[k](torch.cat([skips[k], self.up[k](x)], 1))
        return self.head(x)


def train_unet(cases, width, depth, iterations, seed, patch=96, batch=8, log=print) -> UNet:
    """Train on random patches (flips as augmentation) with BCE + soft Dice; returns the net in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(width, depth)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    for it in range(iterations):
        xs, ys = [], []
        for _ in range(batch):
            image, label, fov = cases[rng.integers(len(cases))]
            ys_, xs_ = np.nonzero(fov)
            k = rng.integers(len(ys_))
            top = int(np.clip(ys_[k] - patch // 2, 0, label.shape[0] - patch))
            left = int(np.clip(xs_[k] - patch // 2, 0, label.shape[1] - patch))
            x = image[:, top : top + patch, left : left + patch]
            y = label[top : top + patch, left : left + patch]
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, ::-1]
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[::-1]
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys)).float()[:, None]
        logits = net(x)
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % 100 == 0:
            log(f"    iteration {it + 1}/{iterations}: loss {loss.item():.3f}")
    return net.eval()


@torch.no_grad()
def predict(net: UNet, image: np.ndarray, fov: np.ndarray, multiple: int) -> np.ndarray:
    """Binary mask: probability >= 0.5 inside the field of view (the image padded to ``multiple``)."""
    h, w = fov.shape
    ph, pw = -h % multiple, -w % multiple
    x = torch.from_numpy(np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="reflect"))[None]
    prob = torch.sigmoid(net(x))[0, 0, :h, :w].numpy()
    return (prob >= 0.5) & fov


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/drive-train"))
    parser.add_argument("--out", type=Path, default=Path("data/drive-coarse"))
    parser.add_argument("--test-cases", type=int, default=5, help="hold out the last N case ids")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oof-depth", type=int, default=3, help="depth of the out-of-fold U-Nets (4: a second, deeper set)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = sorted(p.stem for p in (args.data / "labels").glob("*.png"))
    if len(ids) <= args.test_cases + args.folds:
        parser.error(f"{args.data}: {len(ids)} cases are too few for {args.test_cases} test cases and {args.folds} folds")
    train_ids, test_ids = ids[: -args.test_cases], ids[-args.test_cases :]
    cases = {cid: read_case(args.data, cid) for cid in ids}
    for sub in ("oof", "unseen"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    folds = [train_ids[k :: args.folds] for k in range(args.folds)]
    jobs = [(f"fold{k}", 16, args.oof_depth, args.seed + k, [c for c in train_ids if c not in fold], fold, "oof")
            for k, fold in enumerate(folds)]
    jobs.append(("unseen", 16, 4, args.seed + 100, train_ids, test_ids, "unseen"))
    for name, width, depth, seed, fit, targets, sub in jobs:
        start = time.perf_counter()
        print(f"{name}: U-Net width {width} depth {depth}, trained on {len(fit)} cases, predicts {', '.join(targets)}")
        net = train_unet([cases[c] for c in fit], width, depth, args.iterations, seed)
        for cid in targets:
            image, label, fov = cases[cid]
            mask = predict(net, image, fov, 2 ** (depth - 1))
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / sub / f"{cid}.png")
            rows.append([cid, "train" if sub == "oof" else "test", name, f"{dice(mask, label):.4f}"])
            print(f"  {cid}: Dice {dice(mask, label):.3f}")
        print(f"  {time.perf_counter() - start:.0f} s")
    with open(args.out / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["case", "role", "network", "dice"]] + sorted(rows))


if __name__ == "__main__":
    main()
