"""What a model sees of an image (rnca_cli.preprocess), and that refine and train agree on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnca_cli import io
from rnca_cli import train as tr
from rnca_cli.errors import InputError, UsageError
from rnca_cli.inference import rollout
from rnca_cli.model import ModelConfig
from rnca_cli.preprocess import SD_FLOOR, match_channels, normalise
from rnca_cli.refine import refine_array, refine_images

from conftest import ring, tiny_model, write_nifti, write_png


def faint_line(contrast: float, size: int = 96, level: float = 0.6) -> np.ndarray:
    """(size, size, 1): a 2 px dark vertical line of the given contrast on a flat background."""
    image = np.full((size, size, 1), level, np.float32)
    image[:, size // 2 : size // 2 + 2] -= contrast
    return image


def test_gray_rgb_channel_matching():
    rgb = np.random.rand(6, 6, 3).astype(np.float32)
    gray = match_channels(rgb, 1)
    np.testing.assert_allclose(gray[..., 0], rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    np.testing.assert_array_equal(match_channels(gray, 3)[..., 2], gray[..., 0])
    with pytest.raises(InputError, match="two.png: image has 2 channel"):
        match_channels(np.zeros((4, 4, 2)), 3, "two.png")


@pytest.mark.parametrize("level", [0.0, 0.3, 1.0])
def test_a_flat_image_is_mid_grey(level):
    np.testing.assert_allclose(normalise(np.full((20, 30, 2), level, np.float32), 5.0), 0.5, atol=1e-6)


def test_sigma_zero_is_the_image_as_given():
    image = np.random.rand(5, 7, 3).astype(np.float32)
    assert normalise(image, 0.0) is image


@pytest.mark.parametrize("contrast", [0.02, 0.04, 0.3])
def test_a_faint_line_stands_out_whatever_its_contrast(contrast):
    out = normalise(faint_line(contrast), 6.0)
    line, background = out[48, 48, 0], out[48, 5, 0]
    assert background == pytest.approx(0.5, abs=1e-3)  # far from the line: the local mean
    # A raw dip of 0.02..0.3 (15x apart) becomes one of 0.24..0.44 (2x apart).
    assert 0.2 < background - line < 0.45


def test_the_floor_keeps_noise_below_it_faint():
    noise = np.random.default_rng(0).normal(0.5, SD_FLOOR / 10, (40, 40, 1)).astype(np.float32)
    assert normalise(noise, 5.0).std() < 0.03  # unfloored, any noise would come out with SD 1/6


def test_brightness_and_gain_do_not_matter():
    image = faint_line(0.2)
    np.testing.assert_allclose(normalise(0.5 * image + 0.3, 6.0), normalise(image, 6.0), atol=0.02)


def test_a_batch_is_normalised_image_by_image():
    images = np.random.default_rng(1).random((3, 16, 20, 2)).astype(np.float32)
    batch = normalise(images, 4.0)
    for k in range(3):
        np.testing.assert_allclose(batch[k], normalise(images[k], 4.0), atol=1e-6)


def test_refine_shows_the_model_the_normalised_whole_image():
    model = tiny_model(image_norm=4.0)
    rng = np.random.default_rng(2)
    image = rng.random((40, 36)).astype(np.float32)
    mask = (rng.random((40, 36)) > 0.5).astype(np.float32)
    whole = refine_array(model, image, mask, steps=3, seed=7)
    tiled = refine_array(model, image, mask, steps=3, seed=7, tile=16)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)  # normalised before tiling: exact
    seen = torch.from_numpy(normalise(image[..., None], 4.0)).permute(2, 0, 1)[None]
    direct = rollout(model, seen, torch.from_numpy(mask)[None], 3, torch.tensor([7]))[0].numpy()
    np.testing.assert_allclose(whole, direct, atol=1e-5)
    plain = tiny_model(image_norm=0.0)
    assert not np.allclose(refine_array(plain, image, mask, steps=3, seed=7), whole, atol=1e-3)


def test_a_case_refines_the_same_alone_and_in_a_batch():
    model = tiny_model(image_norm=3.0)
    rng = np.random.default_rng(3)
    images = rng.random((3, 24, 24)).astype(np.float32)
    masks = (rng.random((3, 24, 24)) > 0.5).astype(np.float32)
    batch = refine_images(model, images, masks, steps=3, seed=1)
    np.testing.assert_allclose(batch[1], refine_array(model, images[1], masks[1], steps=3, seed=1), atol=1e-5)


def test_training_windows_are_cut_from_normalised_images(tmp_path):
    rng = np.random.default_rng(0)
    target = ring(40, radius=10, width=3)
    image = np.clip(target * 20 + rng.normal(100, 5, target.shape), 0, 255).astype(np.uint8)
    write_png(tmp_path / "i" / "a.png", image)
    write_png(tmp_path / "l" / "a.png", target.astype(np.uint8) * 255)
    config = tr.TrainConfig(patch=40, perturb="breaks:1")
    data = tr.load_dataset(tmp_path / "i", tmp_path / "l", None, config, image_norm=5.0)
    expected = normalise(image[..., None].astype(np.float32) / 255, 5.0)
    np.testing.assert_allclose(data.train.images[0, 0].numpy(), expected[..., 0], atol=1e-6)
    assert "normalised (sigma 5)" in data.description
    with pytest.raises(UsageError, match="image_norm"):  # a model that would see other images
        tr.train(data, tmp_path / "run", config, ModelConfig(channels=4, hidden=8))


def test_image_norm_must_not_be_negative():
    with pytest.raises(UsageError, match="image_norm"):
        ModelConfig(image_norm=-1.0)
    assert ModelConfig.from_dict({"channels": 4}).image_norm == 0.0  # checkpoints from before it existed


def test_each_slice_of_a_training_volume_is_normalised_whole(tmp_path):
    rng = np.random.default_rng(4)
    target = np.stack([ring(32, radius=8, width=3)] * 3, axis=2).astype(np.uint8)  # (32, 32, 3), slices on axis 2
    volume = (0.3 + 0.2 * target + rng.normal(0, 0.05, target.shape)).clip(0, 1).astype(np.float32)
    write_nifti(tmp_path / "i" / "v.nii.gz", volume)
    write_nifti(tmp_path / "l" / "v.nii.gz", target)
    data = tr.load_dataset(tmp_path / "i", tmp_path / "l", None, tr.TrainConfig(patch=32, perturb="breaks:1"),
                           image_norm=4.0)
    read = io.read_images([tmp_path / "i" / "v.nii.gz"]).data  # (32, 32, 3, 1), as training reads it
    seen = data.train.images[:, 0].numpy()  # one window per slice
    for k in range(3):
        np.testing.assert_allclose(seen[k], normalise(read[:, :, k], 4.0)[..., 0], atol=1e-5)
