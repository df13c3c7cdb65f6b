"""The options of ``rnca refine`` and ``rnca train``: defaults and checks in one place.

Plain dataclasses that import no PyTorch, so that the command line takes its defaults from here
(``rnca --help`` stays fast). A value that cannot work raises :class:`~rnca_cli.errors.UsageError`.
``rnca evaluate``'s options are :class:`rnca_cli.evaluate.EvalOptions`; the model's are
:class:`rnca_cli.model.ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    num_parts: int = 1  # folder mode: refine only every num_parts-th case, starting at part_id
    part_id: int = 0
    save_overlay: Path | None = None  # folder: one picture per case, pixels added (green) and removed (red)
    save_trajectory: Path | None = None  # folder: each case repaired step by step (strip and GIF)
    # rnca_cli.guard: seeded runs averaged, component clean-up, and when the input is kept instead
    ensemble: int = 1
    min_size: int | None = None  # None: the model's stored default (0 when it has none)
    guard: bool = True
    guard_change: float | None = None  # None: the model's stored limit, else rnca_cli.guard.DEFAULT_LIMITS
    guard_agreement: float | None = None
    save_uncertainty: Path | None = None  # per-pixel std of the runs (needs ensemble >= 2)
    report: Path | None = None  # per-case CSV; folder mode defaults to <out>/refine.csv
    skip_existing: bool = False  # folder: leave out cases whose mask output exists (finish a batch)
    continue_on_error: bool = False  # folder: leave out cases that cannot be read, list them at the end

    @property
    def runs(self) -> int:
        """Seeded rollouts per case: the ensemble's, and two at least for the guard (rnca_cli.guard)."""
        return max(self.ensemble, 2 if self.guard else 1)

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
        if not 0 <= self.seed < MAX_SEED:
            raise UsageError(f"seed must be in 0..2^62-1, not {self.seed}")
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise UsageError(f"part-id must be in 0..num-parts-1 and num-parts >= 1, not {self.part_id} of {self.num_parts}")
        if not 1 <= self.ensemble <= 64:
            raise UsageError(f"ensemble must be in 1..64 seeded runs, not {self.ensemble}")
        if self.save_uncertainty is not None and self.ensemble < 2:
            raise UsageError("--save-uncertainty needs --ensemble 2 or more (one run has no spread)")
        if self.skip_existing and self.overwrite:
            raise UsageError("--skip-existing keeps finished outputs and --overwrite replaces them; choose one")
        if self.min_size is not None and self.min_size < 0:
            raise UsageError(f"min-size must be >= 0 pixels, not {self.min_size}")
        if (self.guard_change is not None and not self.guard_change > 0) or (
                self.guard_agreement is not None and not 0 <= self.guard_agreement <= 1):
            raise UsageError("guard-change must be > 0 and guard-agreement in [0, 1]")


MAX_SEED = 1 << 62  # seeds stay int64 after the per-slice and per-rank offsets are added

