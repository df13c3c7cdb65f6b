"""Inference on arrays, files and folders."""

from __future__ import annotations

import numpy as np
import pytest

from rnca_cli import refine as rf
from rnca_cli.errors import InputError, OutputError
from rnca_cli.io import read_mask

from conftest import ring, tiny_model, write_png


def test_refine_array_2d_is_seeded_and_in_unit_range(model):
    image, mask = np.random.rand(20, 24), ring(24)[:20].astype(np.float32)
    a = rf.refine_array(model, image, mask, steps=5, seed=1)
    b = rf.refine_array(model, image, mask, steps=5, seed=1)
    c = rf.refine_array(model, image, mask, steps=5, seed=2)
    assert a.shape == (20, 24) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_zero_steps_returns_the_initial_visible_channel(model):
    mask = ring(16).astype(np.float32)
    out = rf.refine_array(model, np.zeros((16, 16)), mask, steps=0)
    np.testing.assert_allclose(out, np.clip(mask, 0.1, 1))


def test_volume_slices_equal_2d_refinement_with_slice_seeds(model):
    volume = np.random.rand(10, 12, 3).astype(np.float32)
    mask = (np.random.rand(10, 12, 3) > 0.5).astype(np.float32)
    out = rf.refine_array(model, volume, mask, steps=4, seed=5, axis=2, batch=2)
    assert out.shape == (10, 12, 3)
    for k in range(3):
        alone = rf.refine_array(model, volume[:, :, k], mask[:, :, k], steps=4, seed=5 + k)
        np.testing.assert_allclose(out[:, :, k], alone, atol=1e-6)
    along0 = rf.refine_array(model, volume, mask, steps=4, seed=5, axis=0)
    np.testing.assert_allclose(along0[1], rf.refine_array(model, volume[1], mask[1], steps=4, seed=6), atol=1e-6)


def test_an_rgb_model_refines_a_gray_image():
    rgb_model = tiny_model(image_channels=3)
    assert rf.refine_array(rgb_model, np.random.rand(8, 8), np.ones((8, 8)), steps=2).shape == (8, 8)


def test_refine_array_refuses_bad_shapes_and_values(model):
    with pytest.raises(InputError, match="does not match"):
        rf.refine_array(model, np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        rf.refine_array(model, np.zeros((8, 8)), np.full((8, 8), 255.0))


def test_folder_batching_gives_the_same_masks_as_single_files(tmp_path, model, png_folders):
    images, masks = png_folders
    options = rf.RefineOptions(steps=6, batch=3, save_prob=True)
    jobs = rf.plan_folder(images, masks, tmp_path / "out", options).jobs
    results = rf.run_jobs(model, jobs, options)
    assert [r.case_id for r in results] == ["case0", "case1", "case2"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0.png", "case1.png", "case2.png", "prob"]
    single = rf.plan_single(images / "case1.png", masks / "case1.png", tmp_path / "one.png", options)
    rf.run_jobs(model, single, options)
    np.testing.assert_array_equal(read_mask(tmp_path / "one.png").data, read_mask(tmp_path / "out" / "case1.png").data)
    assert (tmp_path / "one_prob.png").exists() and (tmp_path / "out" / "prob" / "case1.png").exists()


def test_label_is_refined_inside_the_label_map(tmp_path):
    labels = np.zeros((24, 24), np.uint8)
    labels[ring(24, 7, 3)] = 2
    labels[:3, :3] = 5  # another structure, must survive untouched
    write_png(tmp_path / "img.png", np.zeros((24, 24), np.uint8))
    write_png(tmp_path / "lab.png", labels)
    keep_all = tiny_model(fire_rate=0.0)  # no updates: refined label 2 = its input
    options = rf.RefineOptions(steps=3, label=2)
    rf.run_jobs(keep_all, rf.plan_single(tmp_path / "img.png", tmp_path / "lab.png", tmp_path / "out.png", options), options)
    from PIL import Image

    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out.png")), labels)


def test_outputs_are_checked_before_any_work(tmp_path, png_folders):
    images, masks = png_folders
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "case2.png").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="case2.png: already exists"):
        rf.plan_folder(images, masks, tmp_path / "out", rf.RefineOptions())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case2.png"]
    with pytest.raises(OutputError, match="is the input folder .*masks; inputs are never written to, choose another --out"):
        rf.plan_folder(images, masks, masks, rf.RefineOptions(overwrite=True))
    for inside in (masks / "refined", images / "sub" / "deeper"):
        with pytest.raises(OutputError, match="is inside the input folder"):
            rf.plan_folder(images, masks, inside, rf.RefineOptions())
    with pytest.raises(OutputError, match="choose another --save-overlay"):
        rf.plan_folder(images, masks, tmp_path / "o2", rf.RefineOptions(save_overlay=images))
    with pytest.raises(OutputError, match="is an input file"):
        rf.plan_single(images / "case0.png", masks / "case0.png", masks / "case0.png", rf.RefineOptions(overwrite=True))


