"""The options of ``rnca refine`` and ``rnca train``: defaults and checks in one place.

Plain dataclasses that import no PyTorch, so that the command line takes its defaults from here
(``rnca --help`` stays fast). A value that cannot work raises :class:`~rnca_cli.errors.UsageError`.
``rnca evaluate``'s options are :class:`rnca_cli.evaluate.EvalOptions`; the model's are
:class:`rnca_cli.model.ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import BLOCK
from .engines import PRECISION_NAMES
from .errors import UsageError


@dataclass(frozen=True)
class RefineOptions:
    """``rnca refine``'s options (:func:`rnca_cli.refine.refine_files`)."""

    steps: int = 64
    threshold: float = 0.5
    seed: int = 0
    axis: int = 2
    label: int | None = None
    save_prob: bool = False
    batch: int = 32
    tile: int = 768  # core side; with a 129-pixel halo (64 steps) about 1 GB of working memory
    precision: str = "fp32"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise UsageError("steps must be >= 0")
        if not 0.0 < self.threshold <= 1.0:
            raise UsageError("threshold must be in (0, 1]")
        if self.axis not in (0, 1, 2):
            raise UsageError("axis must be 0, 1 or 2")
        if self.batch < 1:
            raise UsageError("batch must be >= 1")
        if self.tile < BLOCK:
            raise UsageError(f"tile must be >= {BLOCK}")
        if self.precision not in PRECISION_NAMES:
            raise UsageError(f"precision must be one of {', '.join(PRECISION_NAMES)}, not {self.precision!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; defaults are the paper's (Appendix A.1)."""

    iterations: int = 2000
    pool: int = 256
    batch: int = 32
    replace: int = 2
    steps: int = 64
    min_step: int | None = None  # None: half of steps, rounded up (the paper's 32 of 64)
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    clip: float = 1.0
    patch: int = 64
    overlap: float = 0.25
    val_cases: int = 0
    val_every: int = 100
    save_every: int = 100
    axis: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_step is None:
            object.__setattr__(self, "min_step", max(1, (self.steps + 1) // 2))
        checks = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.batch >= 1, "batch must be >= 1"),
            (self.pool >= self.batch, f"pool ({self.pool}) must be >= batch ({self.batch})"),
            (0 <= self.replace <= self.batch, "replace must be in 0..batch"),
            (1 <= self.min_step <= self.steps, f"min-step ({self.min_step}) must be in 1..steps ({self.steps})"),
            (self.lr > 0, "lr must be > 0"),
            (self.clip > 0, "clip must be > 0"),
            (self.patch >= 8, "patch must be >= 8"),
            (0 <= self.overlap < 1, "overlap must be in [0, 1)"),
            (self.val_cases >= 0, "val-cases must be >= 0"),
            (self.val_every >= 1 and self.save_every >= 1, "val-every and save-every must be >= 1"),
            (self.axis in (0, 1, 2), "axis must be 0, 1 or 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
