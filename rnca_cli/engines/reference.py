"""The ``reference`` engine: :meth:`rnca_cli.model.RNCA.rollout` itself, the rule as the paper
writes it, on every pixel at every step. Slow; it exists so that the rule has one executable
definition that the other engines are tested against, and so that it can be run by name
(``RNCA_ENGINE=reference``)."""

from __future__ import annotations

import time

import torch

from ..model import RNCA, FireNoise, visible
from . import Engine


class ReferenceEngine(Engine):
    name = "reference"

    def unavailable(self, device, dtype, model):
        return None if dtype == torch.float32 else "runs float32 only"

    @torch.no_grad()
    def rollout(self, model: RNCA, image, mask, steps, seeds, origin=(0, 0), stats=None, precision="fp32"):
        if precision != "fp32":
            raise ValueError(f"the reference engine runs float32 only, not {precision}")
        b, _, h, w = image.shape
        noise = FireNoise(seeds.to(image.device), (h, w), origin)
        state, image_features = model.initial_state(mask), model.perceive_image(image)
        alive_share = update_share = 0.0
        seconds = []
        for t in range(steps):
            start = time.perf_counter()
            if stats is not None:
                alive = model.alive(state[:, :1])
                fire = model.fire_mask(noise, t)
                alive_share += float(alive.float().mean()) / steps
                update_share += float((alive if fire is None else alive & fire).float().mean()) / steps
            state = model.step(state, image_features, noise, t)
            seconds.append(time.perf_counter() - start)
        if stats is not None:
            stats.update(dense_steps=steps, sparse_steps=0, block_share=1.0 if steps else 0.0,
                         alive_share=alive_share, update_share=update_share, step_seconds=seconds)
        return visible(state)

    def training_inputs(self, model, image):
        return model.perceive_image(image)  # (B, F*K, H, W)

    def train_step(self, model, state, inputs, noise, t):
        return model.step(state, inputs, noise, t)
