"""Writing files safely: every output goes to a temporary file beside its target and is renamed
into place, so a file is either complete or absent; OS failures become one-line
:class:`~rnca_cli.errors.OutputError` s naming the output. A run that writes many files into one
folder holds it (:func:`claim_folder`), so that two runs never interleave their files, and may
sweep the temporaries a killed run left there (:func:`sweep_temporaries`)."""

from __future__ import annotations

import csv
import io as _io
import math
import os
import re
import socket
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


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*$")  # atomic_path's names (mkstemp: 8 random)


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` when a run was killed
    mid-write; returns them. Call it only while holding the folder (:func:`claim_folder`), so
    that no running writer's file is taken."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = [p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


LOCK_NAME = ".rnca.lock"


@contextmanager
def claim_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder`` for one run: a lock file created exclusively, holding this process's host
    and pid, removed on exit. A second run is refused with one line; a lock left by a killed run
    on this host (its pid is gone) is taken over."""
    folder = make_folder(folder)
    lock = folder / LOCK_NAME
    me = f"{socket.gethostname()} {os.getpid()}\n"
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = (lock.read_text(errors="replace").strip() if lock.exists() else "").partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # left by a run that was killed
                continue
            raise OutputError(f"{folder}: another rnca run ({host or 'unknown host'}, pid {pid or '?'}) is writing "
                              f"here; wait for it, or remove {lock} if no run is") from None
        except OSError as exc:
            raise OutputError(f"{folder}: cannot claim the folder ({_os_reason(exc)})") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        break
    else:
        raise OutputError(f"{folder}: could not claim the folder; remove {lock} if no run is writing there")
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def refuse_input_folders(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str) -> None:
    """Refuse an output folder that is one of the input folders or lies inside one: no command
    writes into its inputs. ``option`` names the output option in the message."""
    target = Path(output).resolve()
    for folder in filter(None, inputs):
        folder = Path(folder)
        if folder.is_dir() and (target == folder.resolve() or folder.resolve() in target.parents):
            raise OutputError(f"{output}: is {'inside ' if target != folder.resolve() else ''}the input folder "
                              f"{folder}; inputs are never written to, choose another {option}")


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
