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

Layout and the one piece of algebra that makes this fast (both exact):

* The first MLP layer ``W1 @ [f_s, f_x] + b1`` splits into ``W1_s @ f_s`` and ``W1_x @ f_x + b1``.
  The second term does not change during a rollout and is computed once (:meth:`RNCA.image_term`).
* The state is kept as an NCHW tensor in ``channels_last`` memory, i.e. physically (B, H, W, K).
  Convolutions accept it as it is, and the per-pixel MLP is then a plain (pixels, channels) matrix
  product on a *view* of the same memory: one GEMM per layer per step, no transposes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence, Union

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
# Pixels per MLP chunk in inference: 2048 x 128 float32 hidden values = 1 MiB, about one L2.
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
    """The rNCA update rule. Use :meth:`initial_state`, :meth:`image_term` and :meth:`rollout`."""

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

    def image_term(self, image: torch.Tensor) -> torch.Tensor:
        """The constant half of the first MLP layer, ``W1_x @ conv(image) + b1``.

        image: (B, C, H, W) -> (B*H*W, hidden), rows in (b, y, x) order.
        """
        image = image.contiguous(memory_format=torch.channels_last)
        feats = self.image_conv(image)  # (B, F*K, H, W)
        feats = feats.permute(0, 2, 3, 1).reshape(-1, self.n_features)  # (B*H*W, F*K)
        return self.fc1_image(feats)  # (B*H*W, hidden)

    def alive(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) visible -> (B, 1, H, W) bool: 3x3 max >= alive_threshold.

        A boolean needs no gradient, so it is computed outside autograd with :func:`max3x3`
        (CPU max_pool2d computes argmax indices even then: 2.1 ms per call for 16 x 66 x 66).
        """
        with torch.no_grad():
            padded = F.pad(visible[:, 0], (1, 1, 1, 1), value=-math.inf)  # (B, H+2, W+2)
            return (max3x3(padded) >= self.config.alive_threshold).unsqueeze(1)

    def fire_mask(self, noise: "FireNoise", t: int) -> torch.Tensor | None:
        """(B, 1, H, W) bool: which cells apply their update in step ``t`` (None: all of them)."""
        if self.config.fire_rate >= 1.0:
            return None
        return noise.uniform(t) < self.config.fire_rate

    def step(self, state: torch.Tensor, image_term: torch.Tensor, noise: "FireNoise", t: int) -> torch.Tensor:
        """Update ``t`` of a rollout. state: (B, K, H, W) channels_last; image_term from :meth:`image_term`.

        This is the reference formulation (and the one training differentiates through);
        ``rnca_cli.inference`` runs the same rule faster, in place and skipping dead blocks.
        """
        b, k, h, w = state.shape
        pre_alive = self.alive(state[:, :1])  # (B, 1, H, W)
        feats = F.conv2d(state, self.state_filters, padding=1, groups=k)  # (B, F*K, H, W)
        feats = feats.permute(0, 2, 3, 1).reshape(-1, self.n_features)  # (B*H*W, F*K), a view
        delta = self.mlp(feats, image_term)  # (B*H*W, K)
        delta = delta.view(b, h, w, k).permute(0, 3, 1, 2)  # (B, K, H, W), channels_last view
        fire = self.fire_mask(noise, t)
        if fire is not None:
            delta = delta * fire.to(delta.dtype)
        state = state + delta
        keep = pre_alive & self.alive(state[:, :1])  # (B, 1, H, W)
        return state * keep.to(state.dtype)

    def mlp(self, feats: torch.Tensor, image_term: torch.Tensor) -> torch.Tensor:
        """Per-pixel MLP: (N, F*K) state features + (N, hidden) image term -> (N, K) update."""
        w1, w2, b2 = self.fc1_state.weight.t(), self.fc2.weight.t(), self.fc2.bias
        if torch.is_grad_enabled() and (w1.requires_grad or feats.requires_grad):
            hidden = torch.relu(torch.addmm(image_term, feats, w1))  # (N, hidden)
            return torch.addmm(b2, hidden, w2)  # (N, K)
        # Inference: the (N, hidden) activation is the largest tensor of a step and would make
        # each step memory-bound. Row chunks that fit in cache, with ReLU in place, keep it out
        # of main memory (same arithmetic, same result).
        out = feats.new_empty(feats.shape[0], w2.shape[1])
        for start in range(0, feats.shape[0], _MLP_CHUNK):
            rows = slice(start, start + _MLP_CHUNK)
            hidden = torch.addmm(image_term[rows], feats[rows], w1).relu_()
            torch.addmm(b2, hidden, w2, out=out[rows])
        return out

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
        term = self.image_term(image)
        history = []
        for t in range(steps):
            state = self.step(state, term, noise, t)
            if record:
                history.append(state[:, 0])
        return state, (torch.stack(history) if record else None)

    def forward(self, image, mask, steps: int = 64, generator=None) -> torch.Tensor:
        """Refined probability (B, H, W) after ``steps`` updates."""
        state, _ = self.rollout(image, mask, steps, generator)
        return visible(state)


# -- stochastic updates --------------------------------------------------------------------------

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 products wrap).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


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
    batch, and (integer arithmetic) CUDA should draw the same masks as the CPU, not yet checked on a
    GPU. Coordinates and steps must be below 2^20.
    """

    def __init__(self, seeds: torch.Tensor, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)):
        h, w = shape
        device = seeds.device
        ys = torch.arange(origin[0], origin[0] + h, device=device, dtype=torch.int64)
        xs = torch.arange(origin[1], origin[1] + w, device=device, dtype=torch.int64)
        cell = (ys[:, None] << 20) | xs[None, :]  # (H, W)
        self._base = cell[None] + _splitmix(seeds.to(torch.int64).view(-1, 1, 1) + _GOLDEN)  # (B, H, W)

    def uniform(self, t: int) -> torch.Tensor:
        """(B, 1, H, W) float32 in [0, 1) for step ``t``."""
        z = _splitmix(self._base + (t << 40))
        return (_shr(z, 40).to(torch.float32) * (1.0 / (1 << 24))).unsqueeze(1)


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


def visible(state: torch.Tensor) -> torch.Tensor:
    """The output mask probability: visible channel clamped to [0, 1]. (B, K, H, W) -> (B, H, W)."""
    return state[:, 0].clamp(0.0, 1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
