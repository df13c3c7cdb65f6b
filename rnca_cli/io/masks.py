"""Images and masks as arrays: how stored values are read as intensities and probabilities, and
how a result is written back in its input's geometry.

* :func:`read_image` -> :class:`Loaded` with ``data`` float32 in [0, 1], shape (H, W, C) for 2D or
  (X, Y, Z, C) for 3D, plus ``meta`` (the NIfTI affine and header, or the 2D file's mode).
* :func:`read_mask` -> :class:`Loaded` with ``data`` float32 probability in [0, 1], (H, W) or
  (X, Y, Z). Masks are interpreted as follows (README "Masks"):
    - ``label=N`` given: the mask is a label map, foreground = (value == N);
    - two distinct values 0 and v (any v > 0): binary, foreground = (value == v);
    - more values: a soft mask read as probability: 8-bit / 255, 16-bit / 65535, float as is (must lie
      in [0, 1]). Integer masks whose values look like a label map (at most 16 distinct values, all
      <= 32) and integer NIfTI masks with more than two values are refused: pass ``label=N``.
* :func:`write_mask` writes a binary mask as uint8 0/255 (2D) or uint8 0/1 (NIfTI), or a soft mask as
  uint8 0..255 (2D) or float32 (NIfTI), with the geometry of a reference :class:`Loaded`: the NIfTI
  affine and header are carried over unchanged apart from the data type. 2D masks are written only in
  lossless formats (PNG, TIFF); asking for a lossy suffix is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OutputError
from .atomic import atomic_path
from .formats import LOSSLESS_2D, NIFTI_SUFFIXES, format_of, is_nifti, read_raw, suffix_of


@dataclass
class Loaded:
    """Array data plus what is needed to write a result in the same geometry."""

    data: np.ndarray
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        return is_nifti(self.path)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size per spatial axis (NIfTI header zooms; 1.0 per axis for 2D images)."""
        if "header" in self.meta:
            return tuple(float(z) for z in self.meta["header"].get_zooms()[:3])
        return (1.0, 1.0)


def _to_unit_float(data: np.ndarray, path: Path) -> np.ndarray:
    """Scale stored intensities to float32 in [0, 1] by the dtype's range (float: min-max)."""
    if data.dtype == np.bool_:
        return data.astype(np.float32)
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        if info.min == 0:
            return (data.astype(np.float64) / info.max).astype(np.float32)
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: image contains NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    return (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)


def read_image(path: str | os.PathLike) -> Loaded:
    """Read a 2D image or a NIfTI volume as float32 in [0, 1] with a trailing channel axis.

    2D 8/16-bit integers are divided by their dtype maximum; float data (and signed integers,
    e.g. CT in Hounsfield units) are min-max scaled per file.
    """
    path = Path(path)
    data, meta = read_raw(path)
    if is_nifti(path):
        if data.ndim == 3:
            data = data[..., None]
        elif data.ndim != 4:
            raise InputError(f"{path}: expected a 3D (or 3D + channel) volume, got shape {data.shape}")
    elif data.ndim == 2:
        data = data[..., None]
    return Loaded(_to_unit_float(np.asarray(data), path), path, meta)


def read_images(paths: list[Path]) -> Loaded:
    """Read one image or several single-channel files (nnU-Net channels) stacked as channels."""
    parts = [read_image(p) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        if part.data.shape[:-1] != first.data.shape[:-1]:
            raise InputError(
                f"{part.path}: shape {part.data.shape[:-1]} differs from {first.path} "
                f"{first.data.shape[:-1]} (channels of one case must match)"
            )
    data = np.concatenate([p.data for p in parts], axis=-1) if len(parts) > 1 else first.data
    return Loaded(data, first.path, first.meta)


def _looks_like_label_map(values: np.ndarray) -> bool:
    return len(values) <= 16 and values.max() <= 32


def read_mask(path: str | os.PathLike, label: int | None = None) -> Loaded:
    """Read a mask as float32 probability in [0, 1]; see the module docstring for the rules."""
    path = Path(path)
    raw, meta = read_raw(path)
    if raw.ndim == 3 and not is_nifti(path):
        # Colour masks: accept only when all channels agree (a gray image saved as RGB).
        if not all(np.array_equal(raw[..., 0], raw[..., c]) for c in range(1, raw.shape[2])):
            raise InputError(f"{path}: mask has colour channels that differ; expected a gray mask")
        raw = raw[..., 0]
    if is_nifti(path) and raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != (3 if is_nifti(path) else 2):
        raise InputError(f"{path}: expected a {'3D' if is_nifti(path) else '2D'} mask, got shape {raw.shape}")
    if np.issubdtype(raw.dtype, np.floating) and not np.all(np.isfinite(raw)):
        raise InputError(f"{path}: mask contains NaN or infinite values")
    if label is not None:
        if not np.any(raw == label):
            raise InputError(f"{path}: label {label} does not occur in the mask")
        return Loaded((raw == label).astype(np.float32), path, {**meta, "labels": raw})
    values = np.unique(raw)
    if len(values) <= 2:
        top = values.max() if len(values) else 0
        data = (raw == top).astype(np.float32) if top > 0 else np.zeros(raw.shape, np.float32)
        return Loaded(data, path, meta)
    if np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
        if is_nifti(path) or _looks_like_label_map(values):
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise InputError(
                f"{path}: mask holds several labels ({shown}); pass --label N to pick one"
            )
        if values.min() < 0:
            raise InputError(f"{path}: soft mask has negative values")
        info = np.iinfo(raw.dtype)
        return Loaded((raw.astype(np.float64) / info.max).astype(np.float32), path, meta)
    if values.min() < 0 or values.max() > 1:
        raise InputError(
            f"{path}: soft mask values must lie in [0, 1], found [{values.min():g}, {values.max():g}]"
        )
    return Loaded(raw.astype(np.float32), path, meta)


def output_suffix(reference: Path) -> str:
    """Suffix an output written for ``reference`` gets: the same, or .png for lossy 2D formats."""
    suffix = suffix_of(reference)
    return suffix if suffix in NIFTI_SUFFIXES or suffix in LOSSLESS_2D else ".png"


def write_mask(target: str | os.PathLike, data: np.ndarray, like: Loaded, soft: bool = False) -> Path:
    """Write a mask atomically in the geometry of ``like``.

    ``data`` is binary (bool or 0/1) unless ``soft``, in which case it is a probability in [0, 1].
    Label maps (integer data with values > 1) are written as they are. See module docstring.
    """
    target = Path(target)
    data = np.asarray(data)
    fmt = format_of(target)
    if soft:
        prob = np.clip(data.astype(np.float32), 0.0, 1.0)
    if is_nifti(target):
        if "affine" not in like.meta:
            raise OutputError(f"{target}: a NIfTI output needs a NIfTI reference, got {like.path}")
        out = prob if soft else data.astype(np.uint8)
    elif fmt is None or fmt.write is None:
        raise OutputError(f"{target}: masks are written only as PNG or TIFF, not {suffix_of(target)!r}")
    elif soft:
        out = np.round(prob * 255).astype(np.uint8)
    elif data.dtype == np.bool_ or data.max(initial=0) <= 1:
        out = (data > 0).astype(np.uint8) * 255
    else:
        out = data.astype(np.uint8)  # a label map keeps its values
    with atomic_path(target) as tmp:
        fmt.write(tmp, out, like.meta)
    return target
