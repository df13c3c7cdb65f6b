"""Fast, exact inference: the rNCA rule run in place, skipping dead blocks, on tiles.

:meth:`rnca_cli.model.RNCA.step` is the reference formulation (and what training differentiates).
:func:`rollout` computes the same result without autograd, faster and in bounded memory:

* **In place, zero ring.** The state lives in one channels-last buffer (B, K, H'+2, W'+2) whose
  outer ring and padding to a multiple of the block size stay zero. Convolutions run unpadded on
  the buffer (the ring *is* the zero padding). Padding cells never update, and a zero neighbour
  cannot make a cell alive because the alive threshold is > 0, so the padding changes nothing.
* **Only the cells that matter are updated.** A cell that is not alive before a step ends it with
  a zero state whatever its update, and a cell that does not fire keeps its state. So the MLP runs
  only on the cells that fire and lie within one pixel of a pre-alive cell (their tentative values
  are what the post-update alive test of the kept cells reads), as in
  :meth:`~rnca_cli.model.RNCA.step`: their rows of the perception maps and image patches are
  gathered into one reused matrix, and the updates are added back into the buffer in place.
  At the paper's fire rate that is at most half the pixels, fewer as the mask thins out.
* **Work inside the live region.** Only blocks that held state after the last step can hold
  alive cells, so the alive tests run inside their bounding box grown by one block (:func:`_box`).
* **Block-sparse perception.** When fewer than half the 16 x 16 blocks hold a cell to update,
  only those blocks are gathered with a one-pixel halo and convolved; blocks that held state and
  are now dead are zeroed, and cells of the computed blocks that fail the alive test are cleared.
* **Tiles.** One step reads neighbours 2 pixels away (1 through perception, 1 more through the
  alive test of the neighbours' tentative values). A tile grown by a halo of ``2 * steps + 1``
  pixels (one more for the image convolution) therefore refines its core exactly as the whole
  image would, and :class:`~rnca_cli.model.FireNoise` draws from global coordinates. Large images
  are refined tile by tile, so memory is bounded by the tile size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .model import RNCA, FireNoise, gather_rows, max3x3, mlp, near, visible

BLOCK = 16
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
) -> torch.Tensor:
    """Refined probability (B, H, W) for image (B, C, H, W) and mask (B, H, W), as
    ``visible(model.rollout(...))`` with the same seeds, computed without autograd.

    It runs under ``torch.inference_mode`` rather than ``no_grad``: no version counters or view
    tracking, which is most of a small operation's cost, and a sparse step is a hundred small
    operations (512x512 with one ring: 5.5 -> 3.6-4.2 ms per steady-state step, A/B in one run).
    The result is an inference tensor: clone it before using it where autograd records.

    ``origin`` is the global position of pixel (0, 0) (for tiles); ``sparse=False`` forces dense
    steps; ``stats``, if given, receives the number of dense and sparse steps and the mean share
    (over steps) of blocks computed, of cells alive and of cells updated. ``precision`` (a key of
    :data:`PRECISIONS`) is the number format of the per-pixel MLP, where nearly all arithmetic
    happens; the state, its perception and the alive tests stay float32 whatever it is, so rounding
    does not accumulate in the state over the steps.
    """
    cfg = model.config
    b, _, h, w = image.shape
    k, s = cfg.channels, BLOCK
    nby, nbx = math.ceil(h / s), math.ceil(w / s)
    hp, wp = nby * s, nbx * s  # padded to whole blocks
    use_sparse = sparse and cfg.alive_threshold > 0

    run = _Run(
        model=model,
        buf=image.new_zeros(b, hp + 2, wp + 2, k).permute(0, 3, 1, 2),  # (B, K, Hp+2, Wp+2) channels_last
        patches=model.image_patches(F.pad(image, (0, wp - w, 0, hp - h))),  # (B*Hp*Wp, 9C)
        noise=FireNoise(seeds.to(image.device), (hp, wp), origin),
        dtype=PRECISIONS[precision],
    )
    run.buf[:, 0, 1 : h + 1, 1 : w + 1] = mask.clamp(cfg.visible_floor, 1.0)
    inside = torch.zeros(b, hp, wp, dtype=torch.bool, device=image.device)
    inside[:, :h, :w] = True  # padding cells never update
    live = torch.ones(b, nby, nbx, dtype=torch.bool, device=image.device)  # blocks that may hold state
    counts = {"dense_steps": 0, "sparse_steps": 0, "block_share": 0.0, "alive_share": 0.0, "update_share": 0.0}

    for t in range(steps):
        box = _box(live, s)
        if box is None:
            break  # nothing left alive: every later step keeps the all-zero state
        ya, yb, xa, xb = box
        pre = run.alive_in(box)  # (B, Hp, Wp)
        if (yb - ya, xb - xa) == (hp, wp):
            todo = near(pre) & inside  # (B, Hp, Wp): cells whose update can matter (RNCA.step)
        else:
            todo = torch.zeros_like(pre)
            todo[:, ya:yb, xa:xb] = near(pre[:, ya:yb, xa:xb]) & inside[:, ya:yb, xa:xb]
        if use_sparse or stats is not None:  # which blocks a step needs; dense-only runs skip this
            active = todo.view(b, nby, s, nbx, s).any(dim=4).any(dim=2)  # (B, nby, nbx)
            share = float(active.float().mean())
        if use_sparse and share < SPARSE_BELOW:
            updated = run.sparse_step(t, pre, todo, active, live, box)
            counts["sparse_steps"] += 1
        else:
            updated = run.dense_step(t, pre, todo, box)
            counts["dense_steps"] += 1
        if use_sparse:
            live = active
        if stats is not None:
            counts["block_share"] += share / steps
            counts["alive_share"] += float(pre[:, :h, :w].float().mean()) / steps
            counts["update_share"] += updated / (b * h * w) / steps
    if stats is not None:
        stats.update(counts)
    return visible(run.buf[:, :, 1 : h + 1, 1 : w + 1])


class _Run:
    """The buffers of one rollout and its two kinds of step, both in place on ``buf``."""

    def __init__(self, model: RNCA, buf: torch.Tensor, patches: torch.Tensor, noise: FireNoise, dtype: torch.dtype):
        self.model, self.buf, self.noise = model, buf, noise
        self.patches = patches.to(dtype)  # (B*Hp*Wp, 9C + 1)
        self.weights = model.mlp_weights(dtype)  # cast once per rollout
        b, k, hp2, wp2 = buf.shape
        self.flat = buf.permute(0, 2, 3, 1).view(-1, k)  # (B*(Hp+2)*(Wp+2), K), the same memory
        # Buffer row of each (b, y, x) pixel, skipping the ring.
        self.ring = torch.arange(b * hp2 * wp2, device=buf.device).view(b, hp2, wp2)[:, 1:-1, 1:-1].reshape(-1)
        # MLP input rows [state features, image patch, 1], reused every step, grown on demand
        # (at most half the pixels fire at the paper's rate).
        self.x = buf.new_empty(0, model.n_features + patches.shape[1], dtype=dtype)

    def update(self, maps: list[torch.Tensor], map_rows: torch.Tensor, rows: torch.Tensor) -> int:
        """Add the MLP update of pixels ``rows``, whose features are rows ``map_rows`` of the
        perception ``maps``, to the buffer. Returns the number of pixels updated."""
        if len(rows) > len(self.x):
            self.x = self.x.new_empty(min(len(self.ring), len(rows) * 5 // 4), self.x.shape[1])
        x = self.x[: len(rows)]  # (M, F*K + 9C + 1)
        features = x[:, : -self.patches.shape[1]]
        if x.dtype == maps[0].dtype:
            gather_rows(map_rows, maps, out=features)
        else:
            features.copy_(gather_rows(map_rows, maps))  # gathered in float32, then rounded
        gather_rows(rows, [self.patches], out=x[:, features.shape[1] :])
        delta = mlp(x, *self.weights)  # (M, K)
        self.flat.index_add_(0, self.ring[rows], delta.to(self.flat.dtype))
        return len(rows)

    def alive_in(self, box: tuple[int, int, int, int]) -> torch.Tensor:
        """(B, Hp, Wp) bool: 3x3 max of the visible channel >= threshold, computed inside ``box``
        (core pixel bounds, see :func:`_box`) and False outside it, where no cell can be alive."""
        ya, yb, xa, xb = box
        b, _, hp2, wp2 = self.buf.shape
        vis = self.buf[:, 0, ya : yb + 2, xa : xb + 2].contiguous()  # one strided read; the ring pads
        inside = max3x3(vis) >= self.model.config.alive_threshold
        if (yb - ya, xb - xa) == (hp2 - 2, wp2 - 2):
            return inside  # the box is the whole image
        alive = torch.zeros(b, hp2 - 2, wp2 - 2, dtype=torch.bool, device=vis.device)
        alive[:, ya:yb, xa:xb] = inside
        return alive

    def dense_step(self, t: int, pre: torch.Tensor, todo: torch.Tensor, box) -> int:
        model, buf = self.model, self.buf
        maps = model.perceive(buf, padding=0)  # F x (B*Hp*Wp, K): unpadded, the ring pads
        fire = model.fire_mask(self.noise, t)
        if fire is not None:
            todo = todo & fire[:, 0]
        rows = todo.view(-1).nonzero().squeeze(1)  # (M,)
        updated = self.update(maps, rows, rows)
        buf[:, :, 1:-1, 1:-1] *= (pre & self.alive_in(box)).unsqueeze(1).to(buf.dtype)
        return updated

    def sparse_step(self, t: int, pre, todo, active, live, box) -> int:
        model, k = self.model, self.buf.shape[1]
        s = BLOCK
        blocks = active.nonzero(as_tuple=True)  # (bi, byi, bxi), (nb,) each
        # The needed blocks with a one-pixel halo, gathered as buffer rows (read before any write).
        # One index_select of 64-byte rows instead of advanced indexing of a 6-D unfold view, and the
        # alive test below on these blocks only, not the box: 12.7 -> 9.0 ms per steady-state step
        # on a 512x512 image with 4 rings (A/B, same run).
        halo_rows = self.block_rows(blocks, margin=1)  # (nb, S+2, S+2)
        windows = self.flat.index_select(0, halo_rows.view(-1)).view(-1, s + 2, s + 2, k).permute(0, 3, 1, 2)
        maps = model.perceive(windows, padding=0)  # F x (nb*S*S, K), rows in (block, y, x) order
        rows = self.block_rows(blocks, margin=0, ring=False).view(-1)  # (nb*S*S,) pixel of each block row
        local = todo.view(-1).index_select(0, rows).nonzero().squeeze(1)  # block rows to update
        if model.config.fire_rate < 1.0:
            local = local[self.noise.uniform_at(t, rows[local]) < model.config.fire_rate]

        stale = (live & ~active).nonzero(as_tuple=True)
        if len(stale[0]):  # blocks that held state and are dead now: their cells end at zero
            self.flat.index_fill_(0, self.block_rows(stale, margin=0).view(-1), 0.0)
        updated = self.update(maps, local, rows[local])
        # Alive test of the tentative state, on the computed blocks only (their halo included).
        vis = self.flat[:, 0].index_select(0, halo_rows.view(-1)).view(-1, s + 2, s + 2)  # (nb, S+2, S+2)
        post = (max3x3(vis) >= model.config.alive_threshold).view(-1)  # (nb*S*S,)
        keep = pre.view(-1).index_select(0, rows) & post
        self.flat.index_fill_(0, halo_rows[:, 1:-1, 1:-1][~keep.view(-1, s, s)], 0.0)
        return updated

    def block_rows(self, blocks, margin: int, ring: bool = True) -> torch.Tensor:
        """(nb, S+2m, S+2m) rows of the pixels of ``blocks`` (bi, byi, bxi), grown by ``margin``:
        rows of the flat buffer (``ring``) or of the (b, y, x)-flattened core grid."""
        bi, byi, bxi = blocks
        s = BLOCK
        _, _, hp2, wp2 = self.buf.shape
        size = s + 2 * margin
        ar = torch.arange(size, device=bi.device)
        if ring:  # buffer coordinates: core pixel (y, x) sits at (y + 1, x + 1)
            y0, x0, height, width = byi * s + 1 - margin, bxi * s + 1 - margin, hp2, wp2
        else:
            y0, x0, height, width = byi * s - margin, bxi * s - margin, hp2 - 2, wp2 - 2
        ys = (bi * height + y0)[:, None, None] + ar[None, :, None]  # (nb, size, 1)
        return ys * width + x0[:, None, None] + ar[None, None, :]


def _box(live: torch.Tensor, s: int) -> tuple[int, int, int, int] | None:
    """Core pixel bounds (y0, y1, x0, x1) of the blocks that held state after the last step
    (``live``, (B, nby, nbx)), grown by one block; None if there are none.

    A step reads at most 2 pixels around a live cell (alive test, then its neighbours' updates),
    so every cell a step can touch lies inside this box: the per-step whole-image work (alive
    tests, neighbourhoods) is done in the box only. 512x512 with one small ring: the 3x3 max
    operations went from 28 % of the rollout's time to 6 %.
    """
    rows, cols = live.any(dim=2).any(dim=0), live.any(dim=1).any(dim=0)  # (nby,), (nbx,)
    if not bool(rows.any()):
        return None
    ys, xs = rows.nonzero().squeeze(1), cols.nonzero().squeeze(1)
    y0, y1 = max(int(ys[0]) - 1, 0), min(int(ys[-1]) + 2, len(rows))
    x0, x1 = max(int(xs[0]) - 1, 0), min(int(xs[-1]) + 2, len(cols))
    return y0 * s, y1 * s, x0 * s, x1 * s


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
    sparse: bool = True, precision: str = "fp32",
) -> np.ndarray:
    """Refine one 2D case (image (H, W, C), mask (H, W)) tile by tile; returns (H, W) float32.

    The result equals the untiled rollout (module docstring); ``tile`` bounds memory.
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
    return out
