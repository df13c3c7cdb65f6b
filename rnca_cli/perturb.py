"""Mask corruption operators: realistic coarse masks made from ground truth, 2D and 3D.

Every operator takes a boolean mask, a ``numpy.random.Generator`` and named strength parameters,
and returns a new mask of the same shape (bool; ``soften`` returns float32 probabilities). A
strength of zero (radius 0, count 0, fraction 0, ...) returns the mask unchanged. Operators:

==========  ==================================  ==========================================================
name        parameters (default)                effect
==========  ==================================  ==========================================================
erode       radius (1)                          binary erosion with a disk / ball
dilate      radius (1)                          binary dilation
open        radius (1)                          opening: removes parts thinner than the element
close       radius (1)                          closing: fills gaps narrower than the element
thin        fraction (0.75), radius (1)         thin structures (what an opening of ``radius`` removes)
                                                are cut into pieces; ``fraction`` of the pieces vanish
holes       count (3), size (0.2)               rectangles and disks/balls (half each, overlapping)
                                                cut out, each up to ``size`` x the object's extent
breaks      count (2), length (4), density (0)  gaps of ``length`` pixels (more where the object is
                                                thicker, so the gap severs it) cut at points of its
                                                skeleton kept at least 2 x length apart
specks      count (4), size (1), near (0.5),    small spurious blobs of radius ``size``, a share
            density (0)                         ``near`` of them close to the object, none touching it
drop        fraction (0.5)                      that share of the connected components removed (one is
                                                always kept)
jitter      amplitude (1.5), smoothness (4)     the contour moved in and out by a smooth random field
                                                (amplitude in pixels, correlation length ``smoothness``)
soften      sigma (1.0)                         a soft probability mask: Gaussian blur of the mask
==========  ==================================  ==========================================================

A recipe mixes operators at random: ``"breaks:0.5,holes:0.3:count=5,specks:0.3"`` applies each
operator with the given probability, in the order written (``soften`` always last). Parameters may
follow the probability as ``:key=value``. With probability ``keep`` a mask is left untouched;
otherwise, if no operator fired, one is drawn with weights proportional to the probabilities, so
every output that is not kept is really corrupted.

``count`` is absolute, which suits one patch but not a whole image. ``density`` scales with the
object instead: it is the expected number of breaks or specks per 100 pixels of the mask's
centreline (its skeleton), rounded at random to a whole count, so ``breaks:1:density=0.5`` cuts
a 64x64 ring patch about once and a full 565x584 vessel tree about 40 times. A density replaces
``count``; giving both is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from .errors import UsageError


class PerturbError(UsageError):
    """An unknown operator, a malformed recipe, or a parameter out of range."""


def ball(radius: float, ndim: int) -> np.ndarray:
    """Disk (2D) or ball (3D) structuring element of the given radius."""
    r = int(math.ceil(radius))
    grid = np.mgrid[(slice(-r, r + 1),) * ndim]
    return (grid**2).sum(0) <= radius**2 + 1e-9


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))


# -- the operators -------------------------------------------------------------------------------


def erode(mask, rng, radius: float = 1):
    return mask.copy() if radius == 0 else ndimage.binary_erosion(mask, ball(radius, mask.ndim))


def dilate(mask, rng, radius: float = 1):
    return mask.copy() if radius == 0 else ndimage.binary_dilation(mask, ball(radius, mask.ndim))


def open_(mask, rng, radius: float = 1):
    if radius == 0:
        return mask.copy()
    return ndimage.binary_opening(np.pad(mask, int(math.ceil(radius))), ball(radius, mask.ndim))[_crop(mask, radius)]


def close(mask, rng, radius: float = 1):
    if radius == 0:
        return mask.copy()
    return ndimage.binary_closing(np.pad(mask, int(math.ceil(radius))), ball(radius, mask.ndim))[_crop(mask, radius)]


def _crop(mask, radius):
    r = int(math.ceil(radius))
    return tuple(slice(r, r + n) for n in mask.shape)


def thin(mask, rng, fraction: float = 0.75, radius: float = 1):
    """Remove ``fraction`` of the pieces of thin structure (what an opening removes).

    The thin part is split into pieces, one per connected component and 6x6 grid cell, so that
    "a fraction of thin structures" means many short segments rather than one whole vessel tree.
    """
    if fraction == 0 or radius == 0:
        return mask.copy()
    thin_part = mask & ~open_(mask, rng, radius)
    labels, n = _components(thin_part)
    if n == 0:
        return mask.copy()
    coords = np.argwhere(thin_part)
    cells = np.ravel_multi_index(tuple((coords // 6).T), tuple(-(-np.array(mask.shape) // 6)))
    _, piece = np.unique(labels[thin_part].astype(np.int64) * (cells.max() + 1) + cells, return_inverse=True)
    gone = rng.random(piece.max() + 1) < fraction
    out = mask.copy()
    out[tuple(coords[gone[piece]].T)] = False
    return out


def holes(mask, rng, count: int = 3, size: float = 0.2):
    """Cut ``count`` rectangles / disks (balls) centred on random foreground pixels."""
    out = mask.copy()
    points = np.argwhere(mask)
    if count == 0 or size == 0 or len(points) == 0:
        return out
    extent = points.max(0) - points.min(0) + 1
    grid = np.indices(mask.shape)
    for _ in range(int(count)):
        centre = points[rng.integers(len(points))]
        half = np.maximum(1.0, rng.uniform(0.3, 1.0, mask.ndim) * size * extent / 2)
        offset = grid - centre.reshape((-1,) + (1,) * mask.ndim)
        if rng.random() < 0.5:
            cut = np.all(np.abs(offset) <= half.reshape((-1,) + (1,) * mask.ndim), axis=0)
        else:
            radius = float(half.mean())
            cut = (offset**2).sum(0) <= radius**2
        out &= ~cut
    return out


def centreline_count(mask: np.ndarray, density: float, rng: np.random.Generator) -> int:
    """``density`` per 100 px of ``mask``'s skeleton as a whole number, rounded at random (mean kept)."""
    from skimage.morphology import skeletonize

    expected = density * int(skeletonize(np.pad(mask, 1)).sum()) / 100.0
    return int(math.floor(expected) + (rng.random() < expected - math.floor(expected)))


