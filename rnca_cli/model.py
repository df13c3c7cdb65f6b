"""The refinement neural cellular automaton (rNCA): its configuration and its update rule.

This module is the rule as the paper writes it (Section 3.2, Appendix A), in plain PyTorch, and
the reference every engine (:mod:`rnca_cli.engines`) is tested against. Every pixel holds a state
vector of ``K`` channels; channel 0 is the visible mask (a probability), channels 1..K-1 are latent
and start at zero. One step:

1. **perceive** the state with a depthwise 3x3 convolution (per channel: identity, Sobel-x,
   Sobel-y, learnable, no bias) -> ``F*K`` features, and the image with one 3x3 convolution ->
   ``F*K`` features (the image never changes, so once per rollout);
2. **update**: a per-pixel MLP ``[state features, image features] -> hidden -> ReLU -> K`` gives
   ``ds``; its last layer starts at zero, so an untrained model leaves the state unchanged;
3. **fire**: each cell applies its update with probability ``fire_rate``, ``s <- s + ds * mask``;
   the mask is a hash of (seed, step, pixel) (:class:`FireNoise`), so a case refines the same
   alone, in any batch and tile by tile;
4. **alive masking**: a cell whose 3x3 neighbourhood has no visible value >= ``alive_threshold``
   before or after the update has its whole state set to zero.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import constants as C
from .errors import UsageError

# Initial 3x3 perception kernels, in the order a config's ``filters`` count takes them.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
_KERNELS = {
    "identity": torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
    "sobel_x": _SOBEL_X,
    "sobel_y": _SOBEL_X.T.contiguous(),
    "laplacian": torch.tensor([[1.0, 2.0, 1.0], [2.0, -12.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0,
}
MAX_FILTERS = len(_KERNELS)
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
        image_norm: sigma in pixels of the local contrast normalisation every image gets before
            the model sees it (:func:`rnca_cli.preprocess.normalise`); 0: the image as it is
            (the paper's setting, and that of checkpoints saved before this field existed).
    """

    channels: int = 16
    filters: int = 3
    hidden: int = 128
    fire_rate: float = 0.5
    alive_threshold: float = 0.1
    visible_floor: float = 0.1
    image_channels: int = 1
    image_norm: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.channels >= 1, "channels must be >= 1"),
            (1 <= self.filters <= MAX_FILTERS, f"filters must be in 1..{MAX_FILTERS}"),
            (self.hidden >= 1, "hidden must be >= 1"),
            (0.0 <= self.fire_rate <= 1.0, "fire_rate must be in [0, 1]"),
            (0.0 <= self.alive_threshold <= 1.0, "alive_threshold must be in [0, 1]"),
            (0.0 <= self.visible_floor <= 1.0, "visible_floor must be in [0, 1]"),
            (self.image_channels >= 1, "image_channels must be >= 1"),
            (self.image_norm >= 0, "image_norm must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"ModelConfig: {message}")

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
    """The rNCA update rule: :meth:`initial_state`, :meth:`step`, :meth:`rollout`."""

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
        # First MLP layer, in its state and image halves: [f_s, f_x] @ W1.T = f_s @ W1_s.T + f_x @ W1_x.T.
        self.fc1_state = nn.Linear(f * k, config.hidden, bias=False)
        self.fc1_image = nn.Linear(f * k, config.hidden, bias=True)
        self.fc2 = nn.Linear(config.hidden, k, bias=True)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def initial_state(self, mask: torch.Tensor) -> torch.Tensor:
        """State at step 0 from masks (B, H, W) in [0, 1]: visible = clamped mask, latent = 0.

        Returns (B, K, H, W) in channels_last memory (the layout the engines compute in).
        """
        b, h, w = mask.shape
        state = torch.zeros(b, h, w, self.config.channels, dtype=mask.dtype, device=mask.device)
        state[..., 0] = mask.clamp(self.config.visible_floor, 1.0)
        return state.permute(0, 3, 1, 2)  # (B, K, H, W), channels_last

    def perceive_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image features (B, C, H, W) -> (B, F*K, H, W), zero padded; constant over a rollout."""
        return self.image_conv(image)

    def perceive(self, state: torch.Tensor) -> torch.Tensor:
        """State features (B, K, H, W) -> (B, F*K, H, W): channel c*F + i is filter i on channel c."""
        return F.conv2d(state, self.state_filters, padding=1, groups=self.config.channels)

    def update(self, state_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """The per-pixel MLP: features (B, F*K, H, W) twice -> update ``ds`` (B, K, H, W)."""
        x = torch.cat([state_features, image_features], 1).permute(0, 2, 3, 1)  # (B, H, W, 2FK)
        w1 = torch.cat([self.fc1_state.weight, self.fc1_image.weight], 1)  # (hidden, 2FK)
        hidden = torch.relu(F.linear(x, w1, self.fc1_image.bias))  # (B, H, W, hidden)
        return self.fc2(hidden).permute(0, 3, 1, 2)  # (B, K, H, W)

    def alive(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) visible -> (B, 1, H, W) bool: some value in the 3x3 neighbourhood >= alive_threshold."""
        return F.max_pool2d(visible, 3, stride=1, padding=1) >= self.config.alive_threshold

    def fire_mask(self, noise: "FireNoise", t: int) -> torch.Tensor | None:
        """(B, 1, H, W) bool: which cells apply their update in step ``t`` (None: all of them)."""
        if self.config.fire_rate >= 1.0:
            return None
        return FireNoise.fires(noise.keys, t, self.config.fire_rate).unsqueeze(1)

    def step(self, state: torch.Tensor, image_features: torch.Tensor, noise: "FireNoise", t: int) -> torch.Tensor:
        """Update ``t`` of a rollout: state (B, K, H, W), image features from :meth:`perceive_image`."""
        delta = self.update(self.perceive(state), image_features)  # (B, K, H, W)
        fire = self.fire_mask(noise, t)  # (B, 1, H, W) or None
        new = state + (delta if fire is None else delta * fire)
        keep = self.alive(state[:, :1]) & self.alive(new[:, :1])  # alive before and after
        return new * keep

    def rollout(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        steps: int,
        generator: Generators = None,
        record: bool = False,
        seeds: torch.Tensor | None = None,
        origin: tuple[int, int] = (0, 0),
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
            origin: global position of pixel (0, 0), for tiles of a larger image.

        Returns:
            (final state (B, K, H, W), visible channel per step (steps, B, H, W) or None).
            The visible channel is not clamped here; see :func:`visible`.
        """
        b, _, h, w = image.shape
        if seeds is None:
            seeds = draw_seeds(b, image.device, generator)
        noise = FireNoise(seeds.to(image.device), (h, w), origin)
        state = self.initial_state(mask)
        image_features = self.perceive_image(image)
        history = []
        for t in range(steps):
            state = self.step(state, image_features, noise, t)
            if record:
                history.append(state[:, 0])
        return state, (torch.stack(history) if record else None)

    def forward(self, image, mask, steps: int = 64, generator=None) -> torch.Tensor:
        """Refined probability (B, H, W) after ``steps`` updates."""
        state, _ = self.rollout(image, mask, steps, generator)
        return visible(state)


# -- stochastic updates --------------------------------------------------------------------------


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(C.GOLDEN), _signed(C.MIX1), _signed(C.MIX2)
_SIGN = -(1 << 63)  # int64 with only the top bit set
_DRAW_BITS = 64 - C.STEP_SHIFT  # bits of a draw: 24


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's first two rounds (its last, ``z ^ (z >>> 31)``, leaves the top 24 bits as they are)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    return (z ^ _shr(z, 27)) * _MIX2


def fire_threshold(rate: float) -> int:
    """A cell fires in a step iff the top 24 bits of its hash are below this: ceil(rate * 2^24),
    with ``rate`` rounded to float32 as the draw it is compared with (:meth:`FireNoise.draw`)."""
    r = struct.unpack("f", struct.pack("f", rate))[0]
    return math.ceil(r * (1 << _DRAW_BITS))


class FireNoise:
    """Per-cell uniform numbers u(seed, t, y, x) in [0, 1), from a counter-based hash (splitmix64).

    A cell's draw depends only on its sample's seed, the step and its *global* coordinates
    (``origin`` + position), not on the batch, the tile, or the order of draws. So a tile of an
    image refines exactly like the same pixels of the whole image, a case refines the same in any
    batch, and (integer arithmetic) CUDA draws the same masks as the CPU. Coordinates and steps
    must be below 2^20.
    """

    def __init__(self, seeds: torch.Tensor, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)):
        h, w = shape
        device = seeds.device
        ys = torch.arange(origin[0], origin[0] + h, device=device, dtype=torch.int64)
        xs = torch.arange(origin[1], origin[1] + w, device=device, dtype=torch.int64)
        cell = (ys[:, None] << C.COORD_BITS) | xs[None, :]  # (H, W)
        mixed = _mix(seeds.to(torch.int64).view(-1, 1, 1) + _GOLDEN)
        seed_keys = mixed ^ _shr(mixed, 31)  # (B, 1, 1): splitmix64 of the seed, all three rounds
        # (B, H, W) int64: each cell's hash key; step t's draw is a function of key and t only.
        self.keys = cell[None] + seed_keys

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
        """float32 in [0, 1), shaped like ``keys`` (any subset of :attr:`keys`): the top 24 bits
        of splitmix64(keys + t * 2^40), divided by 2^24."""
        z = _mix(keys + (t << C.STEP_SHIFT))
        return _shr(z, C.STEP_SHIFT).to(torch.float32) * (1.0 / (1 << _DRAW_BITS))

    @staticmethod
    def fires(keys: torch.Tensor, t: int, rate: float) -> torch.Tensor:
        """bool, shaped like ``keys``: exactly ``draw(keys, t) < rate``.

        The draw's top bits are below :func:`fire_threshold` T iff the hash is below T * 2^40 as
        an unsigned number, which a signed comparison decides once both sides have their top bit
        flipped: two operations instead of five.
        """
        threshold = fire_threshold(rate)
        if threshold <= 0 or threshold >= 1 << _DRAW_BITS:
            return torch.full_like(keys, threshold > 0, dtype=torch.bool)
        z = _mix(keys + (t << C.STEP_SHIFT))
        return (z ^ _SIGN) < (threshold << C.STEP_SHIFT) + _SIGN


def draw_seeds(batch: int, device: torch.device | str, generator: Generators = None) -> torch.Tensor:
    """(B,) int64 noise seeds drawn from one generator, or one per sample from a sequence."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        seeds = [torch.randint(0, 1 << 62, (1,), generator=g, device=g.device) for g in generator]
        return torch.cat(seeds).to(device)
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 1 << 62, (batch,), generator=generator, device=gen_device).to(device)


def visible(state: torch.Tensor) -> torch.Tensor:
    """The output mask probability: visible channel clamped to [0, 1]. (B, K, H, W) -> (B, H, W)."""
    return state[:, 0].clamp(0.0, 1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