# --select choices: validation metric -> +1 (higher is better) or -1 (lower is better)
SELECT_METRICS = {"betti_err": -1, "betti0_err": -1, "betti1_err": -1, "topology": 1, "cldice": 1, "dice": 1,
                  "changed": -1}
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; defaults are the paper's (Appendix A.1) where it gives them.

    ``time_budget`` (seconds) stops training cleanly, like ``iterations``. Validation cases are the
    last ``val_cases`` by case id, or a ``val_fraction`` of them (or come from separate folders);
    every ``val_every`` iterations they are refined at full size and scored, and ``best.pt`` keeps
    the weights with the best ``select`` metric (:data:`SELECT_METRICS`; default ``betti_err``, the
    topology errors, which Dice cannot see). ``perturb`` is an ``rnca perturb`` recipe: a pool refill
    then corrupts the sample's ground truth afresh, with probability ``perturb_share`` (default 1
    without stored coarse masks, 0.5 with them). ``schedule``: the learning rate is constant, or
    follows a cosine from ``lr`` to 0 over ``iterations``; either after ``warmup`` linear steps.
    ``loss``, ``far_weight``, ``miss_weight``: the objective (:mod:`rnca_cli.losses`); the default adds a soft clDice
    term to the paper's MSE, which repaired more held-out rings on both seeds measured. ``ema``: validate and keep
    ``best.pt`` with an exponential moving average of the weights of this decay (0: off).
    ``min_size``: the model's clean-up, components under this many pixels removed after
    refinement; stored in every checkpoint (``rnca refine`` applies it by default) and applied in
    validation, so that ``best.pt`` is chosen as it will be used. ``init``: a model (shipped name
    or checkpoint file) whose weights a new run starts from instead of a fresh initialisation
    (fine-tuning); the run's model config must equal that model's.
    """

    iterations: int = 2000
    time_budget: float | None = None
    pool: int = 256
    batch: int = 32
    replace: int = 2
    steps: int = 64
    min_step: int | None = None  # None: half of steps, rounded up (the paper's 32 of 64)
    lr: float = 1e-4
    schedule: str = "constant"
    warmup: int = 0
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    clip: float = 1.0
    patch: int = 64
    overlap: float = 0.25
    perturb: str | None = None
    perturb_share: float | None = None
    loss: str = "mse+cldice:0.5"  # the paper's is "mse"; benchmarks/TRAINING.md has the measurements
    far_weight: float = 0.0
    miss_weight: float = 0.0
    ema: float = 0.0
    min_size: int = 0  # clean-up stored in the checkpoints and applied in validation (rnca_cli.guard)
    val_cases: int = 0
    val_fraction: float = 0.0
    val_every: int = 100
    select: str = "betti_err"
    save_every: int = 100
    axis: int = 2
    seed: int = 0
    init: str | None = None

    def __post_init__(self) -> None:
        if self.min_step is None:
            object.__setattr__(self, "min_step", max(1, (self.steps + 1) // 2))
        checks = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.time_budget is None or self.time_budget > 0, "time budget must be > 0"),
            (self.batch >= 1, "batch must be >= 1"),
            (self.pool >= self.batch, f"pool ({self.pool}) must be >= batch ({self.batch})"),
            (0 <= self.replace <= self.batch, "replace must be in 0..batch"),
            (1 <= self.min_step <= self.steps, f"min-step ({self.min_step}) must be in 1..steps ({self.steps})"),
            (self.lr > 0, "lr must be > 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (self.clip > 0, "clip must be > 0"),
            (self.patch >= 8, "patch must be >= 8"),
            (0 <= self.overlap < 1, "overlap must be in [0, 1)"),
            (self.perturb_share is None or 0 <= self.perturb_share <= 1, "perturb-share must be in [0, 1]"),
            (self.perturb_share is None or self.perturb is not None, "perturb-share needs a --perturb recipe"),
            (self.far_weight >= 0, "far-weight must be >= 0"),
            (self.miss_weight >= 0, "miss-weight must be >= 0"),
            (0 <= self.ema < 1, "ema must be in [0, 1) (0: off)"),
            (self.min_size >= 0, "min-size must be >= 0 pixels"),
            (self.val_cases >= 0, "val-cases must be >= 0"),
            (0 <= self.val_fraction < 1, "val-fraction must be in [0, 1)"),
            (not (self.val_cases and self.val_fraction), "give --val-cases or --val-fraction, not both"),
            (self.select in SELECT_METRICS,
             f"unknown --select metric {self.select!r}; choose from {', '.join(SELECT_METRICS)}"),
            (self.val_every >= 1 and self.save_every >= 1, "val-every and save-every must be >= 1"),
            (self.axis in (0, 1, 2), "axis must be 0, 1 or 2"),
            (0 <= self.seed < MAX_SEED, f"seed must be in 0..2^62-1, not {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.perturb is not None:
            from .perturb import parse_recipe

            parse_recipe(self.perturb)  # a malformed recipe is refused before any data is read
        parse_loss(self.loss)


def parse_duration(text: str) -> float:
    """``"45m"``, ``"2h"``, ``"90s"``, ``"1h30m"`` or plain seconds -> seconds."""
    import re

    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    if not value or parts is None or not any(parts.groups()):
        raise UsageError(f"time budget {text!r}: expected e.g. 45m, 2h, 1h30m, 90s or seconds")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


LOSS_TERMS = ("mse", "bce", "dice", "cldice")  # rnca_cli.losses computes them


def parse_loss(text: str) -> list[tuple[str, float]]:
    """``"mse+cldice:0.5"`` -> [("mse", 1.0), ("cldice", 0.5)]."""
    terms = []
    for item in filter(None, (t.strip() for t in text.lower().split("+"))):
        name, _, weight = item.partition(":")
        if name not in LOSS_TERMS:
            raise UsageError(f"--loss {text!r}: unknown term {name!r}; terms are {', '.join(LOSS_TERMS)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise UsageError(f"--loss {text!r}: weight {weight!r} is not a number") from None
        if not value > 0:
            raise UsageError(f"--loss {text!r}: weights must be > 0")
        terms.append((name, value))
    if not terms:
        raise UsageError(f"--loss {text!r}: name at least one of {', '.join(LOSS_TERMS)}")
    return terms