def breaks(mask, rng, count: int = 2, length: float = 4, density: float = 0):
    """Cut ``count`` gaps at points of the skeleton at least 2 x length apart.

    Each gap is a disk / ball of diameter ``length``, widened to the local thickness + 2 where the
    object is thicker, so that it really cuts through. A cut that does not change the topology
    (a gap at a tip only shortens it) is undone and another point tried, up to 30 points per gap.
    With ``density`` > 0 the count is that many gaps per 100 px of skeleton (module docstring).
    """
    if density > 0 and mask.any():
        count = centreline_count(mask, density, rng)
    if count == 0 or length == 0 or not mask.any():
        return mask.copy()
    from skimage.measure import euler_number
    from skimage.morphology import skeletonize

    half_width = ndimage.distance_transform_edt(mask)
    candidates = np.argwhere(skeletonize(np.pad(mask, 1))[(slice(1, -1),) * mask.ndim])
    if len(candidates) == 0:  # skeletonize can return nothing for even-width 3D tubes: use the EDT ridge
        ridge = (half_width == ndimage.maximum_filter(half_width, size=3)) & mask
        candidates = np.argwhere(ridge)

    def topology(m):
        return _components(m)[1], euler_number(np.pad(m, 1), connectivity=m.ndim)

    out = mask.copy()
    chosen: list[np.ndarray] = []
    order = iter(rng.permutation(len(candidates)))
    for _ in range(int(count)):
        before, fallback = topology(out), None
        for _attempt, index in zip(range(30), order):
            point = candidates[index]
            if any(np.linalg.norm(point - c) < 2 * length for c in chosen):
                continue
            cut = _cut_ball(out, point, max(length / 2, float(half_width[tuple(point)]) + 1))
            if fallback is None:
                fallback = (point, cut)
            if topology(cut) != before:
                fallback = (point, cut)
                break
        if fallback is None:
            break
        chosen.append(fallback[0])
        out = fallback[1]
    return out


