"""Engines: interchangeable implementations of the rule in :mod:`rnca_cli.model`.

Each engine computes the same thing, to float rounding, in its own way:

* ``fused`` (:mod:`.fused`): the sparse engine's algorithm with its per-cell work in compiled C
  kernels (:mod:`rnca_cli.kernels`); a CPU, float32, built at install time.
* ``sparse`` (:mod:`.sparse`): PyTorch, in place, skipping the 16x16 blocks a step cannot change;
  any device, any precision.
* ``reference`` (:mod:`.reference`): the model's own :meth:`~rnca_cli.model.RNCA.rollout`, the
  rule as the paper writes it; slow, and what the others are tested against.

:func:`select_engine` takes the first in :data:`ENGINES` that can run a rollout, unless a name is
asked for (``RNCA_ENGINE=sparse`` in the environment, or ``name``). Adding an engine is one file
with an :class:`Engine` subclass and one line in :data:`ENGINES` (or :func:`register` at run time).
Engines do not import each other; what the sparse and fused engines share lives in :mod:`.rows`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    import torch

    from ..model import FireNoise, RNCA

# Number formats of the per-pixel MLP (``--precision``); the state is always float32.
PRECISION_NAMES = ("fp32", "bf16", "fp16")


def precision_dtype(precision: str) -> "torch.dtype":
    """The torch dtype of a ``--precision`` name."""
    import torch

    if precision not in PRECISION_NAMES:
        raise UsageError(f"precision must be one of {', '.join(PRECISION_NAMES)}, not {precision!r}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Engine:
    """One implementation of the rule. Subclasses set :attr:`name` and implement every method."""

    name = ""

    def unavailable(self, device: "torch.device", dtype: "torch.dtype", model: "RNCA") -> str | None:
        """Why this engine cannot run a rollout of ``model`` on ``device`` with an MLP in
        ``dtype``, or None when it can."""
        raise NotImplementedError

    def rollout(self, model: "RNCA", image: "torch.Tensor", mask: "torch.Tensor", steps: int,
                seeds: "torch.Tensor", origin: tuple[int, int] = (0, 0), stats: dict | None = None,
                precision: str = "fp32") -> "torch.Tensor":
        """Refined probability (B, H, W) for image (B, C, H, W) and mask (B, H, W), equal to
        ``visible(model.rollout(image, mask, steps, seeds=seeds, origin=origin)[0])`` to float
        rounding, without autograd.

        ``origin`` is the global position of pixel (0, 0) (for tiles). ``stats``, if given,
        receives the number of dense and sparse steps, the mean share (over steps) of blocks
        worked on, of cells alive and of cells updated, and each step's wall time
        (``step_seconds``). ``precision``: the number format of the per-pixel MLP, where nearly
        all arithmetic happens; the state and the alive tests stay float32.
        """
        raise NotImplementedError

    def training_inputs(self, model: "RNCA", image: "torch.Tensor") -> "torch.Tensor":
        """What :meth:`train_step` needs of the images (B, C, H, W), batch first, so that a
        training loop can drop finished samples by indexing it."""
        raise NotImplementedError

    def train_step(self, model: "RNCA", state: "torch.Tensor", inputs: "torch.Tensor", noise: "FireNoise",
                   t: int) -> "torch.Tensor":
        """:meth:`rnca_cli.model.RNCA.step` with autograd: state (B, K, H, W) channels_last."""
        raise NotImplementedError


def _builtin() -> list[Engine]:
    from .fused import FusedEngine
    from .reference import ReferenceEngine
    from .sparse import SparseEngine

    return [FusedEngine(), SparseEngine(), ReferenceEngine()]  # the order of preference


ENGINES: list[Engine] = []


def engines() -> list[Engine]:
    """The registered engines, in the order :func:`select_engine` tries them."""
    if not ENGINES:
        ENGINES.extend(_builtin())
    return ENGINES


def register(engine: Engine, first: bool = False) -> None:
    """Add an engine, tried before the others with ``first``, else after them."""
    engines().insert(0, engine) if first else engines().append(engine)


def select_engine(device: "torch.device", dtype: "torch.dtype", model: "RNCA", name: str | None = None) -> Engine:
    """The engine that runs a rollout of ``model`` on ``device`` with its MLP in ``dtype``: the
    one named (``name``, else ``$RNCA_ENGINE`` if set), or the first of :func:`engines` that can.

    Raises :class:`~rnca_cli.errors.UsageError` for an unknown name or a named engine that cannot
    run it."""
    name = name or os.environ.get("RNCA_ENGINE") or None
    if name is not None:
        known = {e.name: e for e in engines()}
        if name not in known:
            raise UsageError(f"engine {name!r}: expected one of {', '.join(known)}")
        why = known[name].unavailable(device, dtype, model)
        if why:
            raise UsageError(f"engine {name!r} cannot run this rollout: {why}")
        return known[name]
    for engine in engines():
        if engine.unavailable(device, dtype, model) is None:
            return engine
    raise UsageError(f"no engine can run this model on {device} in {dtype}")


def describe() -> list[str]:
    """One line per engine for ``rnca --version``: which one a CPU float32 rollout of the paper's
    model uses, and why each other one is or is not available there."""
    import torch

    from ..model import RNCA

    model, cpu = RNCA(), torch.device("cpu")
    try:
        chosen = select_engine(cpu, torch.float32, model)
    except UsageError as exc:  # RNCA_ENGINE names an engine that cannot run
        chosen, lines = None, [f"RNCA_ENGINE: {exc}"]
    else:
        lines = []
    for engine in engines():
        why = engine.unavailable(cpu, torch.float32, model)
        state = "selected" if engine is chosen else ("available" if why is None else f"unavailable: {why}")
        lines.append(f"{engine.name}: {state}")
    return lines
