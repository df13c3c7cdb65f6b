"""The refinement neural cellular automaton (rNCA) and its configuration.

Every pixel holds a state vector of ``K`` channels; channel 0 is the visible mask (a probability),
channels 1..K-1 are latent and start at zero. One step (paper Section 3.2, Appendix A):

1. perceive the state with a depthwise 3x3 convolution (per channel: identity, Sobel-x, Sobel-y,
   learnable, no bias) -> ``F*K`` features;
2. perceive the image with one 3x3 convolution -> ``F*K`` features (the image never changes, so
   this is done once per rollout);
3. a per-pixel MLP ``[state features, image features] -> hidden -> ReLU -> K`` gives an update
   ``ds``; the last layer starts at zero, so an untrained model leaves the state unchanged;
4. each cell applies its update with probability ``fire_rate``, ``s <- s + ds * mask``; the
   Bernoulli mask comes from a counter-based hash of (seed, step, pixel) (:class:`FireNoise`), with
   seeds drawn from the caller's ``torch.Generator``;
5. a cell whose 3x3 neighbourhood has visible value >= ``alive_threshold`` neither before nor
   after the update has its whole state set to zero.

Layout and algebra that make this fast (all exact up to float rounding):

* The first MLP layer ``W1 @ [f_s, f_x] + b1`` splits into ``W1_s @ f_s`` and ``W1_x @ f_x + b1``,
  and ``f_x`` is a 3x3 convolution of an image that never changes. So ``W1_x @ f_x`` is a linear
  map of the pixel's 3x3 image patch: ``A @ patch`` with ``A = W1_x @ W_conv`` (hidden x 9C). Each
  pixel carries its 9C patch values (9 for a gray image) instead of the paper's 3K image features
  or a hoisted hidden-size term, and the first layer is one GEMM on ``[f_s, patch]``
  (:meth:`RNCA.fc1`, :meth:`RNCA.image_patches`). Before: 128 floats of image term streamed per
  pixel and step (20 % of an inference step); after: 10.
* Only cells that fire need an update: the MLP runs on the rows of firing cells near an alive
  cell, gathered (:meth:`RNCA.step`), half the pixels or fewer, and the updates are added back.
  With the previous point: 1.35 -> 1.11 ms per 64x64 image per step (batch 16, 2 cores).
* The state is kept as an NCHW tensor in ``channels_last`` memory, i.e. physically (B, H, W, K).
  Convolutions accept it as it is, and the features are then a plain (pixels, channels) matrix.
* The MLP runs in row chunks that fit in cache, and its backward recomputes the hidden layer chunk
  by chunk instead of storing it (:class:`_RowUpdates`): the (pixels, 128) activation never
  reaches main memory.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Initial 3x3 perception kernels, in the order a config's ``filters`` count takes them.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
_KERNELS = {
    "identity": torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
    "sobel_x": _SOBEL_X,
    "sobel_y": _SOBEL_X.T.contiguous(),
    "laplacian": torch.tensor([[1.0, 2.0, 1.0], [2.0, -12.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0,
}
MAX_FILTERS = len(_KERNELS)
# Rows per MLP chunk: 2048 x 128 float32 hidden values = 1 MiB, within one core's 1.25 MiB L2.
_MLP_CHUNK = 2048
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass(frozen=True)
class ModelConfig:
    """How to build an :class:`RNCA`. Stored in every checkpoint; defaults follow the paper.

    Attributes:
        channels: state channels K (channel 0 visible, the rest latent).
        filters: perception filters per state channel, taken in the order identity, Sobel-x,
            Sobel-y, Laplacian (1..4). The paper uses 3.
        hidden: width of the per-pixel MLP's hidden layer.
        fire_rate: probability that a cell applies its update in a step (the paper skips with 0.5).
        alive_threshold: a cell is alive when the max visible value in its 3x3 neighbourhood
            is >= this (paper: 0.1).
        visible_floor: the initial visible channel is the input mask clamped to
            [visible_floor, 1] (the reference code clips to [0.1, 1], which makes every cell
            alive at the start so the automaton can grow anywhere and learn to prune).
        image_channels: channels of the conditioning image (1 gray, 3 RGB).
    """

    channels: int = 16
    filters: int = 3
    hidden: int = 128
    fire_rate: float = 0.5
    alive_threshold: float = 0.1
    visible_floor: float = 0.1
    image_channels: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.channels >= 1, "channels must be >= 1"),
            (1 <= self.filters <= MAX_FILTERS, f"filters must be in 1..{MAX_FILTERS}"),
            (self.hidden >= 1, "hidden must be >= 1"),
            (0.0 <= self.fire_rate <= 1.0, "fire_rate must be in [0, 1]"),
            (0.0 <= self.alive_threshold <= 1.0, "alive_threshold must be in [0, 1]"),
            (0.0 <= self.visible_floor <= 1.0, "visible_floor must be in [0, 1]"),
            (self.image_channels >= 1, "image_channels must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {message}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error, missing keys default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**data)


class RNCA(nn.Module):
    """The rNCA update rule. Use :meth:`initial_state`, :meth:`image_patches`, :meth:`step`, :meth:`rollout`."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        k, f = config.channels, config.filters
        self.n_features = f * k  # features per source (state, image)
        # State perception: depthwise 3x3, output channel c*f + i is kernel i on state channel c.
        kernels = torch.stack(list(_KERNELS.values())[:f])  # (f, 3, 3)
        self.state_filters = nn.Parameter(kernels.repeat(k, 1, 1).unsqueeze(1))  # (f*K, 1, 3, 3)
        # Image perception: one ordinary 3x3 conv. No bias: it would only add to fc1's bias.
        self.image_conv = nn.Conv2d(config.image_channels, f * k, 3, padding=1, bias=False)
        # First MLP layer, split into its state and image halves (exact, see module docstring).
        self.fc1_state = nn.Linear(f * k, config.hidden, bias=False)
        self.fc1_image = nn.Linear(f * k, config.hidden, bias=True)
        self.fc2 = nn.Linear(config.hidden, k, bias=True)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    # -- pieces of one rollout -------------------------------------------------------------------

    def initial_state(self, mask: torch.Tensor) -> torch.Tensor:
        """State at step 0 from masks (B, H, W) in [0, 1]: visible = clamped mask, latent = 0.

        Returns (B, K, H, W) in channels_last memory.
        """
        b, h, w = mask.shape
        state = torch.zeros(b, h, w, self.config.channels, dtype=mask.dtype, device=mask.device)
        state[..., 0] = mask.clamp(self.config.visible_floor, 1.0)
        return state.permute(0, 3, 1, 2)  # (B, K, H, W), channels_last

    def image_patches(self, image: torch.Tensor) -> torch.Tensor:
        """Each pixel's zero-padded 3x3 image patch and a constant 1: the image's (and fc1's bias's)
        whole contribution to a step.

        image: (B, C, H, W) -> (B*H*W, 9C + 1), rows in (b, y, x) order, columns in (c, dy, dx)
        order (the order of ``image_conv.weight``'s last three axes), then the 1. Constant over a
        rollout.
        """
        b, c, h, w = image.shape
        cols = F.unfold(image, 3, padding=1).transpose(1, 2).reshape(b * h * w, 9 * c)  # (B*H*W, 9C)
        return torch.cat([cols, cols.new_ones(b * h * w, 1)], 1)

    def perceive(
        self, state: torch.Tensor, padding: int = 1, filters: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """State perception: F tensors (B*H'*W', K), filter i applied to every channel, rows in
        (b, y, x) order (H' = H + 2*padding - 2). ``filters``: :meth:`perception_filters`, when the
        caller keeps them for many steps.

        One depthwise convolution per filter rather than one with F outputs per channel: oneDNN's
        one-output-per-channel kernel is about 3x faster (16 x 64x64, K=16: 3.9 ms -> 1.3 ms for all
        three filters). :meth:`fc1` orders its columns to match.
        """
        k = self.config.channels
        maps = (F.conv2d(state, w, padding=padding, groups=k) for w in filters or self.perception_filters())
        return [m.permute(0, 2, 3, 1).reshape(-1, k) for m in maps]  # views for channels_last input

    def perception_filters(self) -> list[torch.Tensor]:
        """F depthwise weights (K, 1, 3, 3), filter i of every channel (differentiable)."""
        f = self.config.filters
        return [self.state_filters[i::f].contiguous() for i in range(f)]

    def fc1(self) -> torch.Tensor:
        """First MLP layer as one bias-free weight (hidden, F*K + 9C + 1) on the rows
        ``[perceive(state)..., image_patches(image)]``.

        ``fc1_image(image_conv(x))`` is linear in the 3x3 patch of x, so its weight folds into
        ``fc1_image.weight @ image_conv.weight``, and the bias becomes the weight of the constant
        1 (differentiable: training updates the original parameters).
        """
        cfg = self.config
        hidden, k, f = cfg.hidden, cfg.channels, cfg.filters
        w_state = self.fc1_state.weight.view(hidden, k, f).transpose(1, 2).reshape(hidden, f * k)  # filter-major
        w_image = self.fc1_image.weight @ self.image_conv.weight.reshape(self.n_features, -1)  # (hidden, 9C)
        return torch.cat([w_state, w_image, self.fc1_image.bias[:, None]], 1)

    def perception_matrix(self) -> torch.Tensor:
        """State perception as one matrix (9K, F*K) on a pixel's raw 3x3 neighbourhood of state:
        rows ``[s(y-1, x-1), s(y-1, x), ..., s(y+1, x+1)]`` (K channels each) times it give the
        pixel's :meth:`perceive` features in :meth:`fc1`'s column order (filter-major).

        Only 9 of its rows touch any one column (a depthwise filter), but where few cells are
        updated one small GEMM on their gathered neighbourhoods is cheaper than convolving whole
        blocks, and than folding it into the first layer, which makes that layer 9K = 144 wide
        instead of F*K = 48: a third fewer multiplications per row, 0.15-0.25 ms less per
        steady-state step of a 512x512 image with one ring (about 2,250 rows; A/B in one process).
        """
        k, f = self.config.channels, self.config.filters
        taps = self.state_filters.view(k, f, 9)  # (c, i, tap)
        eye = torch.eye(k, dtype=taps.dtype, device=taps.device)
        return torch.einsum("cit,cd->tcid", taps, eye).reshape(9 * k, f * k)  # column i*K + d, nonzero for d == c

    def alive(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) visible -> (B, 1, H, W) bool: 3x3 max >= alive_threshold.

        A boolean needs no gradient, so it is computed outside autograd with :func:`max3x3`
        (CPU max_pool2d computes argmax indices even then: 2.1 ms per call for 16 x 66 x 66), as
        the 3x3 maximum of the threshold test, on bytes (0.35 -> 0.20 ms for 16 x 66x66).
        """
        with torch.no_grad():
            return near(visible[:, 0] >= self.config.alive_threshold).unsqueeze(1)

    def fire_mask(self, noise: "FireNoise", t: int) -> torch.Tensor | None:
        """(B, 1, H, W) bool: which cells apply their update in step ``t`` (None: all of them)."""
        if self.config.fire_rate >= 1.0:
            return None
        return FireNoise.fires(noise.keys, t, self.config.fire_rate).unsqueeze(1)

    def step(self, state: torch.Tensor, patches: torch.Tensor, noise: "FireNoise", t: int) -> torch.Tensor:
        """Update ``t`` of a rollout. state: (B, K, H, W) channels_last; patches from :meth:`image_patches`.

        This is the formulation training differentiates through; ``rnca_cli.inference`` runs the
        same rule in place, skipping dead blocks. Only the cells that fire and whose tentative
        state the step reads (:func:`needed`) are updated: any other cell either keeps its state
        (no fire) or ends at zero without its tentative value deciding anything. The cells left
        out end at zero, so their updates would get no gradient either.
        """
        b, k, h, w = state.shape
        with torch.no_grad():
            bright = state[:, 0] >= self.config.alive_threshold  # (B, H, W)
            pre = near(bright)  # alive before the step, as :meth:`alive` computes it
            fire = self.fire_mask(noise, t)
            todo = needed(pre, bright, None if fire is None else fire[:, 0])  # (B, H, W)
            if fire is not None:
                todo &= fire[:, 0]
        rows = flat_nonzero(todo.reshape(-1))  # (M,) pixel rows, (b, y, x) order
        from . import fused  # the compiled kernels; imports this module

        if fused.trainable(state, self):  # the rows' perception in one compiled kernel (rnca_cli.fused)
            features = fused.perceive_rows(state, self.state_filters, rows)  # (M, F*K)
            delta = row_updates(rows, self.mlp_weights(), patches, [features], gathered=True)
        else:
            delta = row_updates(rows, self.mlp_weights(), patches, self.perceive(state))  # (M, K)
        flat = state.permute(0, 2, 3, 1).reshape(-1, k)  # (B*H*W, K)
        state = flat.index_add(0, rows, delta).view(b, h, w, k).permute(0, 3, 1, 2)  # tentative
        keep = pre.unsqueeze(1) & self.alive(state[:, :1])  # (B, 1, H, W)
        return state * keep.to(state.dtype)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel MLP: (M, F*K + 9C + 1) rows ``[state features, image patch, 1]`` -> (M, K)
        updates, without autograd (training differentiates :func:`row_updates`)."""
        with torch.no_grad():
            return mlp(x, *self.mlp_weights())

    def mlp_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fc1 weight, fc2 weight, fc2 bias) for :func:`mlp`, optionally cast to ``dtype``."""
        weights = (self.fc1(), self.fc2.weight, self.fc2.bias)
        return tuple(w.to(dtype) for w in weights) if dtype is not None else weights

    # -- a whole rollout -------------------------------------------------------------------------

    def rollout(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        steps: int,
        generator: Generators = None,
        record: bool = False,
        seeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``steps`` updates from a mask.

        Args:
            image: (B, C, H, W) conditioning image in [0, 1].
            mask: (B, H, W) initial mask as probability in [0, 1].
            steps: number of updates.
            generator: draws the per-sample noise seeds: one generator for the batch, or one per
                sample (then a sample's result does not depend on its batch). Ignored if ``seeds``.
            record: also return the visible channel after every step.
            seeds: (B,) int64 noise seeds, used as given (see :class:`FireNoise`).

        Returns:
            (final state (B, K, H, W), visible channel per step (steps, B, H, W) or None).
            The visible channel is not clamped here; see :func:`visible`.
        """
        b, _, h, w = image.shape
        if seeds is None:
            seeds = draw_seeds(b, image.device, generator)
        noise = FireNoise(seeds.to(image.device), (h, w))
        state = self.initial_state(mask)
        patches = self.image_patches(image)
        history = []
        for t in range(steps):
            state = self.step(state, patches, noise, t)
            if record:
                history.append(state[:, 0])
        return state, (torch.stack(history) if record else None)

    def forward(self, image, mask, steps: int = 64, generator=None) -> torch.Tensor:
        """Refined probability (B, H, W) after ``steps`` updates."""
        state, _ = self.rollout(image, mask, steps, generator)
        return visible(state)


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``relu(x @ w1.T) @ w2.T + b2`` in cache-sized row chunks, without autograd (inference, and
    the forward of :class:`_RowUpdates`). x (M, D), w1 (Hd, D), w2 (K, Hd), b2 (K,) -> (M, K).

    The (rows, hidden) activation is the largest tensor of a step (128 floats per pixel against 16
    of state); chunk by chunk it stays in cache. fc1's bias rides in ``x``'s constant column, and
    b2 is added once at the end, so no GEMM has to copy a broadcast bias into its output first
    (that copy was 8 % of a step). w2 is transposed into contiguous memory once: the narrow
    (chunk, 128) x (128, 16) product runs 20 % faster on it than on a transposed view.
    """
    out = x.new_empty(x.shape[0], w2.shape[0])  # (M, K)
    w2t = w2.t().contiguous()  # (Hd, K)
    for rows in row_chunks(x.shape[0]):
        hidden = torch.mm(x[rows], w1.t())  # (chunk, Hd)
        torch.mm(hidden.relu_(), w2t, out=out[rows])
    return out.add_(b2)


def row_updates(
    rows: torch.Tensor, weights: Sequence[torch.Tensor], patches: torch.Tensor, maps: Sequence[torch.Tensor],
    gathered: bool = False,
) -> torch.Tensor:
    """MLP updates (M, K) of pixel ``rows`` (M,), distinct, whose input rows are those of the
    perception ``maps`` (F tensors (N, K)) and of ``patches`` (N, 9C + 1) side by side; ``weights``
    from :meth:`RNCA.mlp_weights`. ``gathered``: ``maps`` holds the rows' features already, one
    (M, F*K) tensor (:func:`rnca_cli.fused.perceive_rows`). Differentiable (:class:`_RowUpdates`)."""
    return _RowUpdates.apply(rows, gathered, *weights, patches, *maps)


class _RowUpdates(torch.autograd.Function):
    """Gather the input rows of the pixels to update and run the MLP on them, as one autograd node.

    Forward gathers ``[maps..., patches]`` at ``rows`` into one (M, D) matrix (no concatenation)
    and runs :func:`mlp`. Backward works chunk by chunk (rows of 2048):

    * it recomputes the chunk's hidden layer instead of storing 64 steps of (M, 128) activations
      (one extra first-layer GEMM against a round trip through main memory);
    * the ReLU backward is one fused ``threshold_backward`` pass (35 -> 15 ms per step, 28k rows);
    * fc1's weight gradient accumulates transposed, ``x.T @ g`` into (D, Hd): 310 -> 190 us per
      chunk against ``g.T @ x`` into (Hd, D) (A/B, same run);
    * the input gradient is computed for the perception columns only, which need it (the image
      patch columns are data): (chunk, 128) x (128, 48) instead of x (128, 58), 280 -> 120 us;
    * the map gradients are rows copied into place (``index_copy_``; rows are distinct) rather
      than scatter-added: 1.3 -> 0.6 ms per map and step.
    """

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
        for shape, needed in zip(ctx.map_shapes, ctx.needs_input_grad[6:]):
            if needed:
                map_grads.append(g_feat.new_zeros(shape).index_copy_(0, rows, g_feat[:, col : col + shape[1]]))
            else:
                map_grads.append(None)
            col += shape[1]
        return None, None, gw1t.t(), gw2, grad.sum(0), None, *map_grads


def gather_rows(rows: torch.Tensor, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rows`` of (N, w_i) tensors side by side, (M, sum w_i), written column block by column
    block into ``out`` (or a new tensor): no per-tensor copies and no concatenation."""
    if out is None:
        out = tensors[0].new_empty(len(rows), sum(t.shape[1] for t in tensors))
    col = 0
    for t in tensors:
        torch.index_select(t, 0, rows, out=out[:, col : col + t.shape[1]])
        col += t.shape[1]
    return out


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """(n,) int64 positions of the True entries of a flat bool tensor, ``mask.nonzero().squeeze(1)``.

    On a CPU through numpy's ``flatnonzero`` on the same memory, 2-4x faster than torch's
    ``nonzero`` (isolated, 2 cores): 45-71 -> 16-21 us for the 14,400 flags of a one-ring sparse
    step, 130-210 -> 43-62 us for a batch of 16 64x64 images, 530-810 -> 220-250 us for 512x512.
    In a sparse step it is called three times (cells to update, those that fire, cells to clear):
    512x512 with one ring, a steady-state step took less in 8 of 10 A/B pairs, median 7 %
    (e.g. 2.15 -> 1.88 ms), 4 rings in 3 of 4 (6.70 -> 6.17 ms); batch-16 inference moved
    within noise."""
    if mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def row_chunks(n: int):
    """Row slices of about ``_MLP_CHUNK`` rows, of equal size: 2,300 rows are one chunk, not 2,048
    and a ragged 252 (each chunk is several operations; a sparse step is a few dozen)."""
    size = max(1, math.ceil(n / max(1, round(n / _MLP_CHUNK))))
    return (slice(start, start + size) for start in range(0, n, size))


