"""The row formulation of the rule, shared by the ``sparse`` and ``fused`` engines (not an engine).

It computes :meth:`rnca_cli.model.RNCA.step` exactly (up to float rounding) with less work:

* **Folded image term.** ``fc1_image(image_conv(x))`` is linear in a pixel's 3x3 image patch, so
  it folds into one weight on ``[patch, 1]`` (:func:`image_patches`, :func:`fc1_weight`): each
  pixel carries 9C + 1 numbers instead of F*K image features.
* **Only the rows that matter.** A cell not alive before a step ends it at zero whatever its
  update, and one that does not fire keeps its state. So only the cells that fire and whose
  tentative state the step reads (:func:`needed`) go through the MLP, as rows of one matrix
  (:func:`row_updates`); at the paper's fire rate that is half the pixels or fewer.
* **Channels last.** The state is (B, K, H, W) in ``channels_last`` memory, physically
  (B, H, W, K): features are a plain (pixels, channels) matrix without copies.
* **Chunked MLP.** The MLP runs in row chunks that fit in cache, and its backward recomputes the
  hidden layer chunk by chunk instead of storing it (:class:`_RowUpdates`).

It also holds the zero-ringed state buffer both engines' rollouts run in place on
(:class:`Buffers`).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import BLOCK, RING, SPARSE_BELOW
from ..model import RNCA, FireNoise

# Rows per MLP chunk: 2048 x 128 float32 hidden values = 1 MiB, within one core's L2.
_MLP_CHUNK = 2048
# (state, rows of the cells to update) -> (M, F*K) their perception; None: convolutions.
PerceiveRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- the model's weights, rearranged ---------------------------------------------------------------


def image_patches(image: torch.Tensor) -> torch.Tensor:
    """Each pixel's zero-padded 3x3 image patch and a constant 1: the image's (and fc1's bias's)
    whole contribution to a step. (B, C, H, W) -> (B*H*W, 9C + 1), rows in (b, y, x) order,
    columns in (c, dy, dx) order (``image_conv.weight``'s), then the 1."""
    b, c, h, w = image.shape
    cols = F.unfold(image, 3, padding=1).transpose(1, 2).reshape(b * h * w, 9 * c)  # (B*H*W, 9C)
    return torch.cat([cols, cols.new_ones(b * h * w, 1)], 1)


def perception_filters(model: RNCA) -> list[torch.Tensor]:
    """F depthwise weights (K, 1, 3, 3), filter i of every channel (differentiable)."""
    f = model.config.filters
    return [model.state_filters[i::f].contiguous() for i in range(f)]


def perceive_maps(model: RNCA, state: torch.Tensor, padding: int = 1,
                  filters: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """State perception as F tensors (B*H'*W', K), filter i on every channel, rows in (b, y, x)
    order (H' = H + 2*padding - 2); one depthwise convolution per filter, which oneDNN runs about
    3x faster than one convolution with F outputs per channel."""
    k = model.config.channels
    maps = (F.conv2d(state, w, padding=padding, groups=k) for w in filters or perception_filters(model))
    return [m.permute(0, 2, 3, 1).reshape(-1, k) for m in maps]  # views for channels_last input


def fc1_weight(model: RNCA) -> torch.Tensor:
    """First MLP layer as one bias-free weight (hidden, F*K + 9C + 1) on the rows
    ``[perception (filter-major), image patch, 1]`` (differentiable in the model's parameters)."""
    cfg = model.config
    hidden, k, f = cfg.hidden, cfg.channels, cfg.filters
    w_state = model.fc1_state.weight.view(hidden, k, f).transpose(1, 2).reshape(hidden, f * k)  # filter-major
    w_image = model.fc1_image.weight @ model.image_conv.weight.reshape(model.n_features, -1)  # (hidden, 9C)
    return torch.cat([w_state, w_image, model.fc1_image.bias[:, None]], 1)


def mlp_weights(model: RNCA, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fc1 weight, fc2 weight, fc2 bias) for :func:`mlp`, optionally cast to ``dtype``."""
    weights = (fc1_weight(model), model.fc2.weight, model.fc2.bias)
    return tuple(w.to(dtype) for w in weights) if dtype is not None else weights


def perception_matrix(model: RNCA) -> torch.Tensor:
    """State perception as one matrix (9K, F*K) on a pixel's raw 3x3 neighbourhood of state (rows
    ``[s(y-1, x-1), ..., s(y+1, x+1)]``, K channels each), in :func:`fc1_weight`'s column order;
    where few cells update, one small GEMM on their gathered neighbourhoods beats convolutions."""
    k, f = model.config.channels, model.config.filters
    taps = model.state_filters.view(k, f, 9)  # (c, i, tap)
    eye = torch.eye(k, dtype=taps.dtype, device=taps.device)
    return torch.einsum("cit,cd->tcid", taps, eye).reshape(9 * k, f * k)  # column i*K + d, nonzero for d == c


# -- which cells a step updates ---------------------------------------------------------------------


def max3x3(v: torch.Tensor) -> torch.Tensor:
    """Valid 3x3 maximum of (B, H, W) -> (B, H-2, W-2) in two separable passes (cheaper than
    max_pool2d on a CPU, and exact)."""
    rows = torch.maximum(torch.maximum(v[:, :-2], v[:, 1:-1]), v[:, 2:])  # (B, H-2, W)
    return torch.maximum(torch.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


def near(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> (B, H, W) bool: cells within one pixel (8-neighbourhood) of a True cell."""
    return max3x3(F.pad(mask, (1, 1, 1, 1)))


def needed(pre: torch.Tensor, bright: torch.Tensor, fire: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) bool: the cells whose tentative state a step reads, given ``pre`` (alive before the
    step), ``bright`` (visible >= the alive threshold) and ``fire`` (the update mask; None: every
    cell fires). Of these, the cells that fire are the ones a step must update.

    A cell alive before the step may be kept, so its update is needed. One that is not ends at
    zero, and its tentative state is read only by the after-update alive test of its alive
    neighbours; a neighbour whose 3x3 neighbourhood holds a bright cell that does not fire passes
    that test whatever the others do, so only the neighbours of the other alive cells need it.
    """
    if fire is None:  # no cell keeps its value, so every cell within a pixel of an alive one counts
        return near(pre)
    stable = torch.gt(bright, fire)  # bright and does not fire: bool a > b is a & ~b
    return near(torch.gt(pre, near(stable))).logical_or_(pre)  # alive, or next to an undecided alive cell


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """(n,) int64 positions of the True entries of a flat bool tensor; on a CPU through numpy's
    ``flatnonzero``, 2-4x faster than torch's ``nonzero``."""
    if mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


# -- the MLP on rows ------------------------------------------------------------------------------


def row_chunks(n: int):
    """Row slices of about ``_MLP_CHUNK`` rows, of equal size (no ragged last chunk)."""
    size = max(1, math.ceil(n / max(1, round(n / _MLP_CHUNK))))
    return (slice(start, start + size) for start in range(0, n, size))


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``relu(x @ w1.T) @ w2.T + b2`` in cache-sized row chunks, without autograd. x (M, D),
    w1 (Hd, D), w2 (K, Hd), b2 (K,) -> (M, K); fc1's bias rides in ``x``'s constant column."""
    out = x.new_empty(x.shape[0], w2.shape[0])  # (M, K)
    w2t = w2.t().contiguous()  # (Hd, K)
    for rows in row_chunks(x.shape[0]):
        hidden = torch.mm(x[rows], w1.t())  # (chunk, Hd)
        torch.mm(hidden.relu_(), w2t, out=out[rows])
    return out.add_(b2)


def gather_rows(rows: torch.Tensor, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rows`` of (N, w_i) tensors side by side, (M, sum w_i), written column block by column
    block into ``out`` (or a new tensor): no concatenation."""
    if out is None:
        out = tensors[0].new_empty(len(rows), sum(t.shape[1] for t in tensors))
    col = 0
    for t in tensors:
        torch.index_select(t, 0, rows, out=out[:, col : col + t.shape[1]])
        col += t.shape[1]
    return out


def row_updates(
    rows: torch.Tensor, weights: Sequence[torch.Tensor], patches: torch.Tensor, maps: Sequence[torch.Tensor],
    gathered: bool = False,
) -> torch.Tensor:
    """MLP updates (M, K) of pixel ``rows`` (M,), distinct, whose input rows are those of the
    perception ``maps`` (F tensors (N, K)) and of ``patches`` (N, 9C + 1) side by side; ``weights``
    from :func:`mlp_weights`. ``gathered``: ``maps`` holds the rows' features already, one (M, F*K)
    tensor. Differentiable (:class:`_RowUpdates`)."""
    return _RowUpdates.apply(rows, gathered, *weights, patches, *maps)


class _RowUpdates(torch.autograd.Function):
    """Gather the input rows of the pixels to update and run the MLP on them, as one autograd node.
    The backward recomputes each chunk's hidden layer rather than storing every step's (M, 128)
    activations, and computes input gradients for the perception columns only (the image patch
    columns are data)."""

    @staticmethod
    def forward(ctx, rows, gathered, w1, w2, b2, patches, *maps):
        if ctx.needs_input_grad[5]:
            raise ValueError("row_updates: image patches are data, no gradient flows to them")
        if gathered:  # maps: the rows' features, (M, F*K)
            x = maps[0].new_empty(len(rows), maps[0].shape[1] + patches.shape[1])
            x[:, : maps[0].shape[1]] = maps[0]
            torch.index_select(patches, 0, rows, out=x[:, maps[0].shape[1] :])
        else:
            x = gather_rows(rows, [*maps, patches])  # (M, F*K + 9C + 1)
        ctx.save_for_backward(rows, x, w1, w2)
        ctx.map_shapes, ctx.gathered = [m.shape for m in maps], gathered
        return mlp(x, w1, w2, b2)

    @staticmethod
    def backward(ctx, grad):  # grad (M, K)
        rows, x, w1, w2 = ctx.saved_tensors
        grad = grad.contiguous()
        want_maps = any(ctx.needs_input_grad[6:])
        n_feat = sum(shape[1] for shape in ctx.map_shapes)  # the perception columns of x
        w1_feat = w1[:, :n_feat].contiguous()  # (Hd, F*K)
        g_feat = x.new_empty(x.shape[0], n_feat) if want_maps else None  # (M, F*K)
        gw1t, gw2 = x.new_zeros(x.shape[1], w1.shape[0]), torch.zeros_like(w2)  # (D, Hd), (K, Hd)
        for chunk in row_chunks(x.shape[0]):
            hidden = torch.mm(x[chunk], w1.t()).relu_()  # (chunk, Hd), recomputed
            gw2.addmm_(grad[chunk].t(), hidden)
            g_hidden = torch.ops.aten.threshold_backward(grad[chunk] @ w2, hidden, 0.0)  # (chunk, Hd)
            gw1t.addmm_(x[chunk].t(), g_hidden)
            if g_feat is not None:
                torch.mm(g_hidden, w1_feat, out=g_feat[chunk])
        if ctx.gathered:
            return None, None, gw1t.t(), gw2, grad.sum(0), None, g_feat
        map_grads, col = [], 0
        for shape, wanted in zip(ctx.map_shapes, ctx.needs_input_grad[6:]):
            if wanted:
                map_grads.append(g_feat.new_zeros(shape).index_copy_(0, rows, g_feat[:, col : col + shape[1]]))
            else:
                map_grads.append(None)
            col += shape[1]
        return None, None, gw1t.t(), gw2, grad.sum(0), None, *map_grads


# -- a differentiable step (training) ------------------------------------------------------------------


def batched_patches(image: torch.Tensor) -> torch.Tensor:
    """:func:`image_patches` of images (B, C, H, W) per sample, (B, H*W, 9C + 1): what :func:`step`
    takes, batch first so that training can drop finished samples by indexing it."""
    patches = image_patches(image)
    return patches.view(image.shape[0], -1, patches.shape[1])


def step(model: RNCA, state: torch.Tensor, patches: torch.Tensor, noise: FireNoise, t: int,
         perceive_rows: PerceiveRows | None = None) -> torch.Tensor:
    """:meth:`RNCA.step` on the cells that fire and are :func:`needed`, differentiable.
    state: (B, K, H, W) channels_last; patches: :func:`batched_patches` of the image;
    ``perceive_rows``: computes the rows' perception directly (the fused engine), else convolutions."""
    patches = patches.reshape(-1, patches.shape[-1])  # (B*H*W, 9C + 1), rows in (b, y, x) order
    b, k, h, w = state.shape
    cfg = model.config
    with torch.no_grad():
        bright = state[:, 0] >= cfg.alive_threshold  # (B, H, W)
        pre = near(bright)  # alive before the step
        fire = model.fire_mask(noise, t)
        todo = needed(pre, bright, None if fire is None else fire[:, 0])  # (B, H, W)
        if fire is not None:
            todo &= fire[:, 0]
    rows = flat_nonzero(todo.reshape(-1))  # (M,) pixel rows, (b, y, x) order
    if perceive_rows is not None:
        features = perceive_rows(state, model.state_filters, rows)  # (M, F*K)
        delta = row_updates(rows, mlp_weights(model), patches, [features], gathered=True)
    else:
        delta = row_updates(rows, mlp_weights(model), patches, perceive_maps(model, state))  # (M, K)
    flat = state.permute(0, 2, 3, 1).reshape(-1, k)  # (B*H*W, K)
    state = flat.index_add(0, rows, delta).view(b, h, w, k).permute(0, 3, 1, 2)  # tentative
    with torch.no_grad():
        post = near(state[:, 0] >= cfg.alive_threshold)
    keep = (pre & post).unsqueeze(1)  # (B, 1, H, W)
    return state * keep.to(state.dtype)


# -- the state buffer of an in-place rollout --------------------------------------------------------


class Buffers:
    """The zero-ringed buffers of one in-place rollout, laid out alike, indexed by *buffer row*
    (a cell's index in the (B, Hp+4, Wp+4) grid): the image padded to whole blocks (Hp, Wp) and
    ringed by ``RING`` zero cells, which are the convolutions' padding and never update (a zero
    cannot make a cell alive, the alive threshold being > 0).

    ``buf`` (B, K, Hp+4, Wp+4) channels_last, the state, its visible channel holding the clamped
    mask; ``flat`` (B*(Hp+4)*(Wp+4), K) the same memory; ``patches`` one row per buffer row;
    ``keys`` (B, Hp+4, Wp+4) the update-mask keys; ``inside`` which cells are the image proper.
    """

    def __init__(self, model: RNCA, image: torch.Tensor, mask: torch.Tensor, seeds: torch.Tensor,
                 origin: tuple[int, int]):
        cfg = model.config
        b, _, h, w = image.shape
        self.shape = (b, math.ceil(h / BLOCK), math.ceil(w / BLOCK))  # blocks: (B, nby, nbx)
        hp, wp = self.shape[1] * BLOCK, self.shape[2] * BLOCK  # padded to whole blocks
        hr, wr = hp + 2 * RING, wp + 2 * RING
        self.h, self.w, self.padded = h, w, (hp, wp) != (h, w)
        dev, r = image.device, RING
        self.buf = image.new_zeros(b, hr, wr, cfg.channels).permute(0, 3, 1, 2)  # channels_last
        self.buf[:, 0, r : h + r, r : w + r] = mask.clamp(cfg.visible_floor, 1.0)
        self.flat = self.buf.permute(0, 2, 3, 1).view(-1, cfg.channels)
        self.patches = image_patches(F.pad(image, (r, wp - w + r, r, hp - h + r)))  # (B*Hr*Wr, 9C + 1)
        self.keys = torch.zeros(b, hr, wr, dtype=torch.int64, device=dev)
        self.keys[:, r:-r, r:-r] = FireNoise(seeds.to(dev), (hp, wp), origin).keys
        self.inside = torch.zeros(b, hr, wr, dtype=torch.bool, device=dev)
        self.inside[:, r : h + r, r : w + r] = True

    def visible(self) -> torch.Tensor:
        """(B, H, W): the refined probability, the visible channel of the image proper, clamped."""
        r = RING
        return self.buf[:, 0, r : self.h + r, r : self.w + r].clamp(0.0, 1.0)


def run_steps(step: Callable[[int, torch.Tensor], tuple[torch.Tensor, int, int, int]], reach: torch.Tensor,
              steps: int, cells: int, stats: dict | None) -> None:
    """The loop of a block-skipping rollout. ``step(t, blocks)`` runs step ``t`` given the ids of
    the blocks that ``reach`` flags (those it can change) and returns (the next reach, alive cells,
    updated cells, blocks worked on). Stops early once no block can change. ``stats``: see
    :meth:`rnca_cli.engines.Engine.rollout`; a step is sparse when it worked on fewer than
    ``SPARSE_BELOW`` of the blocks."""
    counts = {"dense_steps": 0, "sparse_steps": 0, "block_share": 0.0, "alive_share": 0.0, "update_share": 0.0}
    seconds = []
    for t in range(steps):
        start = time.perf_counter()
        blocks = flat_nonzero(reach)  # (nc,) block ids, (b, by, bx) order
        if len(blocks) == 0:
            break  # nothing left alive: every later step keeps the all-zero state
        total = reach.numel()
        reach, alive, updated, worked = step(t, blocks)
        counts["sparse_steps" if worked < SPARSE_BELOW * total else "dense_steps"] += 1
        if stats is not None:
            counts["block_share"] += worked / total / steps
            counts["alive_share"] += alive / cells / steps
            counts["update_share"] += updated / cells / steps
            seconds.append(time.perf_counter() - start)  # the next flat_nonzero synchronises
    if stats is not None:
        stats.update(counts, step_seconds=seconds)