def test_shape_mismatch_is_found_from_headers_before_writing(tmp_path, png_folders):
    images, masks = png_folders
    write_png(masks / "case1.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match=r"case1.png: mask shape \(10, 10\) differs from image"):
        rf.plan_folder(images, masks, tmp_path / "out", rf.RefineOptions())
    assert not (tmp_path / "out").exists()


def test_single_output_into_an_existing_folder(tmp_path, model, png_folders):
    images, masks = png_folders
    (tmp_path / "dest").mkdir()
    jobs = rf.plan_single(images / "case0.png", masks / "case0.png", tmp_path / "dest", rf.RefineOptions(steps=2))
    rf.run_jobs(model, jobs, rf.RefineOptions(steps=2))
    assert (tmp_path / "dest" / "case0.png").exists()


def test_large_batches_are_split_without_changing_results(model):
    images = np.random.default_rng(0).random((5, 24, 24, 1)).astype(np.float32)
    masks = np.stack([ring(24, 7, 2)] * 5).astype(np.float32)
    whole = rf.refine_batch(model, images, masks, 4, [1, 2, 3, 4, 5], tile=1000)
    split = rf.refine_batch(model, images, masks, 4, [1, 2, 3, 4, 5], tile=50)  # 2500 px: 4 cases a pass
    np.testing.assert_allclose(whole, split, atol=1e-6)


@pytest.mark.parametrize(
    "shape, tile, batch, calls",
    [
        ((40, 40), 16, 32, 9),  # one image in 3 x 3 tiles: one call per tile
        ((10, 12), 768, 32, 1),  # one forward pass
        ((10, 12, 5), 768, 2, 3),  # a volume: slices 2 + 2 + 1 per pass
        ((40, 40, 2), 16, 2, 18),  # large slices: each of the two tiled 3 x 3
    ],
)
def test_progress_adds_up_to_the_pixels(model, shape, tile, batch, calls):
    told = []
    image, mask = np.random.rand(*shape), (np.random.rand(*shape) > 0.5).astype(np.float32)
    axis = 2 if len(shape) == 3 else None
    out = rf.refine_array(model, image, mask, steps=2, seed=3, axis=axis, batch=batch, tile=tile, progress=told.append)
    assert len(told) == calls and sum(told) == mask.size
    np.testing.assert_array_equal(out, rf.refine_array(model, image, mask, steps=2, seed=3, axis=axis, batch=batch, tile=tile))


def test_run_jobs_reports_every_pixel_of_its_jobs(tmp_path, model, png_folders):
    images, masks = png_folders
    jobs = rf.plan_folder(images, masks, tmp_path / "out", rf.RefineOptions(steps=2)).jobs
    told, cases = [], []
    rf.run_jobs(model, jobs, rf.RefineOptions(steps=2), cases.append, told.append)
    assert sum(told) == 2 * sum(job.pixels for job in jobs) == 2 * sum(read_mask(job.mask).data.size for job in jobs)
    assert [c.case_id for c in cases] == [job.case_id for job in jobs]


def test_parts_cover_the_folder_once_and_equal_one_whole_run(tmp_path, model_file):
    """--num-parts 3: each case in exactly one part, and the parts' files equal a whole run's."""
    from rnca_cli.refine import RefineOptions, refine_files

    rng = np.random.default_rng(0)
    for k in range(7):
        write_png(tmp_path / "images" / f"c{k}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        write_png(tmp_path / "masks" / f"c{k}.png", ring(32, 6 + k % 3, 2, gap=True).astype(np.uint8) * 255)
    whole = refine_files(tmp_path / "images", tmp_path / "masks", tmp_path / "whole", str(model_file),
                         RefineOptions(steps=4), "cpu")
    seen = []
    for part in range(3):
        run = refine_files(tmp_path / "images", tmp_path / "masks", tmp_path / "parts", str(model_file),
                           RefineOptions(steps=4, num_parts=3, part_id=part), "cpu")
        seen += [r.case_id for r in run.results]
    assert sorted(seen) == sorted(r.case_id for r in whole.results) and len(seen) == 7
    for k in range(7):
        assert (tmp_path / "parts" / f"c{k}.png").read_bytes() == (tmp_path / "whole" / f"c{k}.png").read_bytes()
    with pytest.raises(ValueError, match="part-id must be in 0..num-parts-1"):
        RefineOptions(num_parts=3, part_id=3)


def test_out_without_suffix_says_what_is_expected_and_an_existing_folder_works(tmp_path, png_folders, model_file):
    from rnca_cli.checkpoint import load_model

    images, masks = png_folders
    options = rf.RefineOptions(steps=2)
    with pytest.raises(OutputError, match=r"newdir: not an existing folder and no file suffix; name a file such as"):
        rf.plan_single(images / "case0.png", masks / "case0.png", tmp_path / "newdir", options)
    (tmp_path / "newdir").mkdir()
    jobs = rf.plan_single(images / "case0.png", masks / "case0.png", tmp_path / "newdir", options)
    rf.run_jobs(load_model(model_file), jobs, options)
    assert (tmp_path / "newdir" / "case0.png").exists()


def test_refine_array_takes_uint8_and_bool_data_as_users_pass_it(model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    mask = ring(16, 5, 2, gap=True)
    expected = rf.refine_array(model, image / 255.0, mask.astype(np.float32), steps=3)
    for given in (mask, mask.astype(np.uint8) * 255, mask.astype(np.uint8)):  # bool, 0/255, 0/1
        np.testing.assert_array_equal(rf.refine_array(model, image, given, steps=3), expected)
    sixteen = (image.astype(np.uint16) * 257)
    np.testing.assert_allclose(rf.refine_array(model, sixteen, mask, steps=3), expected, atol=1e-6)


@pytest.mark.parametrize("image, mask, message", [
    (np.full((8, 8), np.nan), np.zeros((8, 8)), "image: holds NaN"),
    (np.zeros((8, 8)), np.full((8, 8), np.inf), "mask: holds NaN or infinite"),
    (np.full((8, 8), 255.0), np.zeros((8, 8)), r"image: values must lie in \[0, 1\] \(found 255..255\); pass uint8"),
    (np.zeros((8, 8), np.int32) - 1, np.zeros((8, 8)), r"image: values must lie in \[0, 1\]"),
    (np.zeros((8, 8), "U1"), np.zeros((8, 8)), "not a number type"),
])
def test_refine_array_refuses_data_out_of_range_with_its_name(model, image, mask, message):
    with pytest.raises(InputError, match=message):
        rf.refine_array(model, image, mask)


def test_a_stack_of_2d_images_is_never_a_volume_by_accident(model):
    rng = np.random.default_rng(1)
    images = rng.random((3, 16, 16)).astype(np.float32)
    masks = np.stack([ring(16, 5, 2, gap=True)] * 3)
    with pytest.raises(InputError, match="pass axis= to refine a volume slice by slice, or refine_images"):
        rf.refine_array(model, images, masks)
    stacked = rf.refine_images(model, images, masks, steps=3, seed=4)
    for k in range(3):
        np.testing.assert_allclose(stacked[k], rf.refine_array(model, images[k], masks[k], steps=3, seed=4), atol=1e-5)
    with pytest.raises(InputError, match=r"expected \(N, H, W\[, C\]\)"):
        rf.refine_images(model, images[0], masks[0])
