"""Float32 convolutions on GPUs, the process's allocator setting (``keep_freed_memory``) and the
``rnca`` command applying it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from rnca_cli import device
from rnca_cli.cli import app

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# Minor page faults of allocating and touching a 64 MB tensor after a 96 MB one was freed (larger,
# so that the aligned allocation fits in the freed block); printed by a fresh interpreter so that
# the test process's allocator is left alone.
FAULTS_OF_SECOND_ALLOCATION = """
import resource, sys, torch
from rnca_cli.device import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(24 * 2**20)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 * 2**20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_second_allocation(mode: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_SECOND_ALLOCATION, mode],
                          capture_output=True, text=True, timeout=120, check=True)
    applied, faults = done.stdout.split()
    return applied, int(faults)


def huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: then a fresh 64 MB block faults in 2 MB pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@glibc
@pytest.mark.skipif(huge_pages_always(), reason="page-fault counts are 512x smaller with huge pages always on")
def test_freed_memory_is_reused_without_page_faults():
    applied, kept = faults_of_second_allocation("keep")
    _, default = faults_of_second_allocation("default")
    assert applied == "True"
    assert default >= 8192  # glibc's default: the 64 MB block is mapped anew, 16,384 pages faulted in
    assert kept < 1024  # kept in the heap: the second tensor reuses the first one's pages


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_users_malloc_settings_are_left_alone(monkeypatch, name):
    called = []
    monkeypatch.setenv(name, "131072")
    monkeypatch.setattr(device.ctypes, "CDLL", lambda *a: called.append(a))
    assert device.keep_freed_memory() is False and called == []


def test_rnca_command_sets_it_before_running(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append(True) or True)
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(tmp_path / "none"), "--gt", str(tmp_path)])
    assert result.exit_code == 1 and calls == [True]


def conv_precision() -> str:
    conv = getattr(torch.backends.cudnn, "conv", None)
    return conv.fp32_precision if conv is not None else str(torch.backends.cudnn.allow_tf32)


@pytest.mark.parametrize("where, inside", [("cuda", {"ieee", "False"}), ("cpu", None)])
def test_float32_convolutions_holds_only_inside_the_block_and_only_on_cuda(where, inside):
    """The flag is process-wide and readable without a GPU; refine and train set it around their loops."""
    before = conv_precision()
    with device.float32_convolutions(torch.device(where)):
        assert conv_precision() in (inside or {before})
    assert conv_precision() == before
    with pytest.raises(KeyError), device.float32_convolutions(torch.device(where)):
        raise KeyError("an error inside still restores the setting")
    assert conv_precision() == before


def test_cuda_on_a_cpu_only_build_says_how_to_get_cuda(monkeypatch):
    import torch

    from rnca_cli.device import resolve_device
    from rnca_cli.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="--device cuda: this PyTorch .* is a CPU-only build; install a CUDA build"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(DeviceError, match="CUDA is not available on this machine"):
        resolve_device("cuda:0")
