"""Compiled CPU kernels (``_fused.c``) for the per-cell work of inference and training steps.

On a CPU, in float32, rnca uses them when the C extension ``rnca_cli._fused`` was built at install
time (``setup.py``; it needs a C compiler). Without it, or with ``RNCA_FUSED=0`` in the
environment, rnca runs the same rule in PyTorch alone: same results to float rounding, slower.
:func:`status` (and ``rnca --version``) says which.

**Inference** (:class:`FusedRun`, used by :func:`rnca_cli.inference.rollout`). A step runs on the
16x16 blocks it can change (all of them while most of the image is alive):

1. ``select`` (C): per block, the alive test before the step, the update mask, the cells whose
   update is needed (:func:`rnca_cli.model.needed`) and fire, counted per block;
2. ``gather`` (C): each of those cells perceives its 3x3 neighbourhood straight from the state
   buffer and writes ``[perception, image patch, 1]`` as one row of the MLP input, with its state;
3. the MLP in PyTorch: two GEMMs per 2048-row chunk, as :class:`rnca_cli.inference._Run` runs it;
4. ``scatter`` (C): the new states written back, the alive test after the update, the cells alive
   neither before nor after cleared, and the blocks the next step can reach (a block holding a
   kept cell, and each neighbour that a kept cell lies within 2 pixels of).

Why: in eager PyTorch the same step is some fifty operations, each a pass over the whole batch's
state (perception maps, gathers of their rows, alive tests, hash, copies, clearing). Fused, each
cell is visited once per kernel while its neighbourhood is in cache. Batch-16 inference of 64x64
images, side by side in one process: 0.44 ms per image-step against 0.79 in PyTorch alone and 2.88
for the straightforward formulation (``benchmarks/SPEED.md``, point 18, with the figures of each
kernel's own optimisations in ``_fused.c``). The results equal PyTorch's to float rounding; the
tests compare both with the reference rule.

**Training** (:func:`perceive_rows`, used by :meth:`rnca_cli.model.RNCA.step`): the perception of
the cells a step updates, computed for those cells only, and its gradient, as one autograd node;
the rest of the step (MLP, alive tests, update) stays in PyTorch and autograd.
"""

from __future__ import annotations

import math
import os
import struct

import torch
import torch.nn.functional as F

from .model import RNCA, row_chunks

try:
    from . import _fused
except ImportError as error:  # not built: no C compiler at install time
    _fused, _missing = None, str(error)
else:
    _missing = ""

BLOCK, RING = 16, 2
MAX_FEATURES = 256  # filters x channels the kernels take (_fused.c)


def status() -> str:
    """One line: whether the fused kernels are in use, and if not, why."""
    if os.environ.get("RNCA_FUSED", "1") == "0":
        return "off (RNCA_FUSED=0): inference and training run in PyTorch alone"
    if _fused is None:
        return f"not built ({_missing}): inference and training run in PyTorch alone; reinstall with a C compiler"
    threads = "OpenMP" if _fused.openmp() else "one thread (built without OpenMP)"
    return f"on (CPU, float32 inference and training; {threads})"


def _enabled() -> bool:
    """Built, and not switched off with ``RNCA_FUSED=0``."""
    return _fused is not None and os.environ.get("RNCA_FUSED", "1") != "0"


