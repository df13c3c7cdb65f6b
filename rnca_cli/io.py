"""Reading and writing images, masks and volumes; pairing folders by case id; atomic writes.

One contract for every format (a suffix registry picks the backend):

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
* Every write goes to a temporary file in the target folder and is renamed into place.
"""

from __future__ import annotations

import csv
import io as _io
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import InputError, OutputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp")
LOSSLESS_2D = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES
# nnU-Net names the channels of an image <case>_0000, <case>_0001, ...
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


# -- names ---------------------------------------------------------------------------------------


def suffix_of(path: str | os.PathLike) -> str:
    """The file's format suffix, lower case; ``.nii.gz`` counts as one suffix."""
    name = Path(path).name.lower()
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def case_id(path: str | os.PathLike) -> str:
    """File name without its format suffix (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    return name[: len(name) - len(suffix_of(path))]


def is_nifti(path: str | os.PathLike) -> bool:
    return suffix_of(path) in NIFTI_SUFFIXES


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    if suffix_of(path) not in SUPPORTED_SUFFIXES:
        raise InputError(
            f"{path}: unsupported file type {suffix_of(path)!r}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )


# -- raw readers (one per backend) ---------------------------------------------------------------


def _read_raw(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Array as stored (no scaling) and metadata. 2D: (H, W) or (H, W, C); NIfTI: as in the file."""
    _check_readable(path)
    if is_nifti(path):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:  # nibabel raises many types for corrupt files
            raise InputError(f"{path}: cannot read NIfTI file ({exc})") from None
        return data, {"affine": img.affine.copy(), "header": img.header.copy()}
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("LA", "PA"):
                im = im.convert("L")
            elif mode == "CMYK" or mode == "YCbCr":
                im = im.convert("RGB")
            elif mode == "1":
                im = im.convert("L")
            data = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None
    if data.ndim == 3 and data.shape[2] == 4:
        data = data[..., :3]  # alpha dropped
    if mode == "P" and data.ndim == 3 and (data == data[..., :1]).all():
        data = data[..., 0]  # a gray palette (GIF) is a gray image
    return data, {"mode": mode}


def peek_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Spatial shape from the file header alone (no pixel data read): (H, W) or (X, Y, Z)."""
    path = Path(path)
    _check_readable(path)
    try:
        if is_nifti(path):
            import nibabel as nib

            return tuple(int(n) for n in nib.load(str(path)).shape[:3])
        from PIL import Image

        with Image.open(path) as im:
            return (im.height, im.width)
    except Exception as exc:
        raise InputError(f"{path}: cannot read file header ({exc})") from None


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


# -- public readers ------------------------------------------------------------------------------


def read_image(path: str | os.PathLike) -> Loaded:
    """Read a 2D image or a NIfTI volume as float32 in [0, 1] with a trailing channel axis.

    2D 8/16-bit integers are divided by their dtype maximum; float data (and signed integers,
    e.g. CT in Hounsfield units) are min-max scaled per file.
    """
    path = Path(path)
    data, meta = _read_raw(path)
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
    raw, meta = _read_raw(path)
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


# -- writing -------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success.

    The temporary name keeps the target's suffix so format-by-suffix writers behave the same.
    On any exception the temporary file is removed and ``target`` is left as it was. An operating
    system error while writing (no permission, disk full, a read-only or special file system)
    becomes an :class:`OutputError` naming ``target``: every file rnca writes goes through here.
    """
    target = Path(target)
    if not target.parent.is_dir():
        raise OutputError(f"{target}: folder {target.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix_of(target)}", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write in {target.parent} ({_os_reason(exc)})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes private (0600) files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{target}: cannot write ({_os_reason(exc)})") from None
        raise


def make_folder(path: str | os.PathLike) -> Path:
    """Create an output folder and its parents if missing; an :class:`OutputError` naming it if
    that fails (a file in the way, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the folder ({_os_reason(exc)})") from None
    return path


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write a CSV atomically; floats with 6 significant digits, NaN as ``nan``, None as empty."""
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_csv_cell(v) for v in row] for row in rows])
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return path


def check_writable(target: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; refuse a missing folder."""
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: folder {target.parent} does not exist")


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
    suffix = suffix_of(target)
    data = np.asarray(data)
    if soft:
        prob = np.clip(data.astype(np.float32), 0.0, 1.0)
    if is_nifti(target):
        import nibabel as nib

        if "affine" not in like.meta:
            raise OutputError(f"{target}: a NIfTI output needs a NIfTI reference, got {like.path}")
        out = prob if soft else data.astype(np.uint8)
        header = like.meta["header"].copy()
        header.set_data_dtype(out.dtype)
        img = nib.Nifti1Image(out, like.meta["affine"], header=header)
        img.header.set_slope_inter(1.0, 0.0)  # stored values are the values
        with atomic_path(target) as tmp:
            nib.save(img, str(tmp))
        return target
    if suffix not in LOSSLESS_2D:
        raise OutputError(f"{target}: masks are written only as PNG or TIFF, not {suffix!r}")
    from PIL import Image

    if soft:
        out = np.round(prob * 255).astype(np.uint8)
    elif data.dtype == np.bool_ or data.max(initial=0) <= 1:
        out = (data > 0).astype(np.uint8) * 255
    else:
        out = data.astype(np.uint8)  # a label map keeps its values
    with atomic_path(target) as tmp:
        Image.fromarray(out).save(tmp, format=LOSSLESS_2D[suffix])
    return target


# -- folders -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One case of a folder pairing: image file(s) (several = channels) and its mask."""

    case_id: str
    images: list[Path]
    mask: Path


@dataclass
class Pairing:
    cases: list[Case]
    unmatched_images: list[Path]
    unmatched_masks: list[Path]


def list_files(folder: str | os.PathLike) -> list[Path]:
    """Supported files in a folder (not recursive, hidden files skipped), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and suffix_of(p) in SUPPORTED_SUFFIXES
    )


def pair_folders(image_dir: str | os.PathLike, mask_dir: str | os.PathLike) -> Pairing:
    """Pair images with masks by case id.

    An image pairs with the mask of the same case id. Failing that, images named
    ``<case>_0000``, ``<case>_0001``, ... (nnU-Net's channel naming) pair with mask ``<case>``,
    their files stacked as channels in that order. Everything left over is reported.
    """
    images = list_files(image_dir)
    masks = {case_id(m): m for m in list_files(mask_dir)}
    by_case: dict[str, list[Path]] = {}
    unmatched_images = []
    for image in images:
        cid = case_id(image)
        if cid in masks:
            by_case.setdefault(cid, []).append(image)
            continue
        match = _CHANNEL_SUFFIX.match(cid)
        if match and match["case"] in masks:
            by_case.setdefault(match["case"], []).append(image)
        else:
            unmatched_images.append(image)
    cases = [Case(cid, sorted(files), masks[cid]) for cid, files in sorted(by_case.items())]
    unmatched_masks = [m for cid, m in sorted(masks.items()) if cid not in by_case]
    return Pairing(cases, unmatched_images, unmatched_masks)
