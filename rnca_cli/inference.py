"""Fast, exact inference: the rNCA rule run in place, skipping dead blocks, on tiles.

:meth:`rnca_cli.model.RNCA.step` is the reference formulation (and what training differentiates).
:func:`rollout` computes the same result without autograd, faster and in bounded memory:

* **In place, zero ring.** The state lives in one channels-last buffer (B, K, H'+2, W'+2) whose
  outer ring and padding to a multiple of the block size stay zero. Convolutions run unpadded on
  the buffer (the ring *is* the zero padding), and the per-pixel MLP is a GEMM on a view of the
  convolution output. Padding cells never update, and a zero neighbour cannot make a cell alive
  because the alive threshold is > 0, so the padding changes nothing.
* **Block-sparse steps.** Only cells near the mask are alive, so most of a vessel or organ image
  is dead after the first steps. A cell that is not alive before a step ends it with a zero state,
  whatever its update. A step therefore only needs the cells within one pixel of a pre-alive cell:
  their updates, and the tentative visible values that the post-update alive test of the kept
  cells reads. The image is cut into 16 x 16 blocks; blocks holding such a cell are gathered with a
  one-pixel halo, stepped, and written back; blocks that held state and are now dead are zeroed.
  When more than half the blocks are needed the dense step is cheaper and is used instead.
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

from .model import RNCA, FireNoise, max3x3, visible

BLOCK = 16
SPARSE_BELOW = 0.5  # use the block-sparse step when fewer than this share of blocks is needed
DEFAULT_TILE = 768  # core side; with a 129-pixel halo (64 steps) about 1 GB of working memory


def halo(steps: int) -> int:
    """Pixels of context a tile needs on each side for an exact result after ``steps`` updates."""
    return 2 * steps + 1


@torch.no_grad()
def rollout(
    model: RNCA, image: torch.Tensor, mask: torch.Tensor, steps: int, seeds: torch.Tensor,
    origin: tuple[int, int] = (0, 0), sparse: bool = True, stats: dict | None = None,
) -> torch.Tensor:
    """Refined probability (B, H, W) for image (B, C, H, W) and mask (B, H, W), as
    ``visible(model.rollout(...))`` with the same seeds, computed without autograd.

    ``origin`` is the global position of pixel (0, 0) (for tiles); ``sparse=False`` forces dense
    steps; ``stats``, if given, receives the number of dense and sparse steps and the mean share
    (over steps) of blocks computed and of cells alive.
    """
    cfg = model.config
    b, _, h, w = image.shape
    k, s = cfg.channels, BLOCK
    nby, nbx = math.ceil(h / s), math.ceil(w / s)
    hp, wp = nby * s, nbx * s  # padded to whole blocks
    use_sparse = sparse and cfg.alive_threshold > 0

    term = model.image_term(F.pad(image, (0, wp - w, 0, hp - h)))  # (B*Hp*Wp, hidden)
    buf = image.new_zeros(b, hp + 2, wp + 2, k).permute(0, 3, 1, 2)  # (B, K, Hp+2, Wp+2) channels_last
    buf[:, 0, 1 : h + 1, 1 : w + 1] = mask.clamp(cfg.visible_floor, 1.0)
    inside = torch.zeros(1, 1, hp, wp, dtype=torch.bool, device=image.device)
    inside[..., :h, :w] = True
    noise = FireNoise(seeds.to(image.device), (hp, wp), origin)
    live = torch.ones(b, nby, nbx, dtype=torch.bool, device=image.device)  # blocks that may hold state
    counts = {"dense_steps": 0, "sparse_steps": 0, "block_share": 0.0, "alive_share": 0.0}

    for t in range(steps):
        pre = (max3x3(buf[:, 0]) >= cfg.alive_threshold).unsqueeze(1)  # (B, 1, Hp, Wp); the ring pads
        fire = model.fire_mask(noise, t)
        fire = inside if fire is None else fire & inside  # (B or 1, 1, Hp, Wp)
        if use_sparse or stats is not None:  # which blocks a step needs; dense-only runs skip this
            need = max3x3(F.pad(pre[:, 0], (1, 1, 1, 1)))  # (B, Hp, Wp): within 1 px of a pre-alive cell
            active = need.view(b, nby, s, nbx, s).any(dim=4).any(dim=2)  # (B, nby, nbx)
            share = float(active.float().mean())
        if stats is not None:
            counts["block_share"] += share / steps
            counts["alive_share"] += float(pre[..., :h, :w].float().mean()) / steps
        if use_sparse and share < SPARSE_BELOW:
            _sparse_step(model, buf, term, pre, fire, active, live, (hp, wp))
            counts["sparse_steps"] += 1
        else:
            _dense_step(model, buf, term, pre, fire)
            counts["dense_steps"] += 1
        if use_sparse:
            live = active
    if stats is not None:
        stats.update(counts)
    return visible(buf[:, :, 1 : h + 1, 1 : w + 1])


def _post_keep(model: RNCA, buf: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """pre & (3x3 max of the tentative visible channel >= threshold), (B, 1, Hp, Wp)."""
    post = (max3x3(buf[:, 0]) >= model.config.alive_threshold).unsqueeze(1)
    return pre & post


def _dense_step(model, buf, term, pre, fire) -> None:
    b, k = buf.shape[:2]
    hp, wp = buf.shape[2] - 2, buf.shape[3] - 2
    feats = F.conv2d(buf, model.state_filters, groups=k)  # (B, F*K, Hp, Wp), unpadded: the ring pads
    delta = model.mlp(feats.permute(0, 2, 3, 1).reshape(-1, model.n_features), term)  # (B*Hp*Wp, K)
    delta = delta.view(b, hp, wp, k).permute(0, 3, 1, 2)  # (B, K, Hp, Wp)
    core = buf[:, :, 1:-1, 1:-1]
    core += delta * fire.to(delta.dtype)  # tentative state
    core *= _post_keep(model, buf, pre).to(buf.dtype)


def _sparse_step(model, buf, term, pre, fire, active, live, padded) -> None:
    b, k = buf.shape[:2]
    hp, wp = padded
    s = BLOCK
    bi, byi, bxi = active.nonzero(as_tuple=True)  # (nb,) each
    nb = len(bi)
    # Gather the needed blocks with a one-pixel halo (read before anything is written).
    windows = buf.unfold(2, s + 2, s).unfold(3, s + 2, s)  # (B, K, nby, nbx, S+2, S+2), a view
    patches = windows[bi, :, byi, bxi].contiguous(memory_format=torch.channels_last)  # (nb, K, S+2, S+2)
    feats = F.conv2d(patches, model.state_filters, groups=k)  # (nb, F*K, S, S)
    ar = torch.arange(s, device=buf.device)
    rows = ((bi * hp + byi * s)[:, None, None] + ar[None, :, None]) * wp + (bxi * s)[:, None, None] + ar[None, None, :]
    rows = rows.reshape(-1)  # (nb*S*S,) pixel rows of the image term, in (block, y, x) order
    delta = model.mlp(feats.permute(0, 2, 3, 1).reshape(-1, model.n_features), term.index_select(0, rows))
    delta = delta.view(nb, s, s, k).permute(0, 3, 1, 2)  # (nb, K, S, S)
    fire_rows = fire.expand(b, -1, -1, -1).reshape(-1).index_select(0, rows).view(nb, 1, s, s)
    tentative = patches[:, :, 1:-1, 1:-1] + delta * fire_rows.to(delta.dtype)

    blocks = buf[:, :, 1:-1, 1:-1].unflatten(2, (hp // s, s)).unflatten(4, (wp // s, s))  # (B, K, nby, S, nbx, S)
    stale = (live & ~active).nonzero(as_tuple=True)
    if len(stale[0]):
        blocks[stale[0], :, stale[1], :, stale[2], :] = 0.0  # dead now: their cells end at zero
    blocks[bi, :, byi, :, bxi, :] = tentative
    keep = _post_keep(model, buf, pre).reshape(-1).index_select(0, rows).view(nb, 1, s, s)
    blocks[bi, :, byi, :, bxi, :] = tentative * keep.to(tentative.dtype)


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
    sparse: bool = True,
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
            prob = rollout(model, img.permute(2, 0, 1)[None], msk[None], steps, seeds, (ya, xa), sparse)[0]
            out[y0:y1, x0:x1] = prob[y0 - ya : y1 - ya, x0 - xa : x1 - xa].float().cpu().numpy()
    return out
