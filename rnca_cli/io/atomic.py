"""Writing files safely: every output goes to a temporary file beside its target and is renamed
into place, so a file is either complete or absent; OS failures become one-line
:class:`~rnca_cli.errors.OutputError` s naming the output."""

from __future__ import annotations

import csv
import io as _io
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import OutputError
from .formats import suffix_of


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


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def check_writable(target: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; refuse a missing folder."""
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: folder {target.parent} does not exist")
