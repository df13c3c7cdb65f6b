"""Pool training of an rNCA (paper Section 3.3, Appendix A.1), with validation that measures
repair, a kept best checkpoint, budgets and exact resume.

Data: folders of images and ground-truth labels paired by case id, and either coarse masks
("states", paired likewise) or an ``rnca perturb`` recipe that corrupts the ground truth afresh
each time a sample enters the pool (or both, mixed by ``perturb_share``). Each 2D case (or each
slice of a NIfTI volume along ``axis``) is cut into ``patch`` x ``patch`` windows with
``overlap``; windows with nothing to refine are skipped, smaller inputs are zero-padded.

The model starts from a fresh initialisation (the last layer zero, so it begins as the identity),
or from a trained model's weights with ``init`` (fine-tuning; same model config).

One iteration, top to bottom (:func:`train_step`):

1. draw ``batch`` pool entries; replace ``replace`` of them with fresh states made from coarse masks;
2. draw a loss step t* ~ U[min_step, steps] per sample and unroll the automaton; a sample leaves
   the batch once its t* has passed (its later steps could not change the loss), see :func:`unroll`;
3. loss = mean over samples of the objective at t* (the paper's MSE of the visible channel against
   the target by default; :mod:`rnca_cli.losses`);
4. AdamW step with the gradient norm clipped to ``clip``, at the schedule's learning rate;
5. write each sample's state at its t* back into the pool, so later iterations continue from it
   (the pool teaches the automaton to keep a repaired mask stable, not only to reach it).

The run folder (:class:`Run`) holds ``config.json`` (every option, the data's case ids and digest,
the rnca version), ``command.txt``, ``log.csv``, ``last.pt`` (the weights and everything
``--resume`` needs: optimizer, schedule, pool, iteration, every generator's state) and, with
validation, ``best.pt``, ``final.csv`` (coarse, best and last compared) and pictures:
``curves.png`` (loss and validation metrics) and ``trajectory.png`` / ``.gif`` (validation cases
repaired step by step). At the end, ``best.pt`` and ``last.pt`` get the guard limits that trust
the model on its validation cases (:func:`rnca_cli.validation.guard_limits`); resuming a finished
run redoes this last part. A run killed at any
moment and resumed ends with the weights of the same run uninterrupted, on the same device and
thread count.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import io, pictures
from .checkpoint import load_checkpoint, read_checkpoint, resolve_model, save_checkpoint, set_refine_defaults
from .device import float32_convolutions, make_generator
from .engines import Engine, select_engine
from .errors import InputError, OutputError, TrainingError, UsageError
from .inference import trajectory
from .losses import far_from, gaps, pixel_weights, sample_losses
from .model import RNCA, FireNoise, ModelConfig, draw_seeds
from .options import TrainConfig, parse_loss
from .preprocess import normalise
from .perturb import apply_recipe, parse_recipe
from .validation import METRICS, ValCase, better, coarse_score, guard_limits, refine_cases, score


@dataclass
class PatchSet:
    """Training windows: images (N, C, P, P), targets (N, P, P) in {0, 1}, coarse (N, P, P), and
    which pixels lie far from the target (N, P, P) bool (:func:`rnca_cli.losses.far_from`)."""

    images: torch.Tensor
    targets: torch.Tensor
    coarse: torch.Tensor
    case_ids: list[str]
    far: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.far is None:
            self.far = torch.from_numpy(far_from(self.targets.cpu().numpy() > 0.5)).to(self.targets.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> "PatchSet":
        return PatchSet(self.images.to(device), self.targets.to(device), self.coarse.to(device), self.case_ids,
                        self.far.to(device))


@dataclass
class Dataset:
    """Training windows, full-size validation cases, what was left unmatched, and a description."""

    train: PatchSet
    val: list[ValCase]
    unmatched: list[Path]
    description: str
    has_states: bool = True
    train_ids: list[str] = field(default_factory=list)
    image_norm: float = 0.0  # training windows are as a model with this ModelConfig.image_norm sees them

    def digest(self) -> str:
        """sha256 of every training window and validation case: a resumed run must see the same data."""
        h = hashlib.sha256()
        for t in (self.train.images, self.train.targets, self.train.coarse):
            h.update(t.cpu().numpy().tobytes())
        for case in self.val:
            for a in (case.image, case.target, case.coarse):
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


@dataclass
class Progress:
    """What :func:`train` reports after each iteration (``val``: the metrics of a validation round)."""

    iteration: int
    iterations: int
    loss: float
    its_per_sec: float
    val: dict[str, float] | None = None


# -- data ----------------------------------------------------------------------------------------


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Sliding-window starts covering [0, size) with the last window flush with the end."""
    if size <= patch:
        return [0]
    stride = max(1, int(round(patch * (1 - overlap))))
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def _pad_to(a: np.ndarray, patch: int) -> np.ndarray:
    """Zero-pad the first two axes of ``a`` up to ``patch``."""
    pads = [(0, max(0, patch - a.shape[0])), (0, max(0, patch - a.shape[1]))] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pads)