# -- stochastic updates --------------------------------------------------------------------------

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 products wrap).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_SIGN = -(1 << 63)  # int64 with only the top bit set


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


class FireNoise:
    """Per-cell uniform numbers u(seed, t, y, x) in [0, 1), from a counter-based hash (splitmix64).

    A cell's draw depends only on its sample's seed, the step and its *global* coordinates
    (``origin`` + position), not on the batch, the tile, or the order of draws. So a tile of an
    image refines exactly like the same pixels of the whole image, a case refines the same in any
    batch, and (integer arithmetic) CUDA should draw the same masks as the CPU (a test checks it
    where a GPU exists; none has been available yet). Coordinates and steps must be below 2^20.
    """

    def __init__(self, seeds: torch.Tensor, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)):
        h, w = shape
        device = seeds.device
        ys = torch.arange(origin[0], origin[0] + h, device=device, dtype=torch.int64)
        xs = torch.arange(origin[1], origin[1] + w, device=device, dtype=torch.int64)
        cell = (ys[:, None] << 20) | xs[None, :]  # (H, W)
        # (B, H, W) int64: each cell's hash key; step t's draw is a function of key and t only.
        self.keys = cell[None] + _splitmix(seeds.to(torch.int64).view(-1, 1, 1) + _GOLDEN)

    def select(self, samples: torch.Tensor) -> "FireNoise":
        """The same draws for a subset of the samples (a (B,) bool mask or indices)."""
        subset = object.__new__(FireNoise)
        subset.keys = self.keys[samples]
        return subset

    def uniform(self, t: int) -> torch.Tensor:
        """(B, 1, H, W) float32 in [0, 1) for step ``t``."""
        return self.draw(self.keys, t).unsqueeze(1)

    @staticmethod
    def draw(keys: torch.Tensor, t: int) -> torch.Tensor:
        """float32 in [0, 1), shaped like ``keys`` (any subset of :attr:`keys`): the draws of step ``t``.

        The top 24 bits of splitmix64(keys + t * 2^40). Its last round, ``z ^ (z >>> 31)``, leaves
        the top 24 bits as they are (bits 40-63 of ``z >>> 31`` are zero), so it is skipped.
        """
        z = keys + (t << 40)
        z = (z ^ _shr(z, 30)) * _MIX1
        z = (z ^ _shr(z, 27)) * _MIX2
        return _shr(z, 40).to(torch.float32) * (1.0 / (1 << 24))

    @staticmethod
    def fires(keys: torch.Tensor, t: int, rate: float) -> torch.Tensor:
        """bool, shaped like ``keys``: exactly ``draw(keys, t) < rate``, in fewer operations.

        The draw is i / 2^24 for the top 24 bits i of the hash z, and it is compared with rate
        rounded to float32, r. So it fires iff i < ceil(r * 2^24) = T, iff z < T * 2^40 as unsigned
        64-bit numbers, which a signed comparison decides once both sides have their top bit
        flipped. Two operations instead of five (shift, mask, convert, scale, compare): 40-60 us
        per sparse step of a 512x512 image with one ring.
        """
        r = struct.unpack("f", struct.pack("f", rate))[0]  # rate as float32, without a tensor operation
        threshold = math.ceil(r * (1 << 24))
        if threshold <= 0 or threshold >= 1 << 24:
            return torch.full_like(keys, threshold > 0, dtype=torch.bool)
        z = keys + (t << 40)
        z = (z ^ _shr(z, 30)) * _MIX1
        z = (z ^ _shr(z, 27)) * _MIX2
        return (z ^ _SIGN) < (threshold << 40) + _SIGN


