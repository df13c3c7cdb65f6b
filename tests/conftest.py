"""Shared fixtures: tiny models and small synthetic cases written as PNG and NIfTI files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from rnca_cli import kernels
from rnca_cli.checkpoint import save_checkpoint
from rnca_cli.model import RNCA, ModelConfig

SHARED_RINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "rings-train"
# CUDA tests compare the GPU with the CPU; they run wherever PyTorch sees a CUDA device.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_kernels = pytest.mark.skipif(kernels.status() is not None, reason=f"compiled kernels: {kernels.status()}")


@pytest.fixture(params=["sparse", "fused"])
def engine(request, monkeypatch) -> str:
    """Runs a test once per fast engine (rnca_cli.engines), through the ``RNCA_ENGINE`` switch
    every entry point obeys; returns the engine's name. Tests compare them with the reference
    rule; test_fused.py checks that the kernels are built wherever a C compiler is."""
    if request.param == "fused" and kernels.status() is not None:
        pytest.skip(f"compiled kernels: {kernels.status()}")
    monkeypatch.setenv("RNCA_ENGINE", request.param)
    return request.param


def ring(size: int = 32, radius: float = 9.0, width: float = 2.5, gap: bool = False) -> np.ndarray:
    """A binary ring (bool, size x size), optionally cut by a vertical gap on its right side."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx)
    out = (r >= radius - width / 2) & (r <= radius + width / 2)
    if gap:
        out &= ~((np.abs(yy) <= 2) & (xx > 0))
    return out


def tiny_model(seed: int = 0, image_channels: int = 1, fire_rate: float = 0.5, image_norm: float = 0.0) -> RNCA:
    """A small model whose last layer is not zero, so steps change the state."""
    torch.manual_seed(seed)
    model = RNCA(ModelConfig(channels=4, hidden=8, image_channels=image_channels, fire_rate=fire_rate,
                             image_norm=image_norm))
    torch.nn.init.normal_(model.fc2.weight, std=0.2)
    torch.nn.init.normal_(model.fc2.bias, std=0.05)
    return model.eval()


@pytest.fixture
def model() -> RNCA:
    return tiny_model()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "tiny.pt", tiny_model(), {"data": "test fixture"})


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_nifti(path: Path, array: np.ndarray, zooms=(1.0, 1.5, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.5]
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(zooms)
    img.header["descrip"] = b"rnca test"
    nib.save(img, str(path))
    return path


@pytest.fixture
def png_folders(tmp_path: Path) -> tuple[Path, Path]:
    """images/ and masks/ with three 32x32 cases (broken rings on noise)."""
    rng = np.random.default_rng(0)
    for k in range(3):
        target = ring(gap=True)
        image = (ring() * 160 + rng.integers(0, 60, (32, 32))).astype(np.uint8)
        write_png(tmp_path / "images" / f"case{k}.png", image)
        write_png(tmp_path / "masks" / f"case{k}.png", target.astype(np.uint8) * 255)
    return tmp_path / "images", tmp_path / "masks"


@pytest.fixture
def nifti_folders(tmp_path: Path) -> tuple[Path, Path]:
    """nnU-Net layout: imagesTs/vol_0000.nii.gz and masks/vol.nii.gz, 24x24x5."""
    rng = np.random.default_rng(1)
    target = np.stack([ring(24, 7, 2, gap=True)] * 5, axis=-1).astype(np.uint8)
    image = (target * 0.7 + rng.random(target.shape) * 0.3).astype(np.float32)
    write_nifti(tmp_path / "imagesTs" / "vol_0000.nii.gz", image)
    write_nifti(tmp_path / "masks" / "vol.nii.gz", target)
    return tmp_path / "imagesTs", tmp_path / "masks"
