"""rnca: repair segmentation masks with refinement neural cellular automata (rNCA).

The Python API in one place::

    import rnca_cli
    model = rnca_cli.load_model("rings")                  # shipped name or path to a .pt file
    prob = rnca_cli.refine_array(model, image, mask, steps=64, seed=0)
    repaired = prob >= 0.5
"""

__version__ = "0.1.0"

from .checkpoint import available_models, load_checkpoint, load_model, save_checkpoint  # noqa: E402
from .errors import RncaError  # noqa: E402
from .model import RNCA, ModelConfig  # noqa: E402
from .refine import refine_array  # noqa: E402

__all__ = [
    "__version__", "RNCA", "ModelConfig", "RncaError", "available_models", "load_checkpoint",
    "load_model", "refine_array", "save_checkpoint",
]
