"""Synthetic datasets: image, ground truth and coarse mask triples for tutorials, tests and models.

Three kinds, each an image whose intensities carry real evidence of the structure:

* ``vessels``: branching trees of tapering, smoothly curving segments, darker than a textured,
  vignetted background (like the green channel of a fundus photograph), with noise;
* ``rings``: closed contours of varying shape and thickness (myocardium-like), brighter than a
  textured background, blurred and noisy;
* ``blobs``: smooth genus-0 organ-like shapes with their own texture, for hole filling.

Coarse masks are made from the ground truth with :mod:`rnca_cli.perturb`, by a default recipe per
kind (:data:`DEFAULT_RECIPES`) that produces that kind's typical failure. Case ``k`` of a dataset is
drawn from ``numpy.random.default_rng([seed, k])``: same seed, same dataset, and any case can be
regenerated alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from . import io, perturb
from .errors import OutputError

KINDS = ("vessels", "rings", "blobs")
DEFAULT_RECIPES = {
    "vessels": "breaks:0.8:count=3:length=4,thin:0.3:fraction=0.5,specks:0.3:count=3,drop:0.2",
    "rings": "breaks:0.8:count=2:length=5,jitter:0.3,erode:0.2,specks:0.2:count=2",
    "blobs": "holes:0.8:count=3,specks:0.3:count=3,jitter:0.3:amplitude=2,open:0.2:radius=2",
}


def _texture(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth random texture in [0, 1]."""
    t = ndimage.gaussian_filter(rng.standard_normal((size, size)), scale)
    return (t - t.min()) / max(float(np.ptp(t)), 1e-9)