def _slices(image: np.ndarray, label: np.ndarray, coarse: np.ndarray, axis: int):
    """2D triples: the case itself, or each slice of a volume along ``axis``."""
    if label.ndim == 2:
        yield image, label, coarse
        return
    for k in range(label.shape[axis]):
        take = [slice(None)] * 3
        take[axis] = k
        yield image[tuple(take)], label[tuple(take)], coarse[tuple(take)]


def _normalised(image: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """A case's image (H, W, C) or volume (X, Y, Z, C) with each 2D image (each slice along
    ``axis``) normalised whole, as refinement does (:func:`rnca_cli.preprocess.normalise`)."""
    if image.ndim == 3:
        return normalise(image, sigma)
    return np.moveaxis(normalise(np.moveaxis(image, axis, 0), sigma), 0, axis)


def cut_patches(image, label, coarse, patch: int, overlap: float, keep_if=None):
    """Yield (image (P, P, C), label (P, P), coarse (P, P)) windows; by default those with a
    non-empty coarse mask (``keep_if(label window, coarse window)`` decides otherwise)."""
    keep_if = keep_if or (lambda lab, c: np.any(c > 0))
    h, w = label.shape
    for y in window_starts(h, patch, overlap):
        for x in window_starts(w, patch, overlap):
            window = (slice(y, y + patch), slice(x, x + patch))
            if not keep_if(label[window], coarse[window]):
                continue
            yield _pad_to(image[window], patch), _pad_to(label[window], patch), _pad_to(coarse[window], patch)


def _state_files(states: Path | None, known: set[str]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Coarse masks by case: ``<case>`` or ``<case>_<k>`` (the names ``rnca perturb`` writes)."""
    found: dict[str, list[Path]] = {}
    stray = []
    if states is None:
        return found, stray
    for path in io.list_files(states):
        cid = io.case_id(path)
        base = cid.rsplit("_", 1)[0] if "_" in cid and cid.rsplit("_", 1)[1].isdigit() else None
        owner = cid if cid in known else base if base in known else None
        if owner is None:
            stray.append(path)
        else:
            found.setdefault(owner, []).append(path)
    return found, stray


def _cases(images: Path, labels: Path, states: Path | None) -> tuple[list[io.Case], dict[str, list[Path]], list[Path]]:
    """Paired cases (with a coarse mask each when ``states`` is given), their coarse masks, and the
    files left unmatched."""
    pairing = io.pair_folders(images, labels)
    state_files, stray = _state_files(states, {c.case_id for c in pairing.cases})
    if states is None:
        return pairing.cases, state_files, pairing.unmatched_images + pairing.unmatched_masks
    cases = [c for c in pairing.cases if c.case_id in state_files]
    unmatched = (pairing.unmatched_images + pairing.unmatched_masks
                 + [c.mask for c in pairing.cases if c.case_id not in state_files] + stray)
    return cases, state_files, unmatched


def load_dataset(
    images: str | Path, labels: str | Path, states: str | Path | None, config: TrainConfig, label: int | None = None,
    val_images: str | Path | None = None, val_labels: str | Path | None = None, val_states: str | Path | None = None,
    image_norm: float = 0.0,
) -> Dataset:
    """Pair the folders by case id, cut training windows and read the validation cases.

    Without ``states`` the coarse masks come from ``config.perturb`` alone. Validation cases come
    from the ``val_*`` folders, or are the last ``val_cases`` (or ``val_fraction``) cases by case
    id, held out whole; without stored coarse masks, a validation case's coarse mask is a
    corruption of its ground truth drawn once from the seed, the same every round. Training
    windows are cut from images normalised for a model with this ``image_norm``
    (:class:`~rnca_cli.model.ModelConfig`); validation images stay as read, since validation
    refines them as ``rnca refine`` does.
    """
    images, labels = Path(images), Path(labels)
    states = Path(states) if states is not None else None
    if states is None and config.perturb is None:
        raise UsageError("without --states, give a --perturb recipe to make coarse masks from the labels")
    cases, state_files, unmatched = _cases(images, labels, states)
    if not cases:
        raise InputError(f"{images}: no case has an image, a label (in {labels})"
                         + (f" and a coarse mask (in {states})" if states else ""))
    if val_states is not None and (val_images is None or val_labels is None):
        raise UsageError("--val-states needs --val-images and --val-labels")
    if val_images is not None or val_labels is not None:
        if val_images is None or val_labels is None:
            raise UsageError("--val-images and --val-labels go together")
        if config.val_cases or config.val_fraction:
            option = "--val-cases" if config.val_cases else "--val-fraction"
            raise UsageError(f"give {option} or --val-images/--val-labels, not both")
        vstates = Path(val_states) if val_states is not None else None
        if vstates is None and config.perturb is None:
            raise UsageError("validation cases without --val-states need a --perturb recipe")
        val_cases, val_state_files, val_unmatched = _cases(Path(val_images), Path(val_labels), vstates)
        unmatched += val_unmatched
        if not val_cases:
            raise InputError(f"{val_images}: no validation case has an image and a label (in {val_labels})")
        train_cases = cases
    else:
        held = config.val_cases or (max(1, round(config.val_fraction * len(cases))) if config.val_fraction else 0)
        if held >= len(cases):
            option = "--val-cases" if config.val_cases else "--val-fraction"
            raise UsageError(f"{option} holds out {held} of {len(cases)} cases and leaves none to train on")
        train_cases, val_cases, val_state_files = cases[: len(cases) - held], cases[len(cases) - held :], state_files
    train = _patch_set(train_cases, state_files, config, label, image_norm)
    val = _val_cases(val_cases, val_state_files, config, label)  # raw images: refined as rnca refine does
    description = (
        f"images={images} labels={labels} " + (f"states={states}" if states else f"perturb={config.perturb!r}")
        + f": {len(train_cases)} training cases, {len(train)} patches of {config.patch}x{config.patch}"
        + (f"; {len(val)} validation cases" if val else "")
        + (f"; images normalised (sigma {image_norm:g})" if image_norm else "")
    )
    return Dataset(train, val, unmatched, description, has_states=states is not None,
                   train_ids=[c.case_id for c in train_cases], image_norm=image_norm)


def _read_case(case: io.Case, label: int | None, channels: int | None) -> tuple[io.Loaded, io.Loaded]:
    image = io.read_images(case.images)
    target = io.read_mask(case.mask, label=label)
    if channels is not None and image.data.shape[-1] != channels:
        raise InputError(f"{image.path}: {image.data.shape[-1]} channels, earlier cases have {channels}")
    if target.data.shape != image.data.shape[:-1]:
        raise InputError(f"{target.path}: shape {target.data.shape} differs from image {image.path} {image.data.shape[:-1]}")
    if not np.isin(target.data, (0.0, 1.0)).all():
        raise InputError(f"{target.path}: ground truth is not binary (soft values); pass a binary mask, or --label N")
    return image, target


def _read_state(path: Path, image: io.Loaded, label: int | None) -> np.ndarray:
    state = io.read_mask(path, label=label)
    if state.data.shape != image.data.shape[:-1]:
        raise InputError(f"{state.path}: shape {state.data.shape} differs from image {image.path} {image.data.shape[:-1]}")
    return state.data


def _patch_set(cases: list[io.Case], state_files: dict[str, list[Path]], config: TrainConfig, label: int | None,
               image_norm: float) -> PatchSet:
    images, targets, coarse, ids = [], [], [], []
    channels = None
    for case in cases:
        image, target = _read_case(case, label, channels)
        channels = image.data.shape[-1]
        pixels = _normalised(image.data, image_norm, config.axis)  # once per case, whatever its coarse masks
        # Without stored coarse masks the windows hold the ground truth, corrupted when they enter the pool.
        sources = [_read_state(p, image, label) for p in state_files.get(case.case_id, [])] or [target.data]
        keep_if = None if case.case_id in state_files else (lambda lab, c: np.any(lab > 0))
        for state in sources:
            for img2d, lab2d, st2d in _slices(pixels, target.data, state, config.axis):
                for img_p, lab_p, st_p in cut_patches(img2d, lab2d, st2d, config.patch, config.overlap, keep_if):
                    images.append(img_p)
                    targets.append(lab_p >= 0.5)
                    coarse.append(st_p)
                    ids.append(case.case_id)
    if not images:
        raise InputError(f"{cases[0].mask.parent}: every window is empty once empty patches are skipped; "
                         "nothing to train on")
    return PatchSet(
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float(),  # (N, C, P, P)
        torch.from_numpy(np.stack(targets)).float(),  # (N, P, P)
        torch.from_numpy(np.stack(coarse)).float(),  # (N, P, P)
        ids,
    )


def _val_cases(cases: list[io.Case], state_files: dict[str, list[Path]], config: TrainConfig,
               label: int | None) -> list[ValCase]:
    out = []
    steps = parse_recipe(config.perturb) if config.perturb else None
    for case in cases:
        image, target = _read_case(case, label, None)
        stored = [(p, _read_state(p, image, label)) for p in state_files.get(case.case_id, [])]
        if not stored:  # one corruption of the ground truth, drawn from the seed and the case id
            rng = np.random.default_rng([config.seed, zlib.crc32(case.case_id.encode())])
            slices = list(_slices(image.data, target.data, target.data, config.axis))
            for k, (img2d, lab2d, _) in enumerate(slices):
                coarse = apply_recipe(lab2d >= 0.5, steps, rng)[0].astype(np.float32)
                name = case.case_id if len(slices) == 1 else f"{case.case_id}#{k}"
                out.append(ValCase(name, img2d.astype(np.float32), lab2d >= 0.5, coarse))
            continue
        for path, state in stored:
            slices = list(_slices(image.data, target.data, state, config.axis))
            for k, (img2d, lab2d, st2d) in enumerate(slices):
                name = io.case_id(path) if len(slices) == 1 else f"{io.case_id(path)}#{k}"
                out.append(ValCase(name, img2d.astype(np.float32), lab2d >= 0.5, st2d.astype(np.float32)))
    return out


# -- the pool ------------------------------------------------------------------------------------


class Corruption:
    """Fresh coarse masks for pool refills: with probability ``share`` a new corruption of the
    window's ground truth by ``recipe`` (``rnca perturb``'s), else its stored coarse mask. Draws
    from its own seeded generator, whose state a checkpoint keeps."""

    def __init__(self, recipe: str, share: float, seed: int):
        self.steps, self.share = parse_recipe(recipe), share
        self.rng = np.random.default_rng([seed, 2])

    def __call__(self, targets: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        out = coarse.clone()
        for i, target in enumerate(targets.cpu().numpy()):
            if self.rng.random() < self.share:
                fresh = apply_recipe(target >= 0.5, self.steps, self.rng)[0]
                out[i] = torch.from_numpy(np.asarray(fresh, np.float32))
        return out


class Pool:
    """``size`` evolving states, each remembering which patch it belongs to and the coarse mask it
    started from (``start``, bool: what ``miss_weight`` counts as the sample's gaps)."""

    def __init__(self, model: RNCA, patches: PatchSet, size: int, gen: torch.Generator,
                 corrupt: Corruption | None = None):
        self.patches, self.corrupt = patches, corrupt
        self.which = torch.randint(len(patches), (size,), generator=gen, device=gen.device)  # (P,)
        coarse = self.coarse(self.which)
        self.start = coarse >= 0.5  # (P, H, W)
        with torch.no_grad():
            self.states = model.initial_state(coarse).contiguous()  # (P, K, H, W)

    def coarse(self, which: torch.Tensor) -> torch.Tensor:
        """Coarse masks (n, P, P) for the windows ``which``: stored, or freshly corrupted."""
        coarse = self.patches.coarse[which]
        if self.corrupt is None:
            return coarse
        return self.corrupt(self.patches.targets[which], coarse).to(coarse.device)

    def refresh(self, model: RNCA, slots: torch.Tensor, gen: torch.Generator) -> None:
        """Start ``slots`` over from fresh coarse masks of random patches."""
        new = torch.randint(len(self.patches), (len(slots),), generator=gen, device=gen.device)
        self.which[slots] = new
        coarse = self.coarse(new)
        self.start[slots] = coarse >= 0.5
        with torch.no_grad():
            self.states[slots] = model.initial_state(coarse)


# -- data parallel ---------------------------------------------------------------------------------


@dataclass
class Ranks:
    """This process's place in a data-parallel run. ``torchrun --nproc_per_node N -m rnca_cli train``
    sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; each rank keeps its own shard of the pool
    (``pool / N`` states, ``batch / N`` samples an iteration), the gradients are averaged over the
    ranks before each optimizer step (PyTorch DDP's all-reduce, called explicitly because a step
    does not run through a module's ``forward``), and rank 0 validates and writes the run folder."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, model: RNCA) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: float, device: torch.device) -> float:
        """``value`` averaged over the ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on some rank (so that every rank stops at the same iteration)."""
        return self.mean(float(flag), device) > 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def ranks_from_environment(device: torch.device) -> Ranks:
    """A single process, or this rank of a ``torchrun`` launch (process group started: gloo on
    CPUs, NCCL on GPUs)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# -- one iteration -------------------------------------------------------------------------------


def unroll(
    model: RNCA, engine: Engine, state: torch.Tensor, image: torch.Tensor, target: torch.Tensor, noise: FireNoise,
    t_star: torch.Tensor, terms: list[tuple[str, float]] = (("mse", 1.0),), weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll each sample to its own loss step; returns (sum over samples of the loss of the visible
    channel at t* against ``target``: ``terms`` of :func:`rnca_cli.losses.sample_losses`, the
    paper's MSE by default, ``weight`` (B, P, P) on its pixel terms; the detached states at t*).

    state (B, K, P, P) channels_last, image (B, C, P, P), target (B, P, P), t_star (B,) in 1..
    Samples are independent (per-sample convolutions and update masks), so one whose t* has passed
    is dropped from the batch: same loss and gradients, without the steps that cannot affect them.
    """
    b = state.shape[0]
    inputs = engine.training_inputs(model, image)  # (B, ...)
    at_t_star = state.detach().clone()
    loss = state.new_zeros(())
    left = torch.arange(b, device=state.device)  # samples still unrolling, as indices into the batch
    for t in range(1, int(t_star.max()) + 1):
        state = engine.train_step(model, state, inputs, noise, t - 1)
        hit = t_star[left] == t  # (len(left),)
        if not bool(hit.any()):
            continue
        done = left[hit]
        loss = loss + sample_losses(terms, state[hit, 0], target[done], None if weight is None else weight[done]).sum()
        at_t_star[left[hit]] = state[hit].detach()
        go_on = ~hit
        if bool(go_on.any()):
            state = state[go_on].contiguous(memory_format=torch.channels_last)
            left, inputs, noise = left[go_on], inputs[go_on], noise.select(go_on)
    return loss, at_t_star


def train_step(
    model: RNCA, engine: Engine, opt: torch.optim.Optimizer, pool: Pool, cfg: TrainConfig,
    index_gen: torch.Generator, step_gen: torch.Generator, ranks: Ranks = Ranks(),
) -> float:
    """One pool iteration (module docstring, points 1-5); ``cfg`` holds this rank's batch. Returns
    the loss (averaged over the ranks)."""
    slots = torch.randperm(pool.states.shape[0], generator=index_gen, device=index_gen.device)[: cfg.batch]
    pool.refresh(model, slots[: cfg.replace], index_gen)
    which = pool.which[slots]
    image, target = pool.patches.images[which], pool.patches.targets[which]  # (B, C, P, P), (B, P, P)
    state = pool.states[slots].contiguous(memory_format=torch.channels_last)  # (B, K, P, P)
    t_star = torch.randint(cfg.min_step, cfg.steps + 1, (cfg.batch,), generator=index_gen, device=index_gen.device)

    noise = FireNoise(draw_seeds(cfg.batch, image.device, step_gen), tuple(image.shape[-2:]))
    missed = gaps(target > 0.5, pool.start[slots]) if cfg.miss_weight else None  # not computed when unused
    weight = pixel_weights(pool.patches.far[which], cfg.far_weight, missed, cfg.miss_weight)
    loss, at_t_star = unroll(model, engine, state, image, target, noise, t_star, parse_loss(cfg.loss), weight)
    loss = loss / cfg.batch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    ranks.average_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    pool.states[slots] = at_t_star.contiguous()
    return ranks.mean(float(loss.detach()), image.device)


def learning_rate_factor(cfg: TrainConfig, it: int) -> float:
    """The schedule's multiplier of ``lr`` for iteration ``it`` (1-based): a linear warm-up over
    ``warmup`` iterations, then constant or a cosine down to 0 at ``iterations``."""
    if it <= cfg.warmup:
        return it / (cfg.warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    done = (it - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


# -- the run folder ------------------------------------------------------------------------------

LOG_COLUMNS = ("iteration", "loss", "lr", "seconds", *(f"val_{m}" for m in METRICS))
# Options a resumed run may change: how long it runs and how often it reports and saves.
RESUMABLE_CHANGES = ("iterations", "time_budget", "val_every", "save_every")


class Run:
    """A run folder: its records (``config.json``, ``command.txt``, ``log.csv``) and checkpoints."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.config, self.log = self.out / "config.json", self.out / "log.csv"
        self.last, self.best, self.final = self.out / "last.pt", self.out / "best.pt", self.out / "final.csv"
        self.curves = self.out / "curves.png"
        self.trajectory = (self.out / "trajectory.png", self.out / "trajectory.gif")  # repair_pictures' files

    def start(self, record: dict, overwrite: bool) -> None:
        """A new run: refuse a folder that holds one unless ``overwrite``; write the records."""
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: exists and is not a folder")
        if not overwrite:
            for path in (self.last, self.best, self.config):
                if path.exists():
                    raise OutputError(f"{path}: already exists; pass --overwrite, --resume {self.out}, or another --out")
        io.make_folder(self.out)
        for stale in (self.best, self.final, self.curves, *self.trajectory):  # an overwritten run's must not outlive it
            stale.unlink(missing_ok=True)
        io.write_text(self.config, json.dumps(record, indent=2) + "\n")
        io.write_text(self.out / "command.txt", " ".join(sys.argv) + "\n")

    def check_resume(self, record: dict) -> None:
        """Refuse to resume a folder whose run had other options or other data."""
        if not self.last.is_file():
            raise InputError(f"{self.last}: no such file; --resume needs a run folder with a last.pt")
        try:
            before = json.loads(self.config.read_text())
        except (OSError, ValueError):
            raise InputError(f"{self.config}: missing or unreadable; cannot check the run's options") from None
        defaults = {"train_config": asdict(TrainConfig()), "model_config": ModelConfig().to_dict()}
        for key in ("train_config", "model_config"):
            # an option added since the run started has its default there (the run behaved so)
            old, new = {**defaults[key], **before.get(key, {})}, record[key]
            for name in sorted(set(old) | set(new)):
                if name not in RESUMABLE_CHANGES and old.get(name) != new.get(name):
                    raise UsageError(f"{self.config}: the run used {name}={old.get(name)!r}, not {new.get(name)!r}; "
                                     "resume with the same options")
        if before.get("data_digest") != record["data_digest"]:
            raise UsageError(f"{self.config}: the run was trained on other data (digest differs); "
                             "resume with the same folders")
        io.write_text(self.config, json.dumps({**before, "train_config": record["train_config"]}, indent=2) + "\n")

    def write_log(self, rows: list[dict]) -> None:
        io.write_csv(self.log, LOG_COLUMNS, [[r.get(c) for c in LOG_COLUMNS] for r in rows])

    def read_log(self) -> list[dict]:
        import csv

        if not self.log.is_file():
            return []
        with self.log.open(newline="") as f:
            return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def train(
    data: Dataset,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    model_config: ModelConfig | None = None,
    device: torch.device | None = None,
    overwrite: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    resume: bool = False,
    ranks: Ranks = Ranks(),
) -> tuple[RNCA, Path]:
    """Train on ``data`` into the run folder ``out`` (module docstring); with ``resume``, continue
    the run in ``out`` from its ``last.pt``. Stops at ``config.iterations`` or once
    ``config.time_budget`` seconds of this call have passed, and saves. Returns (the model with the
    last weights, the checkpoint to use: ``best.pt`` with validation, else ``last.pt``)."""
    device = device or torch.device("cpu")
    channels = data.train.images.shape[1]
    model_config = model_config or ModelConfig(image_channels=channels)
    if model_config.image_channels != channels:
        raise InputError(f"the training images have {channels} channel(s), the model config {model_config.image_channels}")
    if model_config.image_norm != data.image_norm:
        raise UsageError(f"the dataset was loaded with image_norm={data.image_norm:g}, the model config has "
                         f"{model_config.image_norm:g}; pass the same to load_dataset")
    from . import __version__

    record = {"rnca_version": __version__, "train_config": asdict(config), "model_config": model_config.to_dict(),
              "train_cases": data.train_ids, "val_cases": [c.case_id for c in data.val],
              "data_digest": data.digest(), "data": data.description}
    run = Run(out)
    if ranks.world > 1:
        from dataclasses import replace

        if resume:
            raise UsageError("--resume continues a single-process run; resume without torchrun")
        if config.batch % ranks.world or config.pool % ranks.world or config.replace % ranks.world:
            raise UsageError(f"--batch, --pool and --replace must divide among {ranks.world} ranks")
        shard = replace(config, batch=config.batch // ranks.world, pool=config.pool // ranks.world,
                        replace=config.replace // ranks.world)
    else:
        shard = config
    if ranks.main:
        run.check_resume(record) if resume else run.start(record, overwrite)
    ranks.barrier()

    torch.manual_seed(config.seed)  # parameter initialisation, the same on every rank
    model = RNCA(model_config).to(device).train()
    if config.init is not None and not resume:  # a resumed run continues from its own last.pt
        model.load_state_dict(initial_weights(config.init, model_config))
    engine = select_engine(device, torch.float32, model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                            weight_decay=config.weight_decay)
    rank_seed = config.seed + 1_000_003 * ranks.rank  # each rank draws its own samples
    index_gen, step_gen = make_generator(device, rank_seed), make_generator(device, rank_seed + 1)
    train_set = data.train.to(device)
    share = config.perturb_share if config.perturb_share is not None else (0.5 if data.has_states else 1.0)
    corrupt = Corruption(config.perturb, share, rank_seed) if config.perturb else None
    pool = Pool(model, train_set, shard.pool, index_gen, corrupt)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.ema else None  # what validation sees
    evaluated = ema or model
    start_it, best, rows = 0, None, []
    if resume:
        payload = read_checkpoint(run.last)
        state = payload.get("training")
        if state is None:
            raise InputError(f"{run.last}: holds no training state to resume from")
        model.load_state_dict(payload["state_dict"])
        opt.load_state_dict(state["optimizer"])
        pool.which.copy_(state["pool_which"])
        pool.states.copy_(state["pool_states"])
        # Runs saved before the pool kept its starting masks: their stored coarse masks stand in.
        pool.start.copy_(state["pool_start"] if "pool_start" in state else pool.patches.coarse[pool.which] >= 0.5)
        index_gen.set_state(state["generators"]["index"])
        step_gen.set_state(state["generators"]["step"])
        if corrupt is not None:
            corrupt.rng.bit_generator.state = state["corruption_rng"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_it, best = int(state["iteration"]), state["best"]
        rows = [r for r in run.read_log() if int(r["iteration"]) <= start_it]

    coarse_metrics = coarse_score(data.val) if data.val else None
    provenance = {"data": data.description, "train_config": asdict(config)}
    offset = float(rows[-1]["seconds"]) if rows else 0.0  # seconds spent before a resume
    started = time.perf_counter()
    last_val: dict | None = None

    refine_defaults = {"min_size": config.min_size} if config.min_size else None

    def save_last(it: int, elapsed: float) -> None:
        training = {"iteration": it, "optimizer": opt.state_dict(), "pool_which": pool.which.cpu(),
                    "pool_states": pool.states.cpu(), "pool_start": pool.start.cpu(), "best": best,
                    "generators": {"index": index_gen.get_state(), "step": step_gen.get_state()}}
        if corrupt is not None:
            training["corruption_rng"] = corrupt.rng.bit_generator.state
        if ema is not None:
            training["ema"] = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
        save_checkpoint(run.last, model, {**provenance, "iterations": it, "train_seconds": round(offset + elapsed, 1)},
                        training, refine_defaults)
        run.write_log(rows)
        pictures.curves(rows, run.curves)

    it = start_it
    with float32_convolutions(device):  # CUDA trains like the CPU, to float rounding (see there)
        for it in range(start_it + 1, config.iterations + 1):
            for group in opt.param_groups:
                group["lr"] = config.lr * learning_rate_factor(config, it)
            loss = train_step(model, engine, opt, pool, shard, index_gen, step_gen, ranks)
            if ema is not None:
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), model.parameters()):
                        pe.mul_(config.ema).add_(p, alpha=1 - config.ema)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"{run.out}: training diverged at iteration {it} (loss {loss}); the last good checkpoint is kept; "
                    "try a smaller --lr"
                )
            elapsed = time.perf_counter() - started
            out_of_time = ranks.any(config.time_budget is not None and elapsed >= config.time_budget, device)
            last = it == config.iterations or out_of_time
            row = {"iteration": it, "loss": f"{loss:.6g}", "lr": f"{opt.param_groups[0]['lr']:.6g}",
                   "seconds": f"{offset + elapsed:.2f}"}
            val = None
            if ranks.main and data.val and (it % config.val_every == 0 or last):
                model.eval()
                val = score(refine_cases(evaluated, data.val, config.steps, config.seed, config.min_size), data.val)
                model.train()
                row.update({f"val_{k}": f"{v:.6g}" for k, v in val.items()})
                last_val = val
                if better(config.select, val[config.select], None if best is None else best[config.select]):
                    best = {**val, "iteration": it}
                    save_checkpoint(run.best, evaluated, {**provenance, "iterations": it, "selected_by": config.select,
                                                      **{f"val_{k}": v for k, v in val.items()}}, refine=refine_defaults)
            rows.append(row)
            if ranks.main and (it % config.save_every == 0 or last):
                save_last(it, elapsed)
            if on_progress and ranks.main:
                on_progress(Progress(it, config.iterations, loss, (it - start_it) / elapsed if elapsed > 0 else 0.0, val))
            if out_of_time:
                break
    if it == start_it and ranks.main:  # nothing left to do (a resumed run that had finished)
        save_last(it, 0.0)
    model.eval()
    if ranks.main and data.val and last_val is not None:
        table = [["coarse", "", *(coarse_metrics[m] for m in METRICS)]]
        if best is not None:
            table.append(["best", best["iteration"], *(best[m] for m in METRICS)])
        table.append(["last", it, *(last_val[m] for m in METRICS)])
        io.write_csv(run.final, ["masks", "iteration", *METRICS], table)
        repair_pictures(evaluated, data.val[:4], config.steps, config.seed, *run.trajectory)
    if ranks.main and data.val:
        for path in (run.best, run.last):  # the guard's limits, measured on the validation cases
            if path.exists():
                chosen = load_checkpoint(path)[0].to(device)
                set_refine_defaults(path, guard_limits(chosen, data.val, config.steps, config.seed, config.min_size))
    ranks.barrier()
    return model, (run.best if run.best.exists() else run.last)


def initial_weights(init: str, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of model ``init`` (a shipped name or a checkpoint file), refused unless its
    config is the run's: fine-tuning keeps the architecture, the image channels and normalisation."""
    model = load_checkpoint(resolve_model(init))[0]
    if model.config != model_config:
        theirs, ours = model.config.to_dict(), model_config.to_dict()
        diff = ", ".join(f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in theirs if theirs[k] != ours[k])
        raise UsageError(f"{init}: --init model differs from this run's model: {diff}")
    return model.state_dict()


def repair_pictures(model: RNCA, cases: list[ValCase], steps: int, seed: int, strip: Path, gif: Path) -> list[Path]:
    """``strip``: the cases repaired step by step (image, coarse mask, a few steps, ground truth, a
    row each), and ``gif``, the first case step by step."""
    rows, first = [], None
    for case in cases:
        maps = trajectory(model, case.image, case.coarse, steps, seed)  # (steps, H, W)
        rows.append({"image": case.image, "coarse": case.coarse, "target": case.target,
                     "steps": {t: maps[t - 1] for t in pictures.recorded_steps(steps)}})
        first = first or (case, maps)
    scale = max(1, 128 // max(cases[0].target.shape)) if cases else 1
    written = [pictures.trajectory_strip(rows, strip, scale)]
    if first is not None:
        case, maps = first
        written.append(pictures.trajectory_gif(case.image, [case.coarse, *maps], gif, scale, case.target))
    return written


def check_memory(config: TrainConfig, model_config: ModelConfig) -> None:
    """Refuse, before any data is read, a pool that cannot fit in this machine's memory (the
    states alone: pool x channels x patch^2 float32)."""
    import os

    need = config.pool * model_config.channels * config.patch**2 * 4
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: nothing to compare with
        return
    if need > have:
        raise UsageError(f"--patch {config.patch} with --pool {config.pool}: the pool alone would need "
                         f"{need / 2**30:.1f} GiB, this machine has {have / 2**30:.1f} GiB")


def train_files(
    images: Path, labels: Path, states: Path | None, out: Path, config: TrainConfig = TrainConfig(),
    model_config: ModelConfig = ModelConfig(), label: int | None = None, device: str = "auto",
    overwrite: bool = False, on_start: Callable[[Dataset, torch.device], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None, resume: bool = False,
    val_images: Path | None = None, val_labels: Path | None = None, val_states: Path | None = None,
) -> Path:
    """``rnca train``: load the folders (:func:`load_dataset`), train a model of ``model_config``
    (its image channels taken from the data) on ``device`` into the run folder ``out`` (or continue
    it, with ``resume``). ``on_start(data, device)`` is told what was loaded. Returns the
    checkpoint to use."""
    from dataclasses import replace

    from .device import resolve_device

    io.refuse_input_folders(out, (images, labels, states, val_images, val_labels, val_states), "--out")
    torch_device = resolve_device(device)
    check_memory(config, model_config)
    ranks = ranks_from_environment(torch_device)
    if ranks.world > 1 and torch_device.type == "cuda":
        torch_device = torch.device("cuda", ranks.local_rank)  # one GPU per rank
    try:
        data = load_dataset(images, labels, states, config, label, val_images, val_labels, val_states,
                            model_config.image_norm)
        if on_start and ranks.main:
            on_start(data, torch_device)
        model_config = replace(model_config, image_channels=data.train.images.shape[1])
        return train(data, out, config, model_config, torch_device, overwrite, on_progress, resume, ranks)[1]
    finally:
        if ranks.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