def draw_seeds(batch: int, device: torch.device | str, generator: Generators = None) -> torch.Tensor:
    """(B,) int64 noise seeds drawn from one generator, or one per sample from a sequence."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        seeds = [torch.randint(0, 1 << 62, (1,), generator=g, device=g.device) for g in generator]
        return torch.cat(seeds).to(device)
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 1 << 62, (batch,), generator=generator, device=gen_device).to(device)


def max3x3(v: torch.Tensor) -> torch.Tensor:
    """Valid 3x3 maximum of (B, H, W) -> (B, H-2, W-2), as two separable passes of elementwise max.

    Exact (max has no rounding) and several times cheaper than max_pool2d on CPU.
    """
    rows = torch.maximum(torch.maximum(v[:, :-2], v[:, 1:-1]), v[:, 2:])  # (B, H-2, W)
    return torch.maximum(torch.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


def near(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> (B, H, W) bool: cells within one pixel (8-neighbourhood) of a True cell."""
    return max3x3(F.pad(mask, (1, 1, 1, 1)))


def needed(pre: torch.Tensor, bright: torch.Tensor, fire: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) bool: the cells whose tentative state a step reads, given ``pre`` (alive before the
    step), ``bright`` (visible channel >= the alive threshold) and ``fire`` (the update mask; None:
    every cell fires), all (B, H, W) bool. Of these, the cells that fire are the ones a step must
    update.

    A cell alive before the step may be kept, so its update is needed. A cell that is not ends at
    zero, and its tentative state is read only by the after-update alive test of its alive
    neighbours. A neighbour whose 3x3 neighbourhood holds a bright cell that does not fire
    passes that test whatever the others' updates, so only the neighbours of the alive cells
    without such a cell need it. Against all firing cells within a pixel of an alive cell, this
    leaves out about a tenth of the MLP rows (8.5 % in batch-16 inference of rings, 10 % on 512x512
    images with rings).
    """
    if fire is None:  # no cell keeps its value, so every cell within a pixel of an alive one counts
        return near(pre)
    stable = torch.gt(bright, fire)  # bright and does not fire: bool a > b is a & ~b
    return near(torch.gt(pre, near(stable))).logical_or_(pre)  # alive, or next to an undecided alive cell


def visible(state: torch.Tensor) -> torch.Tensor:
    """The output mask probability: visible channel clamped to [0, 1]. (B, K, H, W) -> (B, H, W)."""
    return state[:, 0].clamp(0.0, 1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
