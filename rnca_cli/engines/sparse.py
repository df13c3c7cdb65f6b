"""The ``sparse`` engine: the rule run in place in PyTorch, on the blocks a step can change.

* **In place, zero ring.** The state lives in one channels-last buffer (:class:`~.rows.Buffers`)
  whose outer 2-pixel ring and padding to whole blocks stay zero: convolutions run unpadded on it.
* **Only the cells that matter.** The MLP runs on the rows of the cells that fire and are
  :func:`~.rows.needed`, gathered into one reused matrix; the new states are copied back.
* **Only the blocks a step can change.** A step reads at most 2 pixels around a cell with state,
  so after each step only the 16x16 blocks holding a kept cell, and the neighbours a kept cell
  lies within 2 pixels of, can change (:meth:`_Run.reach`). When those are fewer than half the
  blocks, the step (:meth:`_Run.sparse_step`) works on their *frames* (each block with its 2-pixel
  margin), gathered side by side, and nothing else; otherwise on the whole image
  (:meth:`_Run.dense_step`).
"""

from __future__ import annotations

import torch

from ..constants import BLOCK, RING, SPARSE_BELOW
from ..model import RNCA, FireNoise
from . import Engine, precision_dtype, rows as R

FRAME = BLOCK + 2 * RING  # side of a block's frame: the block and its 2-pixel margin


class SparseEngine(Engine):
    name = "sparse"

    def __init__(self, skip_blocks: bool = True):
        """``skip_blocks=False``: every step on the whole image (for tests and benchmarks)."""
        self.skip_blocks = skip_blocks

    def unavailable(self, device, dtype, model):
        return None

    @torch.inference_mode()
    def rollout(self, model: RNCA, image, mask, steps, seeds, origin=(0, 0), stats=None, precision="fp32"):
        # inference_mode rather than no_grad: a sparse step is a hundred small operations, and
        # their version counters and view tracking were most of their cost.
        bufs = R.Buffers(model, image, mask, seeds, origin)
        run = _Run(model, bufs, precision_dtype(precision), counting=stats is not None)
        sparse = self.skip_blocks and model.config.alive_threshold > 0

        def step(t: int, blocks: torch.Tensor):
            if sparse and len(blocks) < SPARSE_BELOW * len(run.all_blocks):
                return (*run.sparse_step(t, blocks), len(blocks))
            return (*run.dense_step(t), len(run.all_blocks))

        b, _, h, w = image.shape
        R.run_steps(step, run.reach_all(run.held[:, RING:-RING, RING:-RING]), steps, b * h * w, stats)
        return bufs.visible()

    def training_inputs(self, model, image):
        return R.batched_patches(image)

    def train_step(self, model, state, inputs, noise, t):
        return R.step(model, state, inputs, noise, t)