def _finish(rng: np.random.Generator, image: np.ndarray, noise: float) -> np.ndarray:
    image = image + rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def vessels(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A vessel tree entering from the border; returns (image, label)."""
    label = np.zeros((size, size), bool)
    width_map = np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    stack = []
    for _ in range(int(rng.integers(1, 4))):  # 1-3 trees, each entering from a border
        side = int(rng.integers(4))
        along = rng.uniform(0.15, 0.85) * size
        start = {0: (0, along), 1: (size - 1, along), 2: (along, 0), 3: (along, size - 1)}[side]
        heading = {0: math.pi / 2, 1: -math.pi / 2, 2: 0.0, 3: math.pi}[side] + rng.normal(0, 0.3)
        stack.append((start[0], start[1], heading, max(1.2, size / 40) * rng.uniform(0.8, 1.2), 0))
    segments = 0
    while stack and segments < 60:
        y, x, angle, width, depth = stack.pop()
        segments += 1
        curve = rng.normal(0, 0.015)  # gentle bend per pixel; more curls vessels into loops
        for _ in range(int(rng.integers(size // 4, size // 2))):
            angle += curve + rng.normal(0, 0.03)
            y, x = y + math.sin(angle), x + math.cos(angle)
            width = max(0.6, width * 0.995)
            if not (0 <= y < size and 0 <= x < size):
                break
            r = int(math.ceil(width)) + 1
            y0, y1, x0, x1 = max(0, int(y) - r), min(size, int(y) + r + 1), max(0, int(x) - r), min(size, int(x) + r + 1)
            disk = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= width**2
            label[y0:y1, x0:x1] |= disk
            width_map[y0:y1, x0:x1] = np.maximum(width_map[y0:y1, x0:x1], disk * width)
            if depth < 4 and rng.random() < 0.04:
                stack.append((y, x, angle + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9), width * 0.75, depth + 1))
                width *= 0.85
    background = 0.55 + 0.25 * _texture(rng, size, size / 8)
    vignette = 1 - 0.35 * (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2) ** 2)
    contrast = 0.25 * np.clip(width_map / 2.0, 0.4, 1.0)  # thin vessels are fainter
    image = (background - ndimage.gaussian_filter(contrast * label, 0.7)) * vignette
    return _finish(rng, image, 0.04), label


def rings(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed contour of varying radius and thickness; returns (image, label)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    theta = np.arctan2(yy - cy, xx - cx)
    radius = rng.uniform(0.2, 0.3) * size
    for k in (2, 3, 4):
        radius = radius * (1 + rng.uniform(0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
    thickness = rng.uniform(0.05, 0.1) * size * (1 + 0.3 * np.cos(theta + rng.uniform(0, 2 * np.pi)))
    distance = np.hypot(yy - cy, xx - cx)
    label = np.abs(distance - radius) <= thickness / 2
    background = 0.3 + 0.2 * _texture(rng, size, size / 10)
    inside = (distance < radius - thickness / 2) * rng.uniform(0.05, 0.15)  # blood pool, brighter
    image = background + inside + rng.uniform(0.25, 0.4) * ndimage.gaussian_filter(label.astype(float), 1.0)
    return _finish(rng, image, 0.06), label


def blobs(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth organ-like shape without holes; returns (image, label)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    field = np.full((size, size), -np.inf)  # union of ellipses: max of their implicit functions
    for _ in range(int(rng.integers(2, 5))):
        c = rng.uniform(0.35, 0.65, 2) * size
        axes = rng.uniform(0.08, 0.18, 2) * size
        a = rng.uniform(0, np.pi)
        dy, dx = yy - c[0], xx - c[1]
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        field = np.maximum(field, 1 - (u / axes[0]) ** 2 - (v / axes[1]) ** 2)
    field += 0.15 * (_texture(rng, size, size / 12) - 0.5)
    labels, n = ndimage.label(field > 0)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1 if n else 0
    label = ndimage.binary_fill_holes(labels == largest)
    organ = 0.55 + 0.15 * _texture(rng, size, size / 16)
    background = 0.25 + 0.2 * _texture(rng, size, size / 6)
    soft = ndimage.gaussian_filter(label.astype(float), 1.5)
    image = soft * organ + (1 - soft) * background
    return _finish(rng, image, 0.05), label


GENERATORS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "vessels": vessels, "rings": rings, "blobs": blobs,
}


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # (size, size) float32 in [0, 1]
    label: np.ndarray  # (size, size) bool
    state: np.ndarray  # (size, size) bool, or float32 if the recipe softens
    ops: list[str]


def make_case(kind: str, k: int, size: int, seed: int, steps: list[perturb.Step], keep: float) -> Case:
    """Case ``k`` of a dataset: deterministic in (kind, k, size, seed, recipe)."""
    rng = np.random.default_rng([seed, k])
    image, label = GENERATORS[kind](rng, size)
    state, ops = perturb.apply_recipe(label, steps, rng, keep)
    return Case(f"{kind}_{k:04d}", image, label, state, ops)


def contact_sheet(cases: list[Case], columns: int = 4) -> np.ndarray:
    """uint8 image: per case image | label | coarse mask side by side, ``columns`` cases per row."""
    tiles = []
    for case in cases:
        parts = [case.image, case.label.astype(np.float32), np.asarray(case.state, np.float32)]
        gap = np.ones((case.image.shape[0], 2), np.float32)
        tiles.append(np.concatenate([parts[0], gap, parts[1], gap, parts[2]], axis=1))
    rows = []
    blank = np.zeros_like(tiles[0])
    for start in range(0, len(tiles), columns):
        row = tiles[start : start + columns]
        row += [blank] * (columns - len(row))
        rows.append(np.concatenate([np.pad(t, 3, constant_values=0.5) for t in row], axis=1))
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


MAX_SIZE = 8192  # side of a synthetic case: 0.75 GiB of working arrays


def write_dataset(
    kind: str, n: int, size: int, out: Path, seed: int = 0, recipe: str | None = None, keep: float = 0.0,
    preview: bool = False, overwrite: bool = False, on_case: Callable[[Case], None] | None = None,
) -> list[Case]:
    """Write ``out/images``, ``out/labels``, ``out/states`` (PNG, same case ids) and a manifest.

    ``preview`` also writes ``out/preview.png`` (a contact sheet of the first 16 cases).
    """
    from PIL import Image

    if kind not in GENERATORS:
        raise perturb.PerturbError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if n < 1 or size < 16:
        raise perturb.PerturbError("need n >= 1 and size >= 16")
    if size > MAX_SIZE:
        need = 12 * size * size / 2**30  # image, label and coarse mask as float32 while a case is made
        raise perturb.PerturbError(f"--size {size}: a case would need about {need:.1f} GiB; at most {MAX_SIZE}")
    if not 0 <= seed < 2**62:
        raise perturb.PerturbError(f"seed must be in 0..2^62-1, not {seed}")
    steps = perturb.parse_recipe(recipe or DEFAULT_RECIPES[kind])
    folders = [out / "images", out / "labels", out / "states"]
    if not overwrite and any(f.exists() and any(f.iterdir()) for f in folders):
        raise OutputError(f"{out}: already holds a dataset; pass --overwrite or choose another --out")
    for folder in folders:
        io.make_folder(folder)
    ref = io.Loaded(np.zeros((size, size)), out / "ref.png")
    cases, rows = [], []
    for k in range(n):
        case = make_case(kind, k, size, seed, steps, keep)
        name = f"{case.case_id}.png"
        with io.atomic_path(out / "images" / name) as tmp:
            Image.fromarray((case.image * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        io.write_mask(out / "labels" / name, case.label, ref)
        soft = case.state.dtype != np.bool_
        io.write_mask(out / "states" / name, case.state, ref, soft=soft)
        rows.append([case.case_id, kind, size, seed, ";".join(case.ops) or "keep"])
        if k < 16:
            cases.append(case)
        if on_case:
            on_case(case)
    io.write_csv(out / "manifest.csv", ["case", "kind", "size", "seed", "ops"], rows)
    if preview:
        with io.atomic_path(out / "preview.png") as tmp:
            Image.fromarray(contact_sheet(cases)).save(tmp, format="PNG")
    return cases
