"""The ``fused`` engine: the sparse engine's algorithm with each step's per-cell work in compiled
C kernels (:mod:`rnca_cli.kernels`), on a CPU in float32.

**Inference** (:class:`FusedRun`). A step runs on the 16x16 blocks it can change, in three
kernels around PyTorch's GEMMs:

1. ``select``: per block, the alive test before the step, the update mask, the cells whose update
   is :func:`~.rows.needed` and fire, counted per block;
2. ``gather``: each of those cells perceives its 3x3 neighbourhood straight from the state buffer
   and writes ``[perception, image patch, 1]`` as one row of the MLP input, with its state;
3. the MLP in PyTorch: two GEMMs per row chunk;
4. ``scatter``: the new states written back, the alive test after the update, the cells alive
   neither before nor after cleared, and the blocks the next step can reach.

Eager PyTorch runs the same step as some fifty passes over the batch's state; fused, each cell
is visited once per kernel while its neighbourhood is in cache.

**Training** (:func:`perceive_rows`): the perception of the cells a step updates, and its
gradient, as one autograd node; the rest of the step is :func:`~.rows.step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..constants import BLOCK, MAX_FEATURES, MAX_FILTERS, RING, STEP_SHIFT
from ..model import RNCA, fire_threshold
from . import Engine, precision_dtype, rows as R


class FusedEngine(Engine):
    name = "fused"

    def __init__(self, skip_blocks: bool = True):
        """``skip_blocks=False``: every step on all blocks (for tests and benchmarks)."""
        self.skip_blocks = skip_blocks

    def unavailable(self, device, dtype, model):
        cfg = model.config
        why = kernels.status()
        if why:
            return why
        if device.type != "cpu":
            return f"runs on a CPU only, not {device.type}"
        if dtype != torch.float32:
            return "runs float32 only"
        if cfg.alive_threshold <= 0:
            return "needs an alive threshold above 0 (block skipping relies on zero cells being dead)"
        if cfg.filters > MAX_FILTERS or cfg.filters * cfg.channels > MAX_FEATURES:
            return f"takes at most {MAX_FEATURES} perception features, not {cfg.filters * cfg.channels}"
        return None

    @torch.inference_mode()
    def rollout(self, model: RNCA, image, mask, steps, seeds, origin=(0, 0), stats=None, precision="fp32"):
        why = self.unavailable(image.device, precision_dtype(precision), model)
        if why:
            raise ValueError(f"the fused engine cannot run this rollout: {why}")
        bufs = R.Buffers(model, image, mask, seeds, origin)
        run = FusedRun(model, bufs)
        all_blocks = torch.arange(run.reach.numel())

        def step(t: int, blocks: torch.Tensor):
            blocks = blocks if self.skip_blocks else all_blocks
            return (*run.step(t, blocks), len(blocks))

        b, _, h, w = image.shape
        R.run_steps(step, run.initial_reach(), steps, b * h * w, stats)
        return bufs.visible()

    def training_inputs(self, model, image):
        return R.batched_patches(image)

    def train_step(self, model, state, inputs, noise, t):
        return R.step(model, state, inputs, noise, t, perceive_rows)


class FusedRun:
    """The buffers of one fused rollout; :meth:`step` updates ``bufs.buf`` in place."""

    def __init__(self, model: RNCA, bufs: R.Buffers):
        cfg = model.config
        b, k, hr, wr = bufs.buf.shape
        self.k, self.hr, self.wr = k, hr, wr
        self.flat = bufs.flat  # (B*Hr*Wr, K)
        self.patches = bufs.patches.contiguous()  # (B*Hr*Wr, P)
        self.keys = bufs.keys.contiguous().view(-1)
        self.inside = bufs.inside.contiguous().view(-1).to(torch.uint8)
        self.shape = bufs.shape  # blocks: (B, nby, nbx)
        self.thr = cfg.alive_threshold
        self.bright = (self.flat[:, 0] >= self.thr).to(torch.uint8)  # kept up to date by the kernels
        threshold = fire_threshold(min(cfg.fire_rate, 1.0))  # a cell fires iff its hash is below limit
        self.fire_all, self.fire_none = threshold >= 1 << (64 - STEP_SHIFT), threshold <= 0
        self.limit = min(threshold, (1 << (64 - STEP_SHIFT)) - 1) << STEP_SHIFT
        with torch.no_grad():
            self.filters = torch.stack([f.reshape(k, 9).t() for f in R.perception_filters(model)]).contiguous()  # (F, 9, K)
            w1, w2, b2 = R.mlp_weights(model, torch.float32)
            self.w1_t, self.fc2_t, self.fc2_bias = w1.t(), w2.t().contiguous(), b2.clone()
        n = b * self.shape[1] * self.shape[2]
        self.reach = torch.zeros(n, dtype=torch.bool)
        self.kernels = kernels.StepKernels(  # checks every buffer once; the scratch is per block: bit rows
            self.flat, self.bright, self.keys, self.inside, self.patches, self.filters, hr, wr,
            todo=torch.empty(n, BLOCK, dtype=torch.int32), pre=torch.empty(n, BLOCK, dtype=torch.int32),
            keep=torch.empty(n, BLOCK, dtype=torch.int32), flags=torch.empty(n, 9, dtype=torch.uint8),
            counts=torch.empty(n, dtype=torch.int64), reach=self.reach)
        self.x = torch.empty(0, self.kernels.width)  # MLP input rows, grown on demand
        self.states = torch.empty(0, k)
        self.rows = torch.empty(0, dtype=torch.int64)

    def initial_reach(self) -> torch.Tensor:
        """(B*nby*nbx,) bool: the blocks the first step can change, those within 2 pixels of a
        cell holding state."""
        b, nby, nbx = self.shape
        held = (self.flat != 0).any(1).view(b, 1, self.hr, self.wr)[:, :, RING:-RING, RING:-RING].float()
        near = F.max_pool2d(held, 5, stride=1, padding=2)  # (B, 1, Hp, Wp): within 2 pixels of state
        return near.view(b, nby, BLOCK, nbx, BLOCK).amax((2, 4)).view(-1) > 0

    def step(self, t: int, blocks: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Step ``t`` on ``blocks`` ((nb,) int64 block ids, which hold every cell the step can
        change). Returns (the blocks the next step can change, alive cells, updated cells)."""
        threads = torch.get_num_threads()
        blocks = blocks.contiguous()
        m, alive = self.kernels.select(blocks, t << STEP_SHIFT, self.limit, self.fire_all, self.fire_none, threads)
        if m > len(self.x):  # reused across steps, grown with a quarter to spare
            rows = min(len(self.flat), m * 5 // 4)
            self.x, self.states = self.x.new_empty(rows, self.x.shape[1]), self.states.new_empty(rows, self.k)
            self.rows = self.rows.new_empty(rows)
        x, states, rows = self.x[:m], self.states[:m], self.rows[:m]
        self.kernels.gather(blocks, x, states, rows, threads)
        for chunk in R.row_chunks(m):  # the MLP: new state = state + fc2(relu(fc1 x)) + fc2 bias
            hidden = torch.mm(x[chunk], self.w1_t).relu_()
            torch.addmm(states[chunk], hidden, self.fc2_t, out=states[chunk])
        states.add_(self.fc2_bias)
        self.reach.zero_()
        self.kernels.scatter(blocks, states, rows, self.thr, threads)
        return self.reach, alive, m


# -- training ----------------------------------------------------------------------------------


def perceive_rows(state: torch.Tensor, state_filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(M, F*K) perception features of the cells at pixel ``rows`` (ascending) of ``state``
    (B, K, H, W), in :func:`~.rows.fc1_weight`'s column order: the rows of
    :func:`~.rows.perceive_maps`, computed for those cells only. Differentiable in ``state`` and
    ``state_filters`` (the model's (F*K, 1, 3, 3) depthwise weight)."""
    return _PerceiveRows.apply(state, state_filters, rows)


class _PerceiveRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, state_filters, rows):
        b, k, h, w = state.shape
        nf = state_filters.shape[0] // k
        cells = state.permute(0, 2, 3, 1).contiguous()  # (B, H, W, K): free for channels_last state
        filters = state_filters.detach().view(k, nf, 9).permute(1, 2, 0).contiguous()  # (F, 9, K)
        rows = rows.contiguous()
        out = cells.new_empty(len(rows), nf * k)
        kernels.perceive_rows(cells, rows, filters, out, torch.get_num_threads())
        ctx.save_for_backward(cells, filters, rows)
        return out

    @staticmethod
    def backward(ctx, grad):
        cells, filters, rows = ctx.saved_tensors
        b, h, w, k = cells.shape
        nf = filters.shape[0]
        grad_cells = torch.zeros_like(cells) if ctx.needs_input_grad[0] else None  # (B, H, W, K)
        grad_filters = filters.new_zeros(nf, 9, k)
        kernels.perceive_rows_backward(cells, rows, filters, grad.contiguous(), grad_cells, grad_filters,
                                       torch.get_num_threads())
        grad_state = None if grad_cells is None else grad_cells.permute(0, 3, 1, 2)  # channels_last like the state
        return grad_state, grad_filters.permute(2, 0, 1).reshape(k * nf, 1, 3, 3), None
