"""Where and how computation runs: the ``--device`` choice (``auto``, ``cpu``, ``cuda`` or
``cuda:N``), float32 convolutions on GPUs (:func:`float32_convolutions`) and the process's memory
allocator settings (:func:`keep_freed_memory`).

PyTorch is imported by the functions that use it, not with this module: the ``rnca`` command sets
the allocator at start for every command, and ``evaluate``, ``perturb`` and ``synth`` never load
PyTorch (about 2 s of a 2-core machine's start-up).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import TYPE_CHECKING

from .errors import DeviceError

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a ``--device`` value into a torch.device, refusing devices that are not there.

    ``auto`` takes the first CUDA GPU when one is available, else the CPU.
    """
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                raise DeviceError(
                    f"--device {spec}: this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build "
                    "(pip install torch --index-url https://download.pytorch.org/whl/cu124, or see pytorch.org) "
                    "or use --device cpu"
                )
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
    import torch

    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def float32_convolutions(device: torch.device):
    """Run cuDNN's float32 convolutions in full float32 (IEEE) inside the block, on a CUDA device.

    PyTorch lets cuDNN compute float32 convolutions in TF32 by default (10-bit mantissa, on Ampere
    and later GPUs), and the state's channels-last depthwise perception goes to cuDNN. An error of
    1e-3 in a cell's perception can move it across the alive threshold, so fp32 refinement on a GPU
    would no longer match the CPU to float rounding. The MLP's matrix products already run in
    float32 under PyTorch's defaults. The setting is restored on leaving; on a CPU, or when the
    user has set float32 convolutions already, nothing changes. Half precision (``--precision``)
    is unaffected: it concerns the MLP.
    """
    if device.type != "cuda":
        yield
        return
    import torch

    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)  # PyTorch >= 2.9: per-operation precision settings
    owner, name, full = (conv, "fp32_precision", "ieee") if conv is not None else (cudnn, "allow_tf32", False)
    before = getattr(owner, name)
    setattr(owner, name, full)
    try:
        yield
    finally:
        setattr(owner, name, before)


# glibc's mallopt parameters (malloc.h); their values are C ints.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process: blocks under 1 GiB come from the heap
    instead of their own ``mmap``, and freed memory is not handed back to the kernel. Returns
    whether the setting took effect; it is process-wide, so the ``rnca`` command sets it at start
    and the library never does.

    Why: with glibc's defaults every block of 32 MB or more (a dense step's perception maps on a
    large tile) is mapped when allocated and unmapped when freed, so the next step faults the same
    memory in again page by page (``benchmarks/SPEED.md`` has the figures). Memory freed after the
    peak stays with the process until it exits, which a command that ends after its job does not mind.

    Nothing is changed (False) off glibc, or when the user set glibc's malloc options in the
    environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or
    ``GLIBC_TUNABLES``): those are left as the user chose.
    """
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
