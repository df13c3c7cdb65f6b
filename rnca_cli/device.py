"""Choosing the compute device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a ``--device`` value into a torch.device, refusing devices that are not there.

    ``auto`` takes the first CUDA GPU when one is available, else the CPU.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine (use cpu or auto)")
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise DeviceError(f"--device {spec}: expected cuda or cuda:N") from None
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise DeviceError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator living on ``device`` (CUDA kernels need a CUDA generator)."""
    return torch.Generator(device=device).manual_seed(seed)