def usable(model: RNCA, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`FusedRun` can run this rollout: built, enabled, a CPU, float32, an alive
    threshold above 0 (block skipping relies on zero cells being dead, as sparse steps do) and at
    most 256 perception features (the paper's model has 48)."""
    return (
        _enabled() and device.type == "cpu" and dtype == torch.float32 and model.config.alive_threshold > 0
        and model.config.filters * model.config.channels <= MAX_FEATURES
    )


class FusedRun:
    """The buffers of one fused rollout; :meth:`step` updates ``buf`` in place.

    ``buf`` is the zero-ringed channels-last state buffer of :func:`rnca_cli.inference.rollout`
    (B, K, Hp+4, Wp+4), its visible channel already holding the clamped mask; ``patches`` one
    row per buffer row; ``keys`` (B, Hp+4, Wp+4) the update-mask keys, ``inside`` which cells are
    the image proper, both laid out like the buffer.
    """

    def __init__(self, model: RNCA, buf: torch.Tensor, patches: torch.Tensor, keys: torch.Tensor,
                 inside: torch.Tensor):
        cfg = model.config
        b, k, hr, wr = buf.shape
        self.buf, self.k, self.hr, self.wr = buf, k, hr, wr
        self.flat = buf.permute(0, 2, 3, 1).view(-1, k)  # (B*Hr*Wr, K), the same memory
        self.patches = patches.contiguous()  # (B*Hr*Wr, P)
        self.keys = keys.contiguous().view(-1)
        self.inside = inside.contiguous().view(-1)
        self.shape = (b, (hr - 2 * RING) // BLOCK, (wr - 2 * RING) // BLOCK)  # blocks
        self.thr = cfg.alive_threshold
        self.bright = (self.flat[:, 0] >= self.thr).to(torch.uint8)  # kept up to date by the kernels
        # Update mask: fires iff the hash is below limit (FireNoise.fires, where the rate is
        # rounded to float32 and compared on the top 24 bits).
        rate = struct.unpack("f", struct.pack("f", min(cfg.fire_rate, 1.0)))[0]
        threshold = math.ceil(rate * (1 << 24))
        self.fire_all, self.fire_none = int(threshold >= 1 << 24), int(threshold <= 0)
        self.limit = min(threshold, (1 << 24) - 1) << 40
        with torch.no_grad():
            self.filters = torch.stack([f.reshape(k, 9).t() for f in model.perception_filters()]).contiguous()  # (F, 9, K)
            w1, w2, b2 = model.mlp_weights(torch.float32)
            self.w1_t, self.fc2_t, self.fc2_bias = w1.t(), w2.t().contiguous(), b2.clone()
        self.nf, self.np = cfg.filters, self.patches.shape[1]
        n = b * self.shape[1] * self.shape[2]
        self.todo = torch.empty(n, BLOCK, dtype=torch.int32)  # per-block scratch of the kernels: bit rows
        self.pre = torch.empty(n, BLOCK, dtype=torch.int32)
        self.keep = torch.empty(n, BLOCK, dtype=torch.int32)
        self.flags = torch.empty(n, 9, dtype=torch.uint8)
        self.counts = torch.empty(n, dtype=torch.int64)
        self.reach = torch.zeros(n, dtype=torch.bool)
        self.x = torch.empty(0, self.nf * k + self.np)  # MLP input rows, grown on demand
        self.states = torch.empty(0, k)
        self.rows = torch.empty(0, dtype=torch.int64)

    def initial_reach(self) -> torch.Tensor:
        """(B*nby*nbx,) bool: the blocks the first step can change: those within 2 pixels of a
        cell holding state (the rule of :meth:`step`'s reach, on the initial state)."""
        b, nby, nbx = self.shape
        held = (self.flat != 0).any(1).view(b, 1, self.hr, self.wr)[:, :, RING:-RING, RING:-RING].float()
        near = F.max_pool2d(held, 5, stride=1, padding=2)  # (B, 1, Hp, Wp): within 2 pixels of state
        return near.view(b, nby, BLOCK, nbx, BLOCK).amax((2, 4)).view(-1) > 0

    def step(self, t: int, blocks: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Step ``t`` on ``blocks`` ((nb,) int64 block ids, which hold every cell the step can
        change). Returns (the blocks the next step can change, alive cells, updated cells)."""
        threads = torch.get_num_threads()
        nb, k = len(blocks), self.k
        blocks = blocks.contiguous()
        grid = (self.hr, self.wr, k)
        m, alive = _fused.select(
            self.bright.data_ptr(), self.keys.data_ptr(), self.inside.data_ptr(), *grid, blocks.data_ptr(), nb,
            t << 40, self.limit, self.fire_all, self.fire_none, self.todo.data_ptr(),
            self.pre.data_ptr(), self.counts.data_ptr(), threads,
        )
        if m > len(self.x):  # reused across steps, grown with a quarter to spare
            rows = min(len(self.flat), m * 5 // 4)
            self.x, self.states = self.x.new_empty(rows, self.x.shape[1]), self.states.new_empty(rows, k)
            self.rows = self.rows.new_empty(rows)
        x, states = self.x[:m], self.states[:m]
        _fused.gather(
            self.flat.data_ptr(), self.patches.data_ptr(), self.np, self.filters.data_ptr(), self.nf, *grid,
            blocks.data_ptr(), nb, self.todo.data_ptr(), self.counts.data_ptr(), x.data_ptr(),
            states.data_ptr(), self.rows.data_ptr(), threads,
        )
        for chunk in row_chunks(m):  # the MLP: new state = state + fc2(relu(fc1 x)) + fc2 bias
            hidden = torch.mm(x[chunk], self.w1_t).relu_()
            torch.addmm(states[chunk], hidden, self.fc2_t, out=states[chunk])
        states.add_(self.fc2_bias)
        self.reach.zero_()
        _fused.scatter(
            self.flat.data_ptr(), self.bright.data_ptr(), self.inside.data_ptr(), *grid, blocks.data_ptr(), nb,
            states.data_ptr(),
            self.rows.data_ptr(), m, self.pre.data_ptr(), self.thr, self.keep.data_ptr(), self.flags.data_ptr(),
            self.reach.data_ptr(), threads,
        )
        return self.reach, alive, m


# -- training ----------------------------------------------------------------------------------


def trainable(state: torch.Tensor, model: RNCA) -> bool:
    """Whether :func:`perceive_rows` can run this training step: built, enabled, a CPU, float32,
    at most 256 perception features."""
    cfg = model.config
    return (
        _enabled() and state.device.type == "cpu" and state.dtype == torch.float32 and cfg.filters * cfg.channels <= MAX_FEATURES
    )


def perceive_rows(state: torch.Tensor, state_filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(M, F*K) perception features of the cells at pixel ``rows`` (ascending, as
    :func:`~rnca_cli.model.flat_nonzero` gives them) of ``state`` (B, K, H, W), in
    :meth:`~rnca_cli.model.RNCA.fc1`'s column order: the rows of ``RNCA.perceive(state)``, computed
    for those cells only. Differentiable in ``state`` and ``state_filters`` (the model's
    (F*K, 1, 3, 3) depthwise weight).

    What it replaces in a training step: three depthwise convolutions over the whole batch,
    gathering their rows, and in the backward zero-filling three (B*H*W, K) map gradients,
    copying the rows' gradients into them and the convolutions' backward.
    """
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
        _fused.perceive_rows(cells.data_ptr(), b, h, w, k, rows.data_ptr(), len(rows), filters.data_ptr(), nf,
                             out.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(cells, filters, rows)
        return out

    @staticmethod
    def backward(ctx, grad):
        cells, filters, rows = ctx.saved_tensors
        b, h, w, k = cells.shape
        nf = filters.shape[0]
        grad = grad.contiguous()
        grad_state = torch.zeros_like(cells) if ctx.needs_input_grad[0] else None  # (B, H, W, K)
        grad_filters = filters.new_zeros(nf, 9, k)
        _fused.perceive_rows_backward(
            cells.data_ptr(), b, h, w, k, rows.data_ptr(), len(rows), filters.data_ptr(), nf, grad.data_ptr(),
            0 if grad_state is None else grad_state.data_ptr(), grad_filters.data_ptr(), torch.get_num_threads(),
        )
        if grad_state is not None:
            grad_state = grad_state.permute(0, 3, 1, 2)  # (B, K, H, W), channels_last like the state
        return grad_state, grad_filters.permute(2, 0, 1).reshape(k * nf, 1, 3, 3), None
