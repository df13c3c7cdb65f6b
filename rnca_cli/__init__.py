"""rnca: repair segmentation masks with refinement neural cellular automata (rNCA).

The Python API in one place::

    import rnca_cli
    model = rnca_cli.load_model("rings")                  # shipped name or path to a .pt file
    prob = rnca_cli.refine_array(model, image, mask, steps=64, seed=0)
    repaired = prob >= 0.5
    probs = rnca_cli.refine_images(model, images, masks)  # a stack of 2D cases (N, H, W)

The names below are imported on first use (PEP 562), so that ``import rnca_cli`` and the commands
that do not need PyTorch (``evaluate``, ``perturb``, ``synth``, ``--help``) do not load it.
"""

from __future__ import annotations

import importlib

from .errors import RncaError

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "RNCA": "model", "ModelConfig": "model", "refine_array": "refine", "refine_images": "refine", "available_models": "checkpoint",
    "load_checkpoint": "checkpoint", "load_model": "checkpoint", "save_checkpoint": "checkpoint",
}

__all__ = ["__version__", "RncaError", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