def _cut_ball(mask: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` with every pixel within ``radius`` of ``centre`` removed (work in a local box)."""
    r = int(math.ceil(radius))
    box = tuple(slice(max(0, c - r), min(n, c + r + 1)) for c, n in zip(centre, mask.shape))
    grid = np.indices(tuple(b.stop - b.start for b in box))
    offset = np.array([c - b.start for c, b in zip(centre, box)]).reshape((-1,) + (1,) * mask.ndim)
    out = mask.copy()
    out[box] &= ((grid - offset) ** 2).sum(0) > radius**2
    return out


def specks(mask, rng, count: int = 4, size: float = 1, near: float = 0.5, density: float = 0):
    """Add ``count`` blobs of radius ``size`` that touch neither the object nor each other.

    With ``density`` > 0 the count is that many specks per 100 px of skeleton (module docstring).
    """
    if density > 0 and mask.any():
        count = centreline_count(mask, density, rng)
    out = mask.copy()
    if count == 0:
        return out
    element = ball(size, mask.ndim)
    reach = int(math.ceil(size)) + 1
    forbidden = ndimage.binary_dilation(mask, ball(reach + 1, mask.ndim)) if mask.any() else np.zeros_like(mask)
    close_zone = ndimage.binary_dilation(mask, ball(3 * reach + 4, mask.ndim)) & ~forbidden if mask.any() else None
    placed = 0
    for _ in range(int(count) * 20):  # bounded tries: a crowded mask may take fewer specks
        if placed == count:
            break
        zone = close_zone if close_zone is not None and close_zone.any() and rng.random() < near else ~forbidden
        candidates = np.argwhere(zone)
        if len(candidates) == 0:
            break
        centre = candidates[rng.integers(len(candidates))]
        blob = np.zeros_like(mask)
        blob[tuple(centre)] = True
        blob = ndimage.binary_dilation(blob, element)
        if (blob & forbidden).any():
            continue
        out |= blob
        forbidden |= ndimage.binary_dilation(blob, ball(2, mask.ndim))
        placed += 1
    return out


def drop(mask, rng, fraction: float = 0.5):
    """Remove ``fraction`` of the connected components, always keeping at least one."""
    labels, n = _components(mask)
    if fraction == 0 or n <= 1:
        return mask.copy()
    k = min(n - 1, int(round(fraction * n)))
    gone = rng.permutation(n)[:k] + 1
    return mask & ~np.isin(labels, gone)


def jitter(mask, rng, amplitude: float = 1.5, smoothness: float = 4):
    """Move the contour by a smooth random displacement field of about ``amplitude`` pixels."""
    if amplitude == 0 or not mask.any():
        return mask.copy()
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    signed = np.where(mask, inside - 0.5, 0.5 - outside)  # > 0 inside
    field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), smoothness)
    field *= amplitude / max(float(np.abs(field).max()), 1e-12)
    return signed + field > 0


def soften(mask, rng, sigma: float = 1.0):
    """A soft probability mask: the mask blurred with a Gaussian of ``sigma`` pixels."""
    prob = mask.astype(np.float32)
    return prob if sigma == 0 else np.clip(ndimage.gaussian_filter(prob, sigma), 0, 1).astype(np.float32)


@dataclass(frozen=True)
class Operator:
    function: Callable
    params: dict[str, tuple[float, float, float, type]]  # name -> (default, min, max, type)


OPERATORS: dict[str, Operator] = {
    "erode": Operator(erode, {"radius": (1, 0, 20, float)}),
    "dilate": Operator(dilate, {"radius": (1, 0, 20, float)}),
    "open": Operator(open_, {"radius": (1, 0, 20, float)}),
    "close": Operator(close, {"radius": (1, 0, 20, float)}),
    "thin": Operator(thin, {"fraction": (0.75, 0, 1, float), "radius": (1, 0, 10, float)}),
    "holes": Operator(holes, {"count": (3, 0, 100, int), "size": (0.2, 0, 1, float)}),
    "breaks": Operator(breaks, {"count": (2, 0, 100, int), "length": (4, 0, 100, float), "density": (0, 0, 50, float)}),
    "specks": Operator(
        specks, {"count": (4, 0, 1000, int), "size": (1, 0, 20, float), "near": (0.5, 0, 1, float), "density": (0, 0, 50, float)}
    ),
    "drop": Operator(drop, {"fraction": (0.5, 0, 1, float)}),
    "jitter": Operator(jitter, {"amplitude": (1.5, 0, 20, float), "smoothness": (4, 0.5, 50, float)}),
    "soften": Operator(soften, {"sigma": (1.0, 0, 20, float)}),
}


def check_params(name: str, params: dict) -> dict:
    """Fill defaults and validate ranges and types; raises PerturbError."""
    if name not in OPERATORS:
        raise PerturbError(f"unknown operator {name!r}; valid: {', '.join(OPERATORS)}")
    spec = OPERATORS[name].params
    unknown = set(params) - set(spec)
    if unknown:
        raise PerturbError(f"{name}: unknown parameter(s) {', '.join(sorted(unknown))}; valid: {', '.join(spec)}")
    if "count" in params and "density" in params:
        raise PerturbError(f"{name}: give count or density, not both (density replaces count)")
    out = {}
    for key, (default, lo, hi, kind) in spec.items():
        raw = params.get(key, default)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not (lo <= value <= hi) or (kind is int and value != int(value)):
            raise PerturbError(f"{name}: {key}={raw!r} out of range; expected {kind.__name__} in [{lo}, {hi}]")
        out[key] = int(value) if kind is int else value
    return out


def apply(name: str, mask: np.ndarray, rng: np.random.Generator, **params) -> np.ndarray:
    """Apply one operator by name with validated parameters to a binary mask."""
    mask = np.asarray(mask) != 0
    return OPERATORS[name].function(mask, rng, **check_params(name, params))


@dataclass(frozen=True)
class Step:
    name: str
    probability: float
    params: dict = field(default_factory=dict)


def parse_recipe(text: str) -> list[Step]:
    """``"breaks:0.5,holes:0.3:count=5"`` -> steps; raises PerturbError with the valid names."""
    steps = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, *rest = item.split(":")
        name = name.strip().lower()
        probability = 1.0
        params = {}
        for part in rest:
            if "=" in part:
                key, _, value = part.partition("=")
                params[key.strip()] = value.strip()
            else:
                try:
                    probability = float(part)
                except ValueError:
                    raise PerturbError(f"{item!r}: {part!r} is neither a probability nor key=value") from None
        if not 0 <= probability <= 1:
            raise PerturbError(f"{item!r}: probability {probability} outside [0, 1]")
        steps.append(Step(name, probability, check_params(name, params)))
    if not steps:
        raise PerturbError(f"empty recipe; name operators from: {', '.join(OPERATORS)}")
    return sorted(steps, key=lambda s: s.name == "soften")  # stable: soften last


def apply_recipe(
    mask: np.ndarray, steps: list[Step], rng: np.random.Generator, keep: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """Corrupt ``mask`` by a random mixture (module docstring). Returns (mask, applied ops as text)."""
    mask = np.asarray(mask) != 0
    if not 0 <= keep <= 1:
        raise PerturbError(f"keep {keep} outside [0, 1]")
    if rng.random() < keep:
        return mask.copy(), []
    fired = [s for s in steps if rng.random() < s.probability]
    if not fired:
        weights = np.array([s.probability for s in steps], float)
        if weights.sum() > 0:
            fired = [steps[int(rng.choice(len(steps), p=weights / weights.sum()))]]
    out = mask
    for step in fired:
        out = OPERATORS[step.name].function(out, rng, **step.params)
    return out, [f"{s.name}({','.join(f'{k}={v:g}' for k, v in s.params.items())})" for s in fired]


# -- folders -------------------------------------------------------------------------------------


def perturb_folder(
    labels: Path, out: Path, n: int, recipe: str, keep: float = 0.0, seed: int = 0, label: int | None = None,
    overwrite: bool = False, on_output: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write ``n`` corrupted masks per label file as ``out/<case>_<k>.<suffix>`` plus ``manifest.csv``.

    Outputs keep the input's format and geometry (NIfTI affine and header). Output ``k`` of case
    ``c`` draws from ``default_rng([seed, crc32(c), k])``: the same seed gives the same files, in
    any order and for any subset of cases. Every label is read and checked before anything is
    written: labels must be binary (two values) unless ``label`` picks one value of a label map.
    """
    import zlib

    from . import io

    steps = parse_recipe(recipe)
    if n < 1:
        raise PerturbError(f"--n must be >= 1, got {n}")
    if not 0 <= seed < 2**62:
        raise PerturbError(f"seed must be in 0..2^62-1, not {seed}")
    if not 0 <= keep <= 1:
        raise PerturbError(f"--keep {keep} outside [0, 1]")
    files = io.list_files(labels)
    if not files:
        raise io.InputError(f"{labels}: no label files ({', '.join(io.SUPPORTED_SUFFIXES)})")
    io.refuse_input_folders(out, [labels], "--out")
    plan = []
    for path in files:
        loaded = io.read_mask(path, label=label)
        if label is None and not np.isin(loaded.data, (0.0, 1.0)).all():
            raise io.InputError(f"{path}: label is not binary (soft or several labels); pass --label N")
        cid = io.case_id(path)
        targets = [out / f"{cid}_{k}{io.output_suffix(path)}" for k in range(n)]
        for target in targets + [out / "manifest.csv"]:
            if target.exists() and not overwrite:
                raise io.OutputError(f"{target}: already exists; pass --overwrite to replace it")
        plan.append((path, cid, targets))
    io.make_folder(out)
    rows, written = [], []
    for path, cid, targets in plan:
        loaded = io.read_mask(path, label=label)
        mask = loaded.data >= 0.5
        for k, target in enumerate(targets):
            rng = np.random.default_rng([seed, zlib.crc32(cid.encode()), k])
            result, ops = apply_recipe(mask, steps, rng, keep)
            io.write_mask(target, result, loaded, soft=result.dtype != np.bool_)
            rows.append([target.name, cid, k, ";".join(ops) or "keep"])
            written.append(target)
            if on_output:
                on_output(target)
    io.write_csv(out / "manifest.csv", ["output", "case", "k", "ops"], rows)
    return written
