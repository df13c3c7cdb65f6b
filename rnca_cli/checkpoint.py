"""Checkpoint files: one ``.pt`` that rebuilds a model on its own, and the shipped model names.

A checkpoint is a plain dict saved with ``torch.save``::

    {"format": "rnca-checkpoint", "format_version": 1,
     "config": ModelConfig.to_dict(), "state_dict": {...tensors...},
     "provenance": {"rnca_version", "created", "data", "iterations", ...},
     "refine": {"min_size": int, "guard_change": float, "guard_agreement": float},  # optional: refine's defaults
     "training": {...}}  # only in a run's last.pt: what --resume continues from

It holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``:
files that need arbitrary unpickling are refused, never executed. ``weights_sha256`` (written since
rnca 0.1.0's engines release) is a digest of the weights, verified on load; weights that are not
finite are refused.

Shipped models live in ``models/`` of the source tree, installed as the package data folder
``rnca_cli/models`` in a wheel; :func:`resolve_model` finds a name (``rings``) in either place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, OutputError
from .io import atomic_path
from .model import RNCA, ModelConfig

FORMAT = "rnca-checkpoint"
FORMAT_VERSION = 1
DEFAULT_MODEL = "rings"


def model_dirs() -> list[Path]:
    """Folders searched for shipped models: the installed package data, then a source checkout."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "models", here.parent / "models") if d.is_dir()]


def available_models() -> dict[str, Path]:
    """Shipped model names -> files (first folder wins)."""
    found: dict[str, Path] = {}
    for folder in model_dirs():
        for file in sorted(folder.glob("*.pt")):
            found.setdefault(file.stem, file)
    return found


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A path to an existing file is used as is; otherwise the name of a shipped model."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = available_models()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    if path.suffix == ".pt" or os.sep in str(name_or_path):
        raise CheckpointError(f"{path}: no such model file")
    names = ", ".join(sorted(shipped)) or "none installed"
    raise CheckpointError(f"{name_or_path}: not a model file nor a shipped model name (shipped: {names})")


def save_checkpoint(
    path: str | os.PathLike, model: RNCA, provenance: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None, refine: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with its config and provenance atomically to ``path``; ``training``, if
    given, is the state ``rnca train --resume`` continues from (tensors and plain values only);
    ``refine`` holds the refine defaults the model carries (``min_size``)."""
    from . import __version__

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "provenance": {
            "rnca_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        },
    }
    payload["weights_sha256"] = weights_digest(payload["state_dict"])
    if refine:
        payload["refine"] = dict(refine)
    if training is not None:
        payload["training"] = training
    return _write(payload, Path(path))


def _write(payload: dict[str, Any], path: Path) -> Path:
    """``torch.save`` through an atomic temporary file. PyTorch reports a failed write (a full
    disk) as a RuntimeError from its zip writer; it becomes an OutputError naming ``path``."""
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OutputError(f"{path}: cannot write the checkpoint (is the disk full? {reason})") from None
    return path


def set_refine_defaults(path: str | os.PathLike, values: dict[str, Any]) -> Path:
    """Update the refine defaults stored in checkpoint ``path`` (the weights stay as they are)."""
    payload = read_checkpoint(path)
    payload["refine"] = {**payload.get("refine", {}), **values}
    return _write(payload, Path(path))


def export_model(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the checkpoint ``source`` (a run's ``last.pt`` or ``best.pt``) to ``out`` as a model to
    ship: weights, config, provenance and refine defaults, without the training state ``--resume``
    needs (the pool and optimizer, a thousand times the weights' size)."""
    out = Path(out)
    payload = read_checkpoint(source)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    payload.pop("training", None)
    return _write(payload, out)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, shapes, dtypes and bytes, in key order."""
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate the checkpoint dict (weights_only); raise CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (not a torch.save zip archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln or "WeightsUnpickler" in ln]
        reason = lines[0].replace("WeightsUnpickler error: ", "").split(". ")[0] if lines else "arbitrary Python objects"
        raise CheckpointError(
            f"{path}: refused: the file needs unsafe unpickling, not an rnca checkpoint ({reason})"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rnca checkpoint (no '{FORMAT}' marker)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported (this rnca reads {FORMAT_VERSION})"
        )
    for key in ("config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: rnca checkpoint is missing '{key}'")
    stored = payload.get("weights_sha256")  # files written before digests were stored have none
    if stored is not None and stored != weights_digest(payload["state_dict"]):
        raise CheckpointError(f"{path}: damaged: the weights do not match the digest stored with them")
    for name, tensor in payload["state_dict"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: refused: weight {name} holds NaN or infinite values")
    refine = payload.get("refine", {})
    if not _valid_refine_defaults(refine):
        raise CheckpointError(f"{path}: refine defaults {refine!r} are not valid (min_size: an integer >= 0, "
                              "guard_change > 0, guard_agreement in [0, 1])")
    return payload


def _valid_refine_defaults(refine: Any) -> bool:
    if not isinstance(refine, dict):
        return False
    size, change, agreement = refine.get("min_size", 0), refine.get("guard_change", 1.0), refine.get("guard_agreement", 1.0)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (change, agreement))
    return (isinstance(size, int) and size >= 0 and numbers and 0 < change < math.inf and 0 <= agreement <= 1)


def load_checkpoint(path: str | os.PathLike) -> tuple[RNCA, dict[str, Any]]:
    """Rebuild the model from a checkpoint file. Returns (model in eval mode on CPU, provenance);
    the model's ``refine_defaults`` attribute holds the checkpoint's refine defaults."""
    payload = read_checkpoint(path)
    try:
        model = RNCA(ModelConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except (ValueError, TypeError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: cannot rebuild the model ({message})") from None
    model.eval()
    model.refine_defaults = dict(payload.get("refine", {}))
    return model, dict(payload.get("provenance", {}))


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu") -> RNCA:
    """Load a shipped model by name (``"rings"``) or a checkpoint file, ready for inference."""
    model, provenance = load_checkpoint(resolve_model(name_or_path))
    model.provenance = provenance
    return model.to(device)
