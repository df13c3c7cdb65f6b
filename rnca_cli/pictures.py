"""Pictures of what the automaton does, drawn with Pillow alone:

* :func:`curves`: training loss and validation metrics over iterations (``curves.png``);
* :func:`trajectory_strip` and :func:`trajectory_gif`: cases being repaired step by step, beside
  the image, the coarse mask and (when known) the ground truth;
* :func:`overlay`: an image with the pixels a refiner added (green) and removed (red).

Every function writes atomically and returns the path; arrays are numpy, masks in [0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_path

ADDED, REMOVED = (40, 200, 60), (230, 40, 40)
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=kwargs.pop("format", "PNG"), **kwargs)
    return path


def _gray_rgb(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) in [0, 1] -> (H, W, 3) uint8."""
    a = np.asarray(a, np.float32)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return (np.clip(a[..., :3], 0, 1) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path) -> Path:
    """The image (gray or RGB, [0, 1]) darkened, the pixels of ``after`` that ``before`` lacked in
    green, those it dropped in red, and the unchanged foreground in white, one picture."""
    rgb = (_gray_rgb(image).astype(np.float32) * 0.6).astype(np.uint8)
    b, a = np.asarray(before) >= 0.5, np.asarray(after) >= 0.5
    rgb[a & b] = (235, 235, 235)
    rgb[a & ~b] = ADDED
    rgb[~a & b] = REMOVED
    return _save(Image.fromarray(rgb), path)


def _tile(columns: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Arrays (H, W, 3) uint8 side by side with a white gap."""
    h = max(c.shape[0] for c in columns)
    parts = []
    for c in columns:
        padded = np.full((h, c.shape[1], 3), 255, np.uint8)
        padded[: c.shape[0]] = c
        parts += [padded, np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def _labelled(panel: np.ndarray, text: str, scale: int) -> np.ndarray:
    """A panel scaled up by ``scale`` with its caption above it."""
    image = Image.fromarray(panel).resize((panel.shape[1] * scale, panel.shape[0] * scale), Image.NEAREST)
    out = Image.new("RGB", (image.width, image.height + 14), "white")
    out.paste(image, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(out)


MISSED = (0, 200, 255)


def errors_rgb(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """A mask against the ground truth: right foreground white, extra pixels red, missed cyan."""
    m, t = np.asarray(mask) >= 0.5, np.asarray(truth) >= 0.5
    rgb = np.zeros((*m.shape, 3), np.uint8)
    rgb[m & t] = (235, 235, 235)
    rgb[m & ~t] = REMOVED
    rgb[~m & t] = MISSED
    return rgb


def comparison_sheet(rows: Sequence[dict], path: Path, scale: int = 1) -> Path:
    """One row per case: the image, then each named mask against the ground truth
    (:func:`errors_rgb`), then the ground truth. ``rows``: dicts with ``image``, ``truth``,
    ``title`` and ``masks`` (name -> mask, in column order)."""
    lines = []
    for row in rows:
        panels = [_labelled(_gray_rgb(row["image"]), row["title"], scale)]
        panels += [_labelled(errors_rgb(m, row["truth"]), name, scale) for name, m in row["masks"].items()]
        panels.append(_labelled(_gray_rgb(np.asarray(row["truth"], np.float32)), "ground truth", scale))
        lines.append(_tile(panels, gap=4))
    width = max(line.shape[1] for line in lines)
    padded = [np.pad(line, ((0, 6), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    return _save(Image.fromarray(np.concatenate(padded, axis=0)), path)


def trajectory_strip(rows: Sequence[dict], path: Path, scale: int = 1) -> Path:
    """One row per case: image, coarse mask, the visible channel at the recorded steps, and the
    ground truth when given. Each row is ``{"image", "coarse", "steps": {t: map}, "target"?}``."""
    lines = []
    for row in rows:
        panels = [_labelled(_gray_rgb(row["image"]), "image", scale), _labelled(_gray_rgb(row["coarse"]), "coarse", scale)]
        panels += [_labelled(_gray_rgb(m), f"step {t}", scale) for t, m in row["steps"].items()]
        if row.get("target") is not None:
            panels.append(_labelled(_gray_rgb(row["target"]), "truth", scale))
        lines.append(_tile(panels))
    width = max(line.shape[1] for line in lines)
    grid = np.concatenate([np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255)
                           for line in lines])
    return _save(Image.fromarray(grid), path)


def trajectory_gif(image: np.ndarray, history: Sequence[np.ndarray], path: Path, scale: int = 1,
                   target: np.ndarray | None = None) -> Path:
    """An animation: the image beside the visible channel after each step (and the ground truth)."""
    frames = []
    for t, m in enumerate(history):
        panels = [_labelled(_gray_rgb(image), "image", scale), _labelled(_gray_rgb(m), f"step {t}", scale)]
        if target is not None:
            panels.append(_labelled(_gray_rgb(target), "truth", scale))
        frames.append(Image.fromarray(_tile(panels)))
    first, *rest = frames
    return _save(first, path, format="GIF", save_all=True, append_images=rest, duration=80, loop=0)


def recorded_steps(steps: int, count: int = 5) -> list[int]:
    """About ``count`` steps spread over a rollout of ``steps`` (1, ..., steps), for strips."""
    picks = sorted({max(1, round(steps * (k + 1) / count)) for k in range(count)})
    return [t for t in picks if t <= steps]


def curves(rows: Sequence[dict], path: Path, series: Sequence[str] = ("loss", "val_dice", "val_cldice",
                                                                     "val_betti_err", "val_topology"),
           size: tuple[int, int] = (360, 200)) -> Path:
    """One panel per series of ``rows`` (dicts with ``iteration`` and the series, as log.csv has
    them) present in them, stacked vertically, each with its own y range; missing values skipped."""
    panels = []
    for k, name in enumerate(series):
        points = [(float(r["iteration"]), float(r[name])) for r in rows
                  if r.get(name) not in (None, "") and math.isfinite(float(r[name]))]
        if not points:
            continue
        panels.append(_panel(name, points, size, _COLOURS[k % len(_COLOURS)]))
    if not panels:
        panels.append(Image.new("RGB", size, "white"))
    out = Image.new("RGB", (size[0], sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    return _save(out, path)


def _panel(name: str, points: list[tuple[float, float]], size: tuple[int, int], colour) -> Image.Image:
    w, h = size
    left, right, top, bottom = 48, 10, 18, 20
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:  # a constant series sits in the middle of its panel
        y0, y1 = y0 - max(0.5, abs(y0) * 0.1), y1 + max(0.5, abs(y1) * 0.1)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    draw.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    draw.text((left, 2), name, fill=(0, 0, 0))
    draw.text((2, top - 4), f"{y1:.3g}", fill=(80, 80, 80))
    draw.text((2, h - bottom - 8), f"{y0:.3g}", fill=(80, 80, 80))
    draw.text((left, h - bottom + 4), f"{x0:g}", fill=(80, 80, 80))
    draw.text((w - right - 40, h - bottom + 4), f"{x1:g}", fill=(80, 80, 80))
    line = [(sx(x), sy(y)) for x, y in points]
    if len(line) > 1:
        draw.line(line, fill=colour, width=2)
    for x, y in line[-1:] if len(line) > 1 else line:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return image
