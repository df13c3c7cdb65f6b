"""Pool training of an rNCA (paper Section 3.3, Appendix A.1).

Data: folders of images, ground-truth labels and coarse masks ("states") paired by case id. Each
2D case (or each slice of a NIfTI volume along ``axis``) is cut into ``patch`` x ``patch`` windows
with ``overlap``; windows whose coarse mask is empty are skipped (nothing to refine), smaller inputs
are zero-padded to the patch size.

One iteration, top to bottom (:func:`train_step`):

1. draw ``batch`` pool entries; replace ``replace`` of them with fresh states made from coarse masks;
2. draw a loss step t* ~ U[min_step, steps] per sample and unroll the automaton; a sample leaves
   the batch once its t* has passed (its later steps could not change the loss, and would cost a
   quarter of the work on average: t* has mean 48 of 64), see :func:`unroll`;
3. loss = mean over samples of MSE(visible channel at t*, target);
4. AdamW step with the gradient norm clipped to ``clip``;
5. write each sample's state at its t* back into the pool, so later iterations continue from it
   (the pool teaches the automaton to keep a repaired mask stable, not only to reach it).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import inference, io
from .checkpoint import save_checkpoint
from .device import float32_convolutions, make_generator
from .errors import InputError, OutputError, TrainingError
from .metrics import dice
from .engines import Engine, select_engine
from .model import RNCA, FireNoise, ModelConfig, draw_seeds
from .options import TrainConfig


@dataclass
class PatchSet:
    """Training windows: images (N, C, P, P), targets (N, P, P) in {0, 1}, coarse (N, P, P)."""

    images: torch.Tensor
    targets: torch.Tensor
    coarse: torch.Tensor
    case_ids: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> "PatchSet":
        return PatchSet(self.images.to(device), self.targets.to(device), self.coarse.to(device), self.case_ids)


@dataclass
class Dataset:
    train: PatchSet
    val: PatchSet | None
    unmatched: list[Path]
    description: str


@dataclass
class Progress:
    """What :func:`train` reports after each iteration."""

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


def cut_patches(image, label, coarse, patch: int, overlap: float):
    """Yield (image (P, P, C), label (P, P), coarse (P, P)) windows with a non-empty coarse mask."""
    h, w = label.shape
    for y in window_starts(h, patch, overlap):
        for x in window_starts(w, patch, overlap):
            window = (slice(y, y + patch), slice(x, x + patch))
            c = coarse[window]
            if not np.any(c > 0):
                continue
            yield _pad_to(image[window], patch), _pad_to(label[window], patch), _pad_to(c, patch)


def load_dataset(
    images: str | Path, labels: str | Path, states: str | Path, config: TrainConfig, label: int | None = None
) -> Dataset:
    """Pair the three folders by case id and cut training (and validation) patches.

    A coarse mask pairs with the case of the same id, or, failing that, ``<case>_<k>`` with case
    ``<case>`` (the names ``rnca perturb`` writes), so one case may have several coarse masks.
    Validation holds out whole cases, never single coarse masks of a training case.
    """
    pairing = io.pair_folders(images, labels)
    known = {c.case_id for c in pairing.cases}
    state_files: dict[str, list[Path]] = {}
    stray = []
    for path in io.list_files(states):
        cid = io.case_id(path)
        base = cid.rsplit("_", 1)[0] if "_" in cid and cid.rsplit("_", 1)[1].isdigit() else None
        owner = cid if cid in known else base if base in known else None
        if owner is None:
            stray.append(path)
        else:
            state_files.setdefault(owner, []).append(path)
    cases = [c for c in pairing.cases if c.case_id in state_files]
    unmatched = (
        pairing.unmatched_images + pairing.unmatched_masks
        + [c.mask for c in pairing.cases if c.case_id not in state_files] + stray
    )
    if not cases:
        raise InputError(f"{images}: no case has an image, a label (in {labels}) and a coarse mask (in {states})")
    if config.val_cases >= len(cases):
        raise InputError(f"--val-cases {config.val_cases} leaves no training case out of {len(cases)}")
    split = len(cases) - config.val_cases
    train = _patch_set(cases[:split], state_files, config, label)
    val = _patch_set(cases[split:], state_files, config, label) if config.val_cases else None
    description = (
        f"images={images} labels={labels} states={states}: {split} training cases"
        + (f", last {config.val_cases} by case id held out ({cases[split].case_id}..{cases[-1].case_id})" if val else "")
        + f", {len(train)} patches of {config.patch}x{config.patch}"
    )
    return Dataset(train, val, unmatched, description)


def _patch_set(cases: list[io.Case], state_files: dict[str, list[Path]], config: TrainConfig, label: int | None) -> PatchSet:
    images, targets, coarse, ids = [], [], [], []
    channels = None
    for case in cases:
        image = io.read_images(case.images)
        target = io.read_mask(case.mask, label=label)
        if channels is None:
            channels = image.data.shape[-1]
        elif image.data.shape[-1] != channels:
            raise InputError(f"{image.path}: {image.data.shape[-1]} channels, earlier cases have {channels}")
        for state_path in state_files[case.case_id]:
            state = io.read_mask(state_path, label=label)
            for loaded in (target, state):
                if loaded.data.shape != image.data.shape[:-1]:
                    raise InputError(
                        f"{loaded.path}: shape {loaded.data.shape} differs from image {image.path} {image.data.shape[:-1]}"
                    )
            for img2d, lab2d, st2d in _slices(image.data, target.data, state.data, config.axis):
                for img_p, lab_p, st_p in cut_patches(img2d, lab2d, st2d, config.patch, config.overlap):
                    images.append(img_p)
                    targets.append(lab_p >= 0.5)
                    coarse.append(st_p)
                    ids.append(case.case_id)
    if not images:
        raise InputError(f"{cases[0].mask.parent}: every coarse mask is empty; nothing to train on")
    return PatchSet(
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float(),  # (N, C, P, P)
        torch.from_numpy(np.stack(targets)).float(),  # (N, P, P)
        torch.from_numpy(np.stack(coarse)).float(),  # (N, P, P)
        ids,
    )


# -- the loop ------------------------------------------------------------------------------------


class Pool:
    """``size`` evolving states, each remembering which patch it belongs to."""

    def __init__(self, model: RNCA, patches: PatchSet, size: int, gen: torch.Generator):
        self.patches = patches
        self.which = torch.randint(len(patches), (size,), generator=gen, device=gen.device)  # (P,)
        with torch.no_grad():
            self.states = model.initial_state(patches.coarse[self.which]).contiguous()  # (P, K, H, W)

    def refresh(self, model: RNCA, slots: torch.Tensor, gen: torch.Generator) -> None:
        """Start ``slots`` over from fresh coarse masks of random patches."""
        new = torch.randint(len(self.patches), (len(slots),), generator=gen, device=gen.device)
        self.which[slots] = new
        with torch.no_grad():
            self.states[slots] = model.initial_state(self.patches.coarse[new])


def unroll(
    model: RNCA, engine: Engine, state: torch.Tensor, image: torch.Tensor, target: torch.Tensor, noise: FireNoise,
    t_star: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll each sample to its own loss step; returns (sum over samples of the MSE of the visible
    channel at t* against ``target``, the detached states at t*).

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
        loss = loss + ((state[hit, 0] - target[left[hit]]) ** 2).mean(dim=(1, 2)).sum()
        at_t_star[left[hit]] = state[hit].detach()
        go_on = ~hit
        if bool(go_on.any()):
            state = state[go_on].contiguous(memory_format=torch.channels_last)
            left, inputs, noise = left[go_on], inputs[go_on], noise.select(go_on)
    return loss, at_t_star


def train_step(
    model: RNCA, engine: Engine, opt: torch.optim.Optimizer, pool: Pool, cfg: TrainConfig,
    index_gen: torch.Generator, step_gen: torch.Generator,
) -> float:
    """One pool iteration (module docstring, points 1-5). Returns the loss."""
    slots = torch.randperm(pool.states.shape[0], generator=index_gen, device=index_gen.device)[: cfg.batch]
    pool.refresh(model, slots[: cfg.replace], index_gen)
    which = pool.which[slots]
    image, target = pool.patches.images[which], pool.patches.targets[which]  # (B, C, P, P), (B, P, P)
    state = pool.states[slots].contiguous(memory_format=torch.channels_last)  # (B, K, P, P)
    t_star = torch.randint(cfg.min_step, cfg.steps + 1, (cfg.batch,), generator=index_gen, device=index_gen.device)

    noise = FireNoise(draw_seeds(cfg.batch, image.device, step_gen), tuple(image.shape[-2:]))
    loss, at_t_star = unroll(model, engine, state, image, target, noise, t_star)
    loss = loss / cfg.batch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    pool.states[slots] = at_t_star.contiguous()
    return float(loss.detach())


@torch.no_grad()
def validate(model: RNCA, patches: PatchSet, steps: int, seed: int, batch: int = 64) -> dict[str, float]:
    """Mean Dice of coarse masks and of their refinement (threshold 0.5) on held-out patches,
    refined exactly as ``rnca refine --seed seed`` would."""
    before, after = [], []
    for start in range(0, len(patches), batch):
        rows = slice(start, start + batch)
        seeds = torch.full((len(patches.images[rows]),), seed, dtype=torch.int64)
        prob = inference.rollout(model, patches.images[rows], patches.coarse[rows], steps, seeds).cpu().numpy()
        for p, coarse, target in zip(prob, patches.coarse[rows].cpu().numpy(), patches.targets[rows].cpu().numpy()):
            before.append(dice(coarse >= 0.5, target))
            after.append(dice(p >= 0.5, target))
    return {"val_dice_before": float(np.mean(before)), "val_dice_after": float(np.mean(after))}


def prepare_run_dir(out: str | Path, overwrite: bool) -> Path:
    """The run folder: created if missing; refused if it already holds a model unless overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if (out / "model.pt").exists() and not overwrite:
        raise OutputError(f"{out / 'model.pt'}: already exists; pass --overwrite or choose another --out")
    return io.make_folder(out)


