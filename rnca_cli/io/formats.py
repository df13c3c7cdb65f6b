"""File formats: a registry of readers and writers by suffix.

Each :class:`Format` knows its suffixes, whether it holds a 2D image or a volume, whether masks
may be written in it (lossless), and how to read its raw array, read its shape from the header
alone, and write an array. :func:`format_of` looks a path up by its suffix (``.nii.gz`` counts as
one suffix). Adding a format is one :class:`Format` and one :func:`register` call.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError

Raw = tuple[np.ndarray, dict[str, Any]]  # the array as stored, and what is needed to write alike


@dataclass(frozen=True)
class Format:
    """One file format. ``read(path)`` -> (array as stored, metadata); ``shape(path)`` -> the
    spatial shape from the header; ``write(path, array, meta)`` (None: masks are never written in
    it, e.g. a lossy format)."""

    name: str
    suffixes: tuple[str, ...]
    volume: bool
    read: Callable[[Path], Raw]
    shape: Callable[[Path], tuple[int, ...]]
    write: Callable[[Path, np.ndarray, dict[str, Any]], None] | None


FORMATS: dict[str, Format] = {}  # suffix -> format


def register(fmt: Format) -> None:
    for suffix in fmt.suffixes:
        FORMATS[suffix] = fmt


def suffix_of(path: str | os.PathLike) -> str:
    """The file's format suffix, lower case; ``.nii.gz`` counts as one suffix."""
    name = Path(path).name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def case_id(path: str | os.PathLike) -> str:
    """File name without its format suffix (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    return name[: len(name) - len(suffix_of(path))]


def format_of(path: str | os.PathLike) -> Format | None:
    return FORMATS.get(suffix_of(path))


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a volume format (NIfTI)."""
    fmt = format_of(path)
    return fmt is not None and fmt.volume


def checked_format(path: Path) -> Format:
    """The format of an input file that exists; an :class:`InputError` naming it otherwise."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    fmt = format_of(path)
    if fmt is None:
        raise InputError(f"{path}: unsupported file type {suffix_of(path)!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def read_raw(path: Path) -> Raw:
    """Array as stored (no scaling) and metadata. 2D: (H, W) or (H, W, C); NIfTI: as in the file."""
    return checked_format(path).read(path)


def peek_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Spatial shape from the file header alone (no pixel data read): (H, W) or (X, Y, Z)."""
    path = Path(path)
    fmt = checked_format(path)
    try:
        return fmt.shape(path)
    except InputError:
        raise
    except Exception as exc:  # each backend raises its own types for a damaged header
        raise InputError(f"{path}: cannot read file header ({exc})") from None


def peek_spacing(path: str | os.PathLike) -> tuple[float, ...] | None:
    """Voxel spacing from a NIfTI header (its zooms; no voxel data read); None for 2D images."""
    path = Path(path)
    if not is_nifti(path):
        return None
    import nibabel as nib

    try:
        return tuple(float(z) for z in nib.load(str(path)).header.get_zooms()[:3])
    except Exception as exc:
        raise InputError(f"{path}: cannot read file header ({exc})") from None


# -- NIfTI (nibabel) ------------------------------------------------------------------------------


def _read_nifti(path: Path) -> Raw:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot read NIfTI file ({exc})") from None
    return data, {"affine": img.affine.copy(), "header": img.header.copy()}


def _nifti_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(int(n) for n in nib.load(str(path)).shape[:3])


def _write_nifti(path: Path, data: np.ndarray, meta: dict[str, Any]) -> None:
    """``data`` with the reference's affine and header (its data type set to ``data``'s)."""
    import nibabel as nib

    header = meta["header"].copy()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, meta["affine"], header=header)
    img.header.set_slope_inter(1.0, 0.0)  # stored values are the values
    nib.save(img, str(path))


# -- 2D images (Pillow) -----------------------------------------------------------------------------


@contextmanager
def _opened(path: Path):
    """``Image.open`` for rnca: an image too large to be anything but a decompression bomb is one
    :class:`InputError` line in every command, and a large but plausible one opens without Pillow's
    raw warning lines."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused as a decompression bomb ({exc})") from None


def _read_pillow(path: Path) -> Raw:
    from PIL import UnidentifiedImageError

    try:
        with _opened(path) as im:
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("LA", "PA", "1"):
                im = im.convert("L")
            elif mode in ("CMYK", "YCbCr"):
                im = im.convert("RGB")
            data = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None
    if data.ndim == 3 and data.shape[2] == 4:
        data = data[..., :3]  # alpha dropped
    if mode == "P" and data.ndim == 3 and (data == data[..., :1]).all():
        data = data[..., 0]  # a gray palette (GIF) is a gray image
    return data, {"mode": mode}


def _pillow_shape(path: Path) -> tuple[int, ...]:
    with _opened(path) as im:
        return (im.height, im.width)


def _pillow_writer(pil_format: str):
    def write(path: Path, data: np.ndarray, meta: dict[str, Any]) -> None:
        from PIL import Image

        Image.fromarray(data).save(path, format=pil_format)

    return write


register(Format("NIfTI", (".nii.gz", ".nii"), True, _read_nifti, _nifti_shape, _write_nifti))
register(Format("PNG", (".png",), False, _read_pillow, _pillow_shape, _pillow_writer("PNG")))
register(Format("TIFF", (".tif", ".tiff"), False, _read_pillow, _pillow_shape, _pillow_writer("TIFF")))
register(Format("2D image (read only)", (".gif", ".jpg", ".jpeg", ".bmp"), False, _read_pillow, _pillow_shape, None))

NIFTI_SUFFIXES = tuple(s for s, f in FORMATS.items() if f.volume)
IMAGE_SUFFIXES = tuple(s for s, f in FORMATS.items() if not f.volume)
LOSSLESS_2D = {s: f.name for s, f in FORMATS.items() if not f.volume and f.write is not None}
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES
