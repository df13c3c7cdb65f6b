"""Inference: a rollout on the engine that suits it, and whole images tile by tile.

:func:`rollout` runs one batch on an engine from :mod:`rnca_cli.engines` (the fastest that can,
unless one is named). :func:`refine_image` refines one 2D case of any size in tiles: one step
reads neighbours 2 pixels away (1 through perception, 1 more through the alive test of the
neighbours' tentative values), so a tile grown by a halo of ``2 * steps + 1`` pixels (one more
for the image convolution) refines its core exactly as the whole image would, and
:class:`~rnca_cli.model.FireNoise` draws from global coordinates. Memory is bounded by the tile.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .device import float32_convolutions
from .engines import Engine, precision_dtype, select_engine
from .model import RNCA
from .options import RefineOptions
from .preprocess import normalise

DEFAULT_TILE = RefineOptions.tile


def halo(steps: int) -> int:
    """Pixels of context a tile needs on each side for an exact result after ``steps`` updates."""
    return 2 * steps + 1


def rollout(
    model: RNCA, image: torch.Tensor, mask: torch.Tensor, steps: int, seeds: torch.Tensor,
    origin: tuple[int, int] = (0, 0), stats: dict | None = None, precision: str = "fp32",
    engine: Engine | str | None = None,
) -> torch.Tensor:
    """Refined probability (B, H, W) for image (B, C, H, W) and mask (B, H, W), as
    ``visible(model.rollout(...))`` with the same seeds, computed without autograd (an inference
    tensor: clone it before using it where autograd records).

    ``engine``: an :class:`~rnca_cli.engines.Engine`, an engine's name, or None for
    :func:`~rnca_cli.engines.select_engine`'s choice. ``origin``, ``stats`` and ``precision``:
    see :meth:`rnca_cli.engines.Engine.rollout`.
    """
    if not isinstance(engine, Engine):
        engine = select_engine(image.device, precision_dtype(precision), model, engine)
    with float32_convolutions(image.device):  # fp32 on a GPU matches the CPU (see there)
        return engine.rollout(model, image, mask, steps, seeds, origin, stats, precision)


@torch.no_grad()
def trajectory(model: RNCA, image: np.ndarray, mask: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """The refined probability after each step of one 2D case (image (H, W, C) as read, normalised
    here as the model's config says; mask (H, W)): (steps, H, W) float32, for pictures. From the
    reference rule, which records every step (the engines keep only the last), so it equals the
    engines' steps to float rounding."""
    device = next(model.parameters()).device
    image = normalise(image, model.config.image_norm)
    img = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None].to(device)
    msk = torch.from_numpy(np.ascontiguousarray(mask, np.float32))[None].to(device)
    history = model.rollout(img, msk, steps, seeds=torch.tensor([seed], device=device), record=True)[1]
    return history[:, 0].clamp(0, 1).cpu().numpy()


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
    precision: str = "fp32", progress: Callable[[int], None] | None = None, engine: Engine | str | None = None,
) -> np.ndarray:
    """Refine one 2D case (image (H, W, C) as the model sees it, already normalised by
    :func:`rnca_cli.refine.refine_batch`; mask (H, W)) tile by tile; returns (H, W) float32.

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
            prob = rollout(model, img.permute(2, 0, 1)[None], msk[None], steps, seeds, (ya, xa),
                           precision=precision, engine=engine)[0]
            out[y0:y1, x0:x1] = prob[y0 - ya : y1 - ya, x0 - xa : x1 - xa].float().cpu().numpy()
            if progress is not None:
                progress((y1 - y0) * (x1 - x0))
    return out