LOG_COLUMNS = ("iteration", "loss", "seconds", "val_dice_before", "val_dice_after")


def train(
    data: Dataset,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    model_config: ModelConfig | None = None,
    device: torch.device | None = None,
    overwrite: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> tuple[RNCA, Path]:
    """Train a new model on ``data``; writes ``out/model.pt`` and ``out/log.csv``.

    The checkpoint is also written every ``save_every`` iterations, so an interrupted run keeps
    its last save. Returns (model, checkpoint path).
    """
    device = device or torch.device("cpu")
    out = prepare_run_dir(out, overwrite)
    channels = data.train.images.shape[1]
    model_config = model_config or ModelConfig(image_channels=channels)
    if model_config.image_channels != channels:
        raise InputError(f"the training images have {channels} channel(s), the model config {model_config.image_channels}")
    torch.manual_seed(config.seed)  # parameter initialisation
    model = RNCA(model_config).to(device).train()
    engine = select_engine(device, torch.float32, model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    index_gen = make_generator(device, config.seed)
    step_gen = make_generator(device, config.seed + 1)
    train_set = data.train.to(device)
    val_set = data.val.to(device) if data.val is not None else None
    pool = Pool(model, train_set, config.pool, index_gen)

    rows: list[dict] = []
    start = time.perf_counter()
    provenance = {"data": data.description, "train_config": asdict(config), "iterations": 0}
    ckpt = out / "model.pt"
    with float32_convolutions(device):  # CUDA trains like the CPU, to float rounding (see there)
        for it in range(1, config.iterations + 1):
            loss = train_step(model, engine, opt, pool, config, index_gen, step_gen)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"{out}: training diverged at iteration {it} (loss {loss}); the last good checkpoint is kept; "
                    "try a smaller --lr"
                )
            elapsed = time.perf_counter() - start
            row = {"iteration": it, "loss": f"{loss:.6g}", "seconds": f"{elapsed:.2f}"}
            val = None
            if val_set is not None and (it % config.val_every == 0 or it == config.iterations):
                model.eval()
                val = validate(model, val_set, config.steps, config.seed)
                model.train()
                row.update({k: f"{v:.4f}" for k, v in val.items()})
            rows.append(row)
            if it % config.save_every == 0 or it == config.iterations:
                provenance.update(iterations=it, train_seconds=round(elapsed, 1), final_loss=loss, **(val or {}))
                save_checkpoint(ckpt, model, provenance)
                io.write_csv(out / "log.csv", LOG_COLUMNS, [[r.get(c) for c in LOG_COLUMNS] for r in rows])
            if on_progress:
                on_progress(Progress(it, config.iterations, loss, it / elapsed if elapsed > 0 else 0.0, val))
    model.eval()
    return model, ckpt


def train_files(
    images: Path, labels: Path, states: Path, out: Path, config: TrainConfig = TrainConfig(),
    model_config: ModelConfig = ModelConfig(), label: int | None = None, device: str = "auto",
    overwrite: bool = False, on_start: Callable[[Dataset, torch.device], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> Path:
    """``rnca train``: load the three folders (:func:`load_dataset`), train a model of
    ``model_config`` (its image channels taken from the data) on ``device`` and write the run
    folder ``out``. ``on_start(data, device)`` is told what was loaded. Returns the checkpoint."""
    from dataclasses import replace

    from .device import resolve_device

    torch_device = resolve_device(device)
    data = load_dataset(images, labels, states, config, label=label)
    if on_start:
        on_start(data, torch_device)
    model_config = replace(model_config, image_channels=data.train.images.shape[1])
    return train(data, out, config, model_config, torch_device, overwrite, on_progress)[1]
