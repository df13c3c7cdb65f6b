"""Fast, exact inference: the rNCA rule run in place, skipping dead blocks, on tiles.

:meth:`rnca_cli.model.RNCA.step` is the reference formulation (and what training differentiates).
:func:`rollout` computes the same result without autograd, faster and in bounded memory:

* **In place, zero ring.** The state lives in one channels-last buffer (B, K, H'+4, W'+4) whose
  outer 2-pixel ring and padding to a multiple of the block size stay zero. Convolutions run
  unpadded on the buffer (the ring *is* the zero padding). Padding cells never update, and a zero
  neighbour cannot make a cell alive because the alive threshold is > 0, so the padding changes
  nothing.
* **Only the cells that matter are updated.** A cell that is not alive before a step ends it with
  a zero state whatever its update, and a cell that does not fire keeps its state. So the MLP runs
  only on the cells that fire and lie within one pixel of a pre-alive cell (their tentative values
  are what the post-update alive test of the kept cells reads), as in
  :meth:`~rnca_cli.model.RNCA.step`: their rows of the perception maps and image patches are
  gathered into one reused matrix, and the updates are added back into the buffer in place.
  At the paper's fire rate that is at most half the pixels, fewer as the mask thins out. Dense
  steps also leave out the dead cells next to alive cells whose survival is already certain
  (:func:`~rnca_cli.model.needed`), about a tenth of the MLP rows.
* **Only the blocks a step can change are touched.** A step reads at most 2 pixels around a cell
  with state, so after each step the 16 x 16 blocks holding a kept cell, and their neighbours
  across an edge (a corner) that a kept cell lies within 2 pixels of, are the only ones the next
  step can change (:meth:`_Run.reach`). When they are fewer than half the blocks, the step
  (:meth:`_Run.sparse_step`) gathers the bright flags (visible >= threshold, kept per cell) of
  their *frames* (each block with a 2-pixel margin) side by side and does all its work (alive
  tests, update mask, clearing) there, nothing on the whole image; the cells to update gather
  their 3x3 neighbourhoods and perceive them with one small GEMM (:meth:`_Run.update_sparse`).
  Patches, update-mask keys and the bright and may-hold-state flags are laid out like the state
  buffer, so a sparse step indexes everything by buffer row. 512x512 with one ring: 4.6 -> 2.1 ms
  per steady-state step when blocks replaced the whole-image work, 2.45-2.50 -> 2.11-2.16 ms with
  frames, then to 1.4-1.5 ms with the vector units woken before the GEMMs and the new states
  copied into place, then about 9 % less with the bright flags and 7 % less again with
  :func:`~rnca_cli.model.flat_nonzero` (A/B in one process each), where a whole-image step
  costs 45-85 ms. Otherwise the step runs on the whole image
  (:meth:`_Run.dense_step`).
* **Tiles.** One step reads neighbours 2 pixels away (1 through perception, 1 more through the
  alive test of the neighbours' tentative values). A tile grown by a halo of ``2 * steps + 1``
  pixels (one more for the image convolution) therefore refines its core exactly as the whole
  image would, and :class:`~rnca_cli.model.FireNoise` draws from global coordinates. Large images
  are refined tile by tile, so memory is bounded by the tile size.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import fused as fused_kernels
from .device import float32_convolutions
from .model import RNCA, FireNoise, flat_nonzero, gather_rows, max3x3, needed, row_chunks, visible

BLOCK = 16
RING = 2  # zero pixels around the image in the state buffer: a block's 2-pixel margin never leaves it
FRAME = BLOCK + 2 * RING  # side of a block's frame: the block and its 2-pixel margin
SPARSE_BELOW = 0.5  # use the block-sparse step when fewer than this share of blocks is needed
# Number formats of the per-pixel MLP (``--precision``); the state is always float32.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TILE = 768  # core side; with a 129-pixel halo (64 steps) about 1 GB of working memory


def halo(steps: int) -> int:
    """Pixels of context a tile needs on each side for an exact result after ``steps`` updates."""
    return 2 * steps + 1


@torch.inference_mode()
def rollout(
    model: RNCA, image: torch.Tensor, mask: torch.Tensor, steps: int, seeds: torch.Tensor,
    origin: tuple[int, int] = (0, 0), sparse: bool = True, stats: dict | None = None, precision: str = "fp32",
    fused: bool | None = None,
) -> torch.Tensor:
    """Refined probability (B, H, W) for image (B, C, H, W) and mask (B, H, W), as
    ``visible(model.rollout(...))`` with the same seeds, computed without autograd.

    It runs under ``torch.inference_mode`` rather than ``no_grad``: no version counters or view
    tracking, which is most of a small operation's cost, and a sparse step is a hundred small
    operations (512x512 with one ring: 5.5 -> 3.6-4.2 ms per steady-state step, A/B in one run).
    The result is an inference tensor: clone it before using it where autograd records.

    ``origin`` is the global position of pixel (0, 0) (for tiles); ``sparse=False`` forces dense
    steps; ``stats``, if given, receives the number of dense and sparse steps, the mean share
    (over steps) of blocks computed, of cells alive and of cells updated, and each step's wall
    time (``step_seconds``; CPU: the steps run synchronously). ``precision`` (a key of
    :data:`PRECISIONS`) is the number format of the per-pixel MLP, where nearly all arithmetic
    happens; the state, its perception and the alive tests stay float32 whatever it is, so rounding
    does not accumulate in the state over the steps. ``fused``: run the step's per-cell work in the
    compiled kernels of :mod:`rnca_cli.fused` (None: where they can run: built, a CPU, float32;
    True: insist; False: PyTorch alone). Both give the same result to float rounding.
    """
    cfg = model.config
    b, _, h, w = image.shape
    k, s = cfg.channels, BLOCK
    nby, nbx = math.ceil(h / s), math.ceil(w / s)
    hp, wp = nby * s, nbx * s  # padded to whole blocks
    use_sparse = sparse and cfg.alive_threshold > 0

    ring = (RING, wp - w + RING, RING, hp - h + RING)  # the image padded like the state buffer
    run = _Run(
        model=model,
        buf=image.new_zeros(b, hp + 2 * RING, wp + 2 * RING, k).permute(0, 3, 1, 2),  # channels_last
        mask=mask.clamp(cfg.visible_floor, 1.0),
        patches=model.image_patches(F.pad(image, ring)),  # (B*(Hp+4)*(Wp+4), 9C + 1), per buffer row
        noise=FireNoise(seeds.to(image.device), (hp, wp), origin),
        dtype=PRECISIONS[precision],
        counting=stats is not None,
    )
    usable = fused_kernels.usable(model, image.device, PRECISIONS[precision])
    if fused and not usable:
        raise ValueError(f"the fused kernels cannot run this rollout: {fused_kernels.status()}, "
                         f"device {image.device.type}, precision {precision}")
    fast = fused_kernels.FusedRun(model, run.buf, run.patches, run.keys, run.inside) if usable and fused is not False else None
    # blocks the next step can change
    reach = fast.initial_reach() if fast else run.reach_all(run.held[:, RING:-RING, RING:-RING])
    counts = {"dense_steps": 0, "sparse_steps": 0, "block_share": 0.0, "alive_share": 0.0, "update_share": 0.0}
    seconds = []

    with float32_convolutions(image.device):  # fp32 on a GPU matches the CPU (see there)
        for t in range(steps):
            start = time.perf_counter()
            blocks = flat_nonzero(reach)  # (nc,) block ids, (b, by, bx) order
            if len(blocks) == 0:
                break  # nothing left alive: every later step keeps the all-zero state
            if fast is not None:  # the fused step runs on the given blocks, whichever they are
                blocks = blocks if use_sparse else run.all_blocks
                is_sparse = len(blocks) < SPARSE_BELOW * reach.numel()
                reach, alive, updated = fast.step(t, blocks)
                counts["sparse_steps" if is_sparse else "dense_steps"] += 1
            elif use_sparse and len(blocks) < SPARSE_BELOW * reach.numel():
                reach, alive, updated = run.sparse_step(t, blocks)
                counts["sparse_steps"] += 1
            else:
                reach, alive, updated = run.dense_step(t)
                counts["dense_steps"] += 1
            if stats is not None:
                counts["block_share"] += len(blocks) / reach.numel() / steps
                counts["alive_share"] += alive / (b * h * w) / steps
                counts["update_share"] += updated / (b * h * w) / steps
                seconds.append(time.perf_counter() - start)  # the step synchronised: its ``flat_nonzero`` reads the result
    if stats is not None:
        stats.update(counts, step_seconds=seconds)
    return visible(run.buf[:, :, RING : h + RING, RING : w + RING])


class _Run:
    """The buffers of one rollout and its two kinds of step, both in place on ``buf``.

    Cells are addressed by *buffer rows*, their index in ``flat`` (and in ``patches``, ``keys``
    and ``held``, which are laid out like the buffer); blocks by *block ids* in (b, by, bx) order.
    Per-rollout tables turn one into the other, so a step spends no operations on index
    arithmetic: ``frames`` holds each block's buffer rows with a 2-pixel margin, a *frame* of
    FRAME x FRAME cells, in which sparse steps do all their work.
    """

    def __init__(
        self, model: RNCA, buf: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor, noise: FireNoise,
        dtype: torch.dtype, counting: bool,
    ):
        """``buf``: the zero state buffer (B, K, Hp+4, Wp+4); ``mask`` (B, H, W): the initial visible
        channel, H <= Hp and W <= Wp; ``patches``: one row per buffer row; ``noise``: for the
        (B, Hp, Wp) cells; ``counting``: count alive cells for the statistics."""
        self.model, self.buf, self.counting = model, buf, counting
        s, r = BLOCK, RING
        b, k, hr, wr = buf.shape
        hp, wp, dev = hr - 2 * r, wr - 2 * r, buf.device
        h, w = mask.shape[1:]
        self.flat = buf.permute(0, 2, 3, 1).view(-1, k)  # (B*(Hp+4)*(Wp+4), K), the same memory
        self.visible = self.flat[:, 0]  # the visible channel, per buffer row (a strided view)
        buf[:, 0, r : h + r, r : w + r] = mask
        # Which cells are bright (visible >= the alive threshold), per buffer row, for sparse steps.
        # Their alive tests read it on their frames twice per step. Reading the visible channel
        # itself there was slow: in the buffer each value sits on its own 64-byte cache line, so a
        # frame gather touched 14,400 lines, mostly no longer in cache (140-150 us inside the
        # rollout against 15 us in a hot loop), and each test then compared 14,400 floats. A
        # contiguous float copy of the channel took 0-16 % off a steady-state step of 512x512
        # with one ring (six A/B pairs); these flags, which also spare both tests their 14,400
        # float comparisons, take 9 % off in the median of ten A/B pairs against the code before
        # either (-17 % to +10 %; e.g. 2.32 -> 2.00 ms), 4 rings 7.9 -> 6.9 and 6.5 -> 6.3 ms.
        # Sparse steps keep the flags up to date (updated cells' new values are compared, cleared
        # cells reset); after dense steps, which do not, they are recomputed once (``bright_stale``).
        self.thr = model.config.alive_threshold
        self.bright = self.visible >= self.thr  # (B*(Hp+4)*(Wp+4),) bool
        self.bright_stale = False
        # Cells that may hold state: a superset of the nonzero cells, so a sparse step clears only these.
        self.held = buf[:, 0] != 0  # (B, Hp+4, Wp+4)
        self.inside = torch.zeros(b, hr, wr, dtype=torch.bool, device=dev)  # cells of the image proper
        self.inside[:, r : h + r, r : w + r] = True  # padding cells never update
        self.padded = (hp, wp) != (h, w)  # steps test ``inside`` only then
        self.keys = torch.zeros(b, hr, wr, dtype=torch.int64, device=dev)  # update-mask hash keys
        self.keys[:, r:-r, r:-r] = noise.keys
        self.core_keys = self.keys[:, r:-r, r:-r].contiguous()  # (B, Hp, Wp), for dense steps
        self.keys = self.keys.view(-1)
        self.patches = patches.to(dtype)  # (B*(Hp+4)*(Wp+4), 9C + 1)
        # The MLP's weights, cast once per rollout; for sparse steps, whose state features come from
        # perception_matrix, also the first layer split in its state and image columns.
        self.weights = model.mlp_weights(dtype)
        self.fc1_state = self.weights[0][:, : model.n_features].contiguous()  # (Hd, F*K)
        self.fc1_image = self.weights[0][:, model.n_features :].contiguous()  # (Hd, 9C + 1)
        self.fc2_t = self.weights[1].t().contiguous()  # (Hd, K)
        self.fc2_bias = self.weights[2].to(buf.dtype)  # added to the float32 state
        self.filters = model.perception_filters()  # sliced once per rollout (190 us per step at 1 ring)
        self.perception = model.perception_matrix()  # (9K, F*K), float32 like the state
        # A small product that starts every sparse step on a CPU (see sparse_step).
        self.wake = (buf.new_ones(256, 9 * k), self.perception) if buf.device.type == "cpu" else None
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
        self.x = buf.new_empty(0, model.n_features + patches.shape[1], dtype=dtype)

    def fires(self, t: int, rows: torch.Tensor) -> torch.Tensor:
        """(M,) bool: which of the cells at buffer ``rows`` apply their update in step ``t``."""
        return FireNoise.fires(self.keys.index_select(0, rows), t, self.model.config.fire_rate)

    def update(self, maps: list[torch.Tensor], map_rows: torch.Tensor, rows: torch.Tensor) -> int:
        """Add the MLP update of the cells at buffer ``rows``, whose features are rows ``map_rows``
        of the perception ``maps``, to the buffer. Returns their number.

        As in :meth:`update_sparse`, the cells' states are gathered, the last product adds the
        updates to them and they are copied back, which costs less than ``index_add_`` of the
        updates (28k rows: 100 + 190 us against 500 us, isolated).
        """
        self.x = self.reserve(self.x, len(rows))
        x = self.x[: len(rows)]  # (M, F*K + 9C + 1)
        features = x[:, : -self.patches.shape[1]]
        if x.dtype == maps[0].dtype:
            gather_rows(map_rows, maps, out=features)
        else:
            features.copy_(gather_rows(map_rows, maps))  # gathered in float32, then rounded
        gather_rows(rows, [self.patches], out=x[:, features.shape[1] :])
        states = self.flat.index_select(0, rows)  # (M, K)
        for chunk in row_chunks(len(rows)):
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
        gathered (9 buffer rows) and perceived by one GEMM with
        :meth:`~rnca_cli.model.RNCA.perception_matrix`, and the MLP's first layer runs in its two
        halves, the image half first. Returns the number of cells updated.

        Convolving whole blocks (three depthwise convolutions of the gathered blocks, then a copy of
        the needed rows) cost more: 512x512 with 4 rings, 8.5 -> 7.3-7.6 ms per steady-state step
        (A/B, twice). Perception sums in another order here than in a convolution, so sparse and
        dense steps agree to float rounding, not bit for bit. Written out here rather than through
        :func:`~rnca_cli.model.mlp` (one chunk's products back to back, fc2's transpose made once
        per rollout): 512x512 with one ring, 1.78 -> 1.71 and 1.93 -> 1.83 ms per steady-state
        step (A/B in one process). The last product adds the update to each cell's own state,
        the centre row of its gathered neighbourhood, and the new states are copied into place:
        ``index_copy_`` of 2,248 rows takes 61 us where ``index_add_`` took 101 (isolated); one
        ring 1.71 -> 1.43 and 1.51 -> 1.45 ms, 4 rings 5.9 -> 5.1 ms (A/B; outputs within 1e-6
        of adding afterwards).
        """
        m, k = len(rows), self.flat.shape[1]
        taps = (rows[:, None] + self.taps).view(-1)  # (9M,) buffer rows of the neighbourhoods
        states = self.flat.new_empty(m, k)  # the cells' new states
        for chunk in row_chunks(m):
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
        # Alive tests take the 3x3 maximum of the threshold test, not the threshold test of the
        # maximum: on bytes instead of strided floats, 0.35 -> 0.20 ms for 16 x 66x66 (isolated).
        bright = buf[:, 0, 1:-1, 1:-1] >= thr  # (B, Hp+2, Wp+2) visible >= threshold; the ring pads
        pre = max3x3(bright)  # (B, Hp, Wp)
        # The update mask of every cell, before the one ``flat_nonzero``: hashing all keys in place costs
        # less than gathering the candidates' keys and compacting twice (batch-16 inference, A/B:
        # 0.675 -> 0.644 and 0.712 -> 0.694 ms per image-step); row tables are read with
        # ``index_select``, half the time of advanced indexing (0.840 -> 0.795, 0.953 -> 0.918).
        fire = FireNoise.fires(self.core_keys, t, model.config.fire_rate) if model.config.fire_rate < 1.0 else None
        todo = needed(pre, bright[:, 1:-1, 1:-1], fire)  # (B, Hp, Wp)
        if fire is not None:
            todo &= fire
        if self.padded:
            todo &= self.inside[:, r:-r, r:-r]
        pix = flat_nonzero(todo.view(-1))  # (M,) (b, y, x) indices
        maps = model.perceive(buf, padding=0, filters=self.filters)  # F x (B*(Hp+2)*(Wp+2), K): unpadded, the ring pads
        updated = self.update(maps, self.map_rows.index_select(0, pix), self.buf_rows.index_select(0, pix))
        keep = max3x3(buf[:, 0, 1:-1, 1:-1] >= thr).logical_and_(pre)  # (B, Hp, Wp)
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

        Every test runs on the blocks' frames, gathered side by side as one flat vector of
        bright flags: a 3x3 maximum there is four elementwise maxima of contiguous slices
        (:func:`_frame_max3x3`), where (nc, 20, 20) tensors made the same maxima strided, 3x
        slower each. Only the cells to update are gathered for the MLP, with their 3x3
        neighbourhoods (:meth:`update_sparse`); no block is convolved.

        On a CPU the step starts with a small product whose result it drops (``wake``). Server
        CPUs power their wide vector units down after about half a millisecond without heavy
        arithmetic, and the next GEMM then runs 2-3x slower for a few hundred microseconds (this
        machine: a (2,248, 144) x (144, 48) product takes 95-100 us when warm, 280-420 us after
        2 ms of other work; a small product 300 us earlier brings it back to 140-170 us). A sparse
        step does about 0.6 ms of gathers and alive tests before its GEMMs, so they always started
        cold; the wake-up product (256 x 144 x 48, about 10 us) gives the units that time to power
        up: 512x512 with one ring, 2.26 -> 2.01 ms per steady-state step (A/B in one process; 64
        rows woke too little, 1024 cost more than they saved, a second one mid-step nothing).
        """
        if self.wake is not None:
            torch.mm(*self.wake)  # wakes the vector units for the step's GEMMs (docstring); result unused
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
        rows = frames.index_select(0, flat_nonzero(todo.view(-1)))  # buffer rows of the cells to update
        if self.model.config.fire_rate < 1.0:
            rows = rows.index_select(0, flat_nonzero(self.fires(t, rows)))
        updated = self.update_sparse(rows) if len(rows) else 0
        held = self.held.view(-1)
        held.index_fill_(0, rows, True)
        # Alive test of the tentative state (neighbouring blocks' updates included), then clear
        # the cells that may hold state and are not alive both before and after. 4 rings: 23k
        # cleared rows -> a few hundred.
        keep = _frame_max3x3(self.bright.index_select(0, frames)).logical_and_(pre)  # (nc*A,)
        gone = torch.gt(held.index_select(0, frames), keep).view(nc, area).logical_and_(self.core)  # held, not kept
        cleared = frames.index_select(0, flat_nonzero(gone.view(-1)))
        self.flat.index_fill_(0, cleared, 0.0)
        self.bright.index_fill_(0, cleared, False)
        held.index_fill_(0, cleared, False)
        alive = 0
        if self.counting:
            alive = int((pre.view(nc, area) & cells).sum())
        return self.reach(keep.view(nc, area), blocks), alive, updated

    def reach_all(self, keep: torch.Tensor) -> torch.Tensor:
        """:meth:`reach` for a whole-image ``keep`` (B, Hp, Wp), taken block by block with the core
        cells' rows of ``regions``: half the time of gathering every block's frame (16 x 64x64:
        0.55 -> 0.27 ms)."""
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
        nine regions. Growing by whole blocks instead took 1.5-2x the blocks. As one (nb, 400) x
        (400, 9) product on the frames rather than two batched (3, 16) x (16, 16) x (16, 3)
        products on the blocks' cores: 90 -> 52 us for 37 blocks.
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
    least one pixel inside its frame; the frames' outer ring of cells holds garbage (windows there
    wrap around into the neighbouring row or frame), never read.

    Flat, each of the four elementwise maxima is of contiguous slices: 8-12 us -> 3 us each for
    36 frames against the strided slices of (nc, 20, 20) tensors.
    """
    n, s = v.numel(), FRAME
    out = torch.empty_like(v)  # its garbage entries only ever meet logical operations (and, gt) and the core mask
    rows = torch.maximum(torch.maximum(v[: n - 2 * s], v[s : n - s]), v[2 * s :])  # rows[j]: max of v[j + {0, s, 2s}]
    torch.maximum(torch.maximum(rows[:-2], rows[1:-1]), rows[2:], out=out[s + 1 : n - s - 1])
    return out