class _Run:
    """The tables of one rollout and its two kinds of step, both in place on the buffers.

    Cells are addressed by *buffer rows*, blocks by *block ids* in (b, by, bx) order. Per-rollout
    tables turn one into the other, so a step spends no operations on index arithmetic: ``frames``
    holds each block's buffer rows with a 2-pixel margin, a FRAME x FRAME *frame*, in which sparse
    steps do all their work.
    """

    def __init__(self, model: RNCA, bufs: R.Buffers, dtype: torch.dtype, counting: bool):
        """``dtype``: the MLP's number format; ``counting``: count alive cells for the statistics."""
        self.model, self.buf, self.counting = model, bufs.buf, counting
        s, r = BLOCK, RING
        b, k, hr, wr = bufs.buf.shape
        hp, wp, dev = hr - 2 * r, wr - 2 * r, bufs.buf.device
        self.flat = bufs.flat
        self.visible = self.flat[:, 0]  # the visible channel, per buffer row (a strided view)
        # Bright flags (visible >= threshold) per buffer row: sparse alive tests read these bytes,
        # not the visible channel, whose values each sit on their own cache line. Sparse steps
        # keep them up to date; after a dense step they are recomputed once (``bright_stale``).
        self.thr = model.config.alive_threshold
        self.bright = self.visible >= self.thr  # (B*(Hp+4)*(Wp+4),) bool
        self.bright_stale = False
        # Cells that may hold state: a superset of the nonzero cells, so a sparse step clears only these.
        self.held = bufs.buf[:, 0] != 0  # (B, Hp+4, Wp+4)
        self.inside, self.padded = bufs.inside, bufs.padded  # steps test ``inside`` only when padded
        self.core_keys = bufs.keys[:, r:-r, r:-r].contiguous()  # (B, Hp, Wp), for dense steps
        self.keys = bufs.keys.view(-1)
        self.patches = bufs.patches.to(dtype)  # (B*(Hp+4)*(Wp+4), 9C + 1)
        # The MLP's weights, cast once per rollout; for sparse steps, whose state features come from
        # perception_matrix, also the first layer split in its state and image columns.
        self.weights = R.mlp_weights(model, dtype)
        self.fc1_state = self.weights[0][:, : model.n_features].contiguous()  # (Hd, F*K)
        self.fc1_image = self.weights[0][:, model.n_features :].contiguous()  # (Hd, 9C + 1)
        self.fc2_t = self.weights[1].t().contiguous()  # (Hd, K)
        self.fc2_bias = self.weights[2].to(self.buf.dtype)  # added to the float32 state
        self.filters = R.perception_filters(model)
        self.perception = R.perception_matrix(model)  # (9K, F*K), float32 like the state
        # A small product at the start of each sparse step on a CPU: it wakes the vector units
        # that the step's GEMMs need (they power down while the step gathers and tests).
        self.wake = (self.buf.new_ones(256, 9 * k), self.perception) if dev.type == "cpu" else None
        # Buffer row of each (b, y, x) core pixel, and its row in dense perception maps (computed
        # on the buffer without its outer ring: (B, Hp+2, Wp+2) outputs).
        self.buf_rows = _grid_rows(b, hp, wp, r, dev)
        self.map_rows = _grid_rows(b, hp, wp, r - 1, dev)
        # Frames: block id -> the buffer rows of its FRAME x FRAME cells, and which of them are the
        # block's own (the core). A cell's 3x3 neighbourhood: its row plus ``taps``, (dy, dx) order.
        by, bx = torch.meshgrid(torch.arange(hp // s, device=dev), torch.arange(wp // s, device=dev), indexing="ij")
        bi = torch.arange(b, device=dev)[:, None, None]
        corner = ((bi * hr + by * s) * wr + bx * s).reshape(-1, 1)  # buffer row of each frame's top-left cell
        side = torch.arange(FRAME, device=dev)
        self.frames = corner + (side[:, None] * wr + side[None, :]).view(-1)  # (B*nby*nbx, FRAME^2)
        self.core = torch.zeros(FRAME, FRAME, dtype=torch.bool, device=dev)
        self.core[r:-r, r:-r] = True
        self.core = self.core.view(-1)
        d = torch.arange(-1, 2, device=dev)
        self.taps = (d[:, None] * wr + d[None, :]).view(-1)  # (9,)
        # For reach: the ids of each block and its 8 neighbours in a grid with a ring of blocks (so
        # that neighbours never leave it), in (dy, dx) order; and which of those nine a kept cell
        # of a frame can change next, as a (FRAME^2, 9) 0/1 matrix. Bands of a frame's rows
        # (columns): the block's first 2, all of them, its last 2; the margin is in none.
        nby, nbx = hp // s, wp // s
        self.padded_shape = (b, nby + 2, nbx + 2)
        padded_ids = ((bi * (nby + 2) + by + 1) * (nbx + 2) + bx + 1).reshape(-1, 1)
        self.targets = padded_ids + (d[:, None] * (nbx + 2) + d[None, :]).view(-1)  # (B*nby*nbx, 9)
        self.all_blocks = torch.arange(b * nby * nbx, device=dev)
        bands = torch.zeros(FRAME, 3, device=dev)
        bands[r : 2 * r, 0], bands[r : r + s, 1], bands[s : r + s, 2] = 1.0, 1.0, 1.0
        self.regions = torch.einsum("yi,xj->yxij", bands, bands).reshape(FRAME * FRAME, 9)
        self.core_regions = self.regions[self.core]  # (S^2, 9): the rows of a block's own cells
        # MLP input rows [state features, image patch, 1] of dense steps, reused every step, grown
        # on demand (at most half the pixels fire at the paper's rate).
        self.x = self.buf.new_empty(0, model.n_features + self.patches.shape[1], dtype=dtype)

    def fires(self, t: int, rows: torch.Tensor) -> torch.Tensor:
        """(M,) bool: which of the cells at buffer ``rows`` apply their update in step ``t``."""
        return FireNoise.fires(self.keys.index_select(0, rows), t, self.model.config.fire_rate)

    def update(self, maps: list[torch.Tensor], map_rows: torch.Tensor, rows: torch.Tensor) -> int:
        """Add the MLP update of the cells at buffer ``rows``, whose features are rows ``map_rows``
        of the perception ``maps``, to the buffer; returns their number. The cells' states are
        gathered, the last product adds the updates to them and they are copied back (cheaper
        than ``index_add_``)."""
        self.x = self.reserve(self.x, len(rows))
        x = self.x[: len(rows)]  # (M, F*K + 9C + 1)
        features = x[:, : -self.patches.shape[1]]
        if x.dtype == maps[0].dtype:
            R.gather_rows(map_rows, maps, out=features)
        else:
            features.copy_(R.gather_rows(map_rows, maps))  # gathered in float32, then rounded
        R.gather_rows(rows, [self.patches], out=x[:, features.shape[1] :])
        states = self.flat.index_select(0, rows)  # (M, K)
        for chunk in R.row_chunks(len(rows)):
            self.add_update(torch.mm(x[chunk], self.weights[0].t()), states[chunk])
        self.flat.index_copy_(0, rows, states.add_(self.fc2_bias))
        return len(rows)

    def add_update(self, hidden: torch.Tensor, states: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """``out = states + relu(hidden) @ fc2.T`` for a chunk of rows (``out`` defaults to
        ``states``), without fc2's bias: the caller adds it once for all chunks. ``hidden`` is
        the first layer's output (chunk, Hd) and is overwritten."""
        out = states if out is None else out
        if hidden.dtype == states.dtype:
            torch.addmm(states, hidden.relu_(), self.fc2_t, out=out)
        else:  # half-precision MLP: its output is added to the float32 state
            torch.add(states, torch.mm(hidden.relu_(), self.fc2_t), out=out)

    def update_sparse(self, rows: torch.Tensor) -> int:
        """:meth:`update` without perception maps: each cell's 3x3 neighbourhood of state is
        gathered (9 buffer rows) and perceived by one GEMM with :func:`~.rows.perception_matrix`,
        and the first layer runs in its two halves. Perception sums in another order than a
        convolution, so sparse and dense steps agree to float rounding. Returns the cells updated."""
        m, k = len(rows), self.flat.shape[1]
        taps = (rows[:, None] + self.taps).view(-1)  # (9M,) buffer rows of the neighbourhoods
        states = self.flat.new_empty(m, k)  # the cells' new states
        for chunk in R.row_chunks(m):
            hidden = torch.mm(self.patches.index_select(0, rows[chunk]), self.fc1_image.t())  # (chunk, Hd)
            nb = self.flat.index_select(0, taps[chunk.start * 9 : chunk.stop * 9]).view(-1, 9 * k)  # (chunk, 9K)
            features = torch.mm(nb, self.perception).to(hidden.dtype)  # (chunk, F*K)
            hidden.addmm_(features, self.fc1_state.t())
            centre = nb[:, 4 * k : 5 * k]  # the cells' own states, gathered with their neighbourhoods
            self.add_update(hidden, centre, out=states[chunk])
        self.flat.index_copy_(0, rows, states.add_(self.fc2_bias))
        self.bright.index_copy_(0, rows, states[:, 0] >= self.thr)
        return m

    def reserve(self, buffer: torch.Tensor, rows: int) -> torch.Tensor:
        """``buffer``, or a larger one if it has fewer than ``rows`` rows: reused across steps, grown
        with a quarter to spare, never beyond one row for every pixel of the image."""
        if rows <= len(buffer):
            return buffer
        return buffer.new_empty(min(len(self.buf_rows), rows * 5 // 4), buffer.shape[1])

    def dense_step(self, t: int) -> tuple[torch.Tensor, int, int]:
        """One step on the whole image. Returns (:meth:`reach` after it, alive cells, updated cells)."""
        model, buf, thr, r = self.model, self.buf, self.thr, RING
        # Alive tests take the 3x3 maximum of the threshold test (bytes), not the test of the maximum.
        bright = buf[:, 0, 1:-1, 1:-1] >= thr  # (B, Hp+2, Wp+2) visible >= threshold; the ring pads
        pre = R.max3x3(bright)  # (B, Hp, Wp)
        fire = FireNoise.fires(self.core_keys, t, model.config.fire_rate) if model.config.fire_rate < 1.0 else None
        todo = R.needed(pre, bright[:, 1:-1, 1:-1], fire)  # (B, Hp, Wp)
        if fire is not None:
            todo &= fire
        if self.padded:
            todo &= self.inside[:, r:-r, r:-r]
        pix = R.flat_nonzero(todo.view(-1))  # (M,) (b, y, x) indices
        maps = R.perceive_maps(model, buf, padding=0, filters=self.filters)  # F x (B*(Hp+2)*(Wp+2), K)
        updated = self.update(maps, self.map_rows.index_select(0, pix), self.buf_rows.index_select(0, pix))
        keep = R.max3x3(buf[:, 0, 1:-1, 1:-1] >= thr).logical_and_(pre)  # (B, Hp, Wp)
        buf[:, :, r:-r, r:-r] *= keep.unsqueeze(1).to(buf.dtype)
        self.held[:, r:-r, r:-r] = keep
        self.bright_stale = True
        alive = 0
        if self.counting:
            alive = int((pre & self.inside[:, r:-r, r:-r]).sum())
        return self.reach_all(keep), alive, updated

    def sparse_step(self, t: int, blocks: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """One step on ``blocks`` (block ids, (nc,)), which hold every cell the step can change.
        Returns (:meth:`reach` after it, alive cells, updated cells).

        Every test runs on the blocks' frames, gathered side by side as one flat vector of bright
        flags, where a 3x3 maximum is four elementwise maxima of contiguous slices
        (:func:`_frame_max3x3`). Only the cells to update are gathered for the MLP, with their 3x3
        neighbourhoods (:meth:`update_sparse`); no block is convolved.
        """
        if self.wake is not None:
            torch.mm(*self.wake)  # result unused: wakes the vector units for the step's GEMMs
        if self.bright_stale:
            torch.ge(self.visible, self.thr, out=self.bright)
            self.bright_stale = False
        nc, area = len(blocks), FRAME * FRAME
        frames = self.frames.index_select(0, blocks).view(-1)  # (nc*A,) buffer rows
        pre = _frame_max3x3(self.bright.index_select(0, frames))  # (nc*A,); all we read below is valid
        cells = self.core  # (A,) or (nc, A): the frames' cells of the image proper
        if self.padded:
            cells = self.inside.view(-1).index_select(0, frames).view(nc, area).logical_and_(self.core)
        todo = _frame_max3x3(pre).view(nc, area).logical_and_(cells)  # within a pixel of pre
        rows = frames.index_select(0, R.flat_nonzero(todo.view(-1)))  # buffer rows of the cells to update
        if self.model.config.fire_rate < 1.0:
            rows = rows.index_select(0, R.flat_nonzero(self.fires(t, rows)))
        updated = self.update_sparse(rows) if len(rows) else 0
        held = self.held.view(-1)
        held.index_fill_(0, rows, True)
        # Alive test of the tentative state (neighbouring blocks' updates included), then clear
        # the cells that may hold state and are not alive both before and after.
        keep = _frame_max3x3(self.bright.index_select(0, frames)).logical_and_(pre)  # (nc*A,)
        gone = torch.gt(held.index_select(0, frames), keep).view(nc, area).logical_and_(self.core)  # held, not kept
        cleared = frames.index_select(0, R.flat_nonzero(gone.view(-1)))
        self.flat.index_fill_(0, cleared, 0.0)
        self.bright.index_fill_(0, cleared, False)
        held.index_fill_(0, cleared, False)
        alive = 0
        if self.counting:
            alive = int((pre.view(nc, area) & cells).sum())
        return self.reach(keep.view(nc, area), blocks), alive, updated

    def reach_all(self, keep: torch.Tensor) -> torch.Tensor:
        """:meth:`reach` for a whole-image ``keep`` (B, Hp, Wp), taken block by block with the core
        cells' rows of ``regions``."""
        b, hp, wp = keep.shape
        s = BLOCK
        by_block = keep.reshape(b, hp // s, s, wp // s, s).permute(0, 1, 3, 2, 4).reshape(-1, s * s)
        return self.spread(torch.mm(by_block.to(self.regions.dtype), self.core_regions), self.all_blocks)

    def reach(self, keep: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """(B*nby*nbx,) bool: the blocks that hold a cell the next step can change, given the frames
        of ``blocks`` (nb,), ``keep`` (nb, FRAME^2) bool: which cells of each block are kept
        (nonzero) after this step. All other cells are zero; the frames' margins are not read.

        A step reads at most 2 pixels around a cell with state (its alive test, then its
        neighbours' updates). So a block is needed if it holds a kept cell, its neighbour across
        an edge if a kept cell lies within 2 pixels of that edge, and across a corner if one lies
        in the 2 x 2 corner. One product with ``regions`` counts the kept cells in each of these
        nine regions.
        """
        return self.spread(torch.mm(keep.to(self.regions.dtype), self.regions), blocks)

    def spread(self, counts: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """(B*nby*nbx,) bool: the blocks in reach, from ``counts`` (nb, 9): how many kept cells of
        each of ``blocks`` can change each of its 9 neighbours (itself included), (dy, dx) order."""
        grid = counts.new_zeros(self.padded_shape)  # (B, nby+2, nbx+2): kept cells in reach of each block
        grid.view(-1).index_add_(0, self.targets.index_select(0, blocks).view(-1), counts.view(-1))
        return (grid[:, 1:-1, 1:-1] > 0).view(-1)


def _frame_max3x3(v: torch.Tensor) -> torch.Tensor:
    """3x3 maximum within frames (FRAME x FRAME cells each) stacked in a flat vector (n,): entry i
    of the result is the maximum of the 3x3 window centred on entry i. Valid for every cell at
    least one pixel inside its frame; the frames' outer ring holds garbage, never read."""
    n, s = v.numel(), FRAME
    out = torch.empty_like(v)  # its garbage entries only ever meet logical operations (and, gt) and the core mask
    rows = torch.maximum(torch.maximum(v[: n - 2 * s], v[s : n - s]), v[2 * s :])  # rows[j]: max of v[j + {0, s, 2s}]
    torch.maximum(torch.maximum(rows[:-2], rows[1:-1]), rows[2:], out=out[s + 1 : n - s - 1])
    return out


def _grid_rows(b: int, hp: int, wp: int, ring: int, device) -> torch.Tensor:
    """(B*Hp*Wp,) row of each (b, y, x) pixel in the flattened (B, Hp+2r, Wp+2r) grid with a ring of ``ring``."""
    rows = torch.arange(b * (hp + 2 * ring) * (wp + 2 * ring), device=device).view(b, hp + 2 * ring, wp + 2 * ring)
    return rows[:, ring : ring + hp, ring : ring + wp].reshape(-1)