def _grid_rows(b: int, hp: int, wp: int, ring: int, device) -> torch.Tensor:
    """(B*Hp*Wp,) row of each (b, y, x) pixel in the flattened (B, Hp+2r, Wp+2r) grid with a ring of ``ring``."""
    rows = torch.arange(b * (hp + 2 * ring) * (wp + 2 * ring), device=device).view(b, hp + 2 * ring, wp + 2 * ring)
    return rows[:, ring : ring + hp, ring : ring + wp].reshape(-1)


# -- whole images, tile by tile ------------------------------------------------------------------


def tiles(size: int, core: int, margin: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: (start, stop) of each tile's core and (start, stop) of its core + halo."""
    out = []
    for start in range(0, size, core):
        stop = min(size, start + core)
        out.append((start, stop, max(0, start - margin), min(size, stop + margin)))
    return out


@torch.no_grad()
def refine_image(
    model: RNCA, image: np.ndarray, mask: np.ndarray, steps: int, seed: int, tile: int = DEFAULT_TILE,
    sparse: bool = True, precision: str = "fp32", progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Refine one 2D case (image (H, W, C), mask (H, W)) tile by tile; returns (H, W) float32.

    The result equals the untiled rollout (module docstring); ``tile`` bounds memory. ``progress``,
    if given, is called after each tile with the number of its pixels now refined (its core).
    """
    device = next(model.parameters()).device
    h, w = mask.shape
    margin = halo(steps)
    out = np.empty((h, w), dtype=np.float32)
    seeds = torch.tensor([seed], dtype=torch.int64, device=device)
    for y0, y1, ya, yb in tiles(h, tile, margin):
        for x0, x1, xa, xb in tiles(w, tile, margin):
            img = torch.from_numpy(np.ascontiguousarray(image[ya:yb, xa:xb], dtype=np.float32)).to(device)
            msk = torch.from_numpy(np.ascontiguousarray(mask[ya:yb, xa:xb], dtype=np.float32)).to(device)
            prob = rollout(model, img.permute(2, 0, 1)[None], msk[None], steps, seeds, (ya, xa), sparse,
                           precision=precision)[0]
            out[y0:y1, x0:x1] = prob[y0 - ya : y1 - ya, x0 - xa : x1 - xa].float().cpu().numpy()
            if progress is not None:
                progress((y1 - y0) * (x1 - x0))
    return out
