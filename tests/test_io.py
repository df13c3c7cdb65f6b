"""Reading, writing and pairing files (rnca_cli.io)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from rnca_cli import io
from rnca_cli.errors import InputError, OutputError

from conftest import write_nifti, write_png

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".bmp", ".gif"])
def test_gray_8bit_image_round_trips_exactly(tmp_path, suffix):
    data = RNG.integers(0, 256, (9, 7), dtype=np.uint8)
    path = tmp_path / f"a{suffix}"
    Image.fromarray(data).save(path)
    loaded = io.read_image(path)
    assert loaded.data.dtype == np.float32 and loaded.data.shape == (9, 7, 1)
    np.testing.assert_array_equal(np.round(loaded.data[..., 0] * 255).astype(np.uint8), data)


def test_jpeg_image_is_read_approximately(tmp_path):
    data = np.full((16, 16), 120, np.uint8)
    Image.fromarray(data).save(tmp_path / "a.jpg", quality=95)
    loaded = io.read_image(tmp_path / "a.jpg")
    assert abs(float(loaded.data.mean()) - 120 / 255) < 0.01


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_image_scales_by_65535(tmp_path, suffix):
    data = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / f"a{suffix}")
    loaded = io.read_image(tmp_path / f"a{suffix}")
    np.testing.assert_allclose(loaded.data[..., 0], data / 65535, atol=1e-6)


def test_rgb_and_rgba_images(tmp_path):
    rgb = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a, b = io.read_image(tmp_path / "rgb.png"), io.read_image(tmp_path / "rgba.png")
    assert a.data.shape == b.data.shape == (5, 6, 3)  # alpha dropped
    np.testing.assert_allclose(a.data, rgb / 255, atol=1e-6)
    np.testing.assert_array_equal(a.data, b.data)


def test_binary_masks_with_any_foreground_value(tmp_path):
    for value in (1, 255, 37):
        write_png(tmp_path / f"m{value}.png", np.array([[0, value], [value, 0]], np.uint8))
        np.testing.assert_array_equal(io.read_mask(tmp_path / f"m{value}.png").data, [[0, 1], [1, 0]])


def test_soft_8bit_mask_reads_as_probability(tmp_path):
    soft = np.array([[0, 64, 128], [192, 255, 10]], np.uint8)
    write_png(tmp_path / "soft.png", soft)
    np.testing.assert_allclose(io.read_mask(tmp_path / "soft.png").data, soft / 255, atol=1e-6)


def test_label_map_needs_label(tmp_path):
    labels = np.array([[0, 1, 2], [3, 0, 2]], np.uint8)
    write_png(tmp_path / "labels.png", labels)
    with pytest.raises(InputError, match=r"labels.png: mask holds several labels .*--label"):
        io.read_mask(tmp_path / "labels.png")
    picked = io.read_mask(tmp_path / "labels.png", label=2)
    np.testing.assert_array_equal(picked.data, labels == 2)
    with pytest.raises(InputError, match="label 9 does not occur"):
        io.read_mask(tmp_path / "labels.png", label=9)


def test_float_nifti_mask_outside_unit_range_is_refused(tmp_path):
    write_nifti(tmp_path / "m.nii.gz", np.array([[[0.0, 0.5, 1.7]]], np.float32))
    with pytest.raises(InputError, match=r"m.nii.gz: soft mask values must lie in \[0, 1\]"):
        io.read_mask(tmp_path / "m.nii.gz")


def test_nan_in_nifti_is_refused(tmp_path):
    write_nifti(tmp_path / "m.nii", np.array([[[0.0, np.nan, 1.0]]], np.float32))
    with pytest.raises(InputError, match="NaN"):
        io.read_mask(tmp_path / "m.nii")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_mask_round_trip_keeps_affine_and_header(tmp_path, suffix):
    data = (RNG.random((6, 5, 4)) > 0.5).astype(np.uint8)
    src = write_nifti(tmp_path / f"in{suffix}", data, zooms=(0.8, 0.9, 3.0))
    loaded = io.read_mask(src)
    out = io.write_mask(tmp_path / f"out{suffix}", loaded.data > 0, loaded)
    back = nib.load(str(out))
    original = nib.load(str(src))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, original.affine)
    for field in ("pixdim", "qform_code", "sform_code", "descrip", "dim", "xyzt_units"):
        np.testing.assert_array_equal(back.header[field], original.header[field])
    assert io.read_mask(out).spacing == pytest.approx((0.8, 0.9, 3.0))


def test_soft_nifti_written_as_float32(tmp_path):
    src = write_nifti(tmp_path / "in.nii.gz", np.zeros((3, 3, 2), np.uint8))
    prob = np.linspace(0, 1, 18, dtype=np.float32).reshape(3, 3, 2)
    out = io.write_mask(tmp_path / "p.nii.gz", prob, io.read_mask(src), soft=True)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(back.dataobj), prob)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_binary_and_soft_2d_masks_round_trip(tmp_path, suffix):
    mask = RNG.random((8, 9)) > 0.5
    write_png(tmp_path / "ref.png", mask.astype(np.uint8) * 255)
    ref = io.read_mask(tmp_path / "ref.png")
    io.write_mask(tmp_path / f"b{suffix}", mask, ref)
    stored = np.array(Image.open(tmp_path / f"b{suffix}"))
    assert stored.dtype == np.uint8 and set(np.unique(stored)) <= {0, 255}
    np.testing.assert_array_equal(io.read_mask(tmp_path / f"b{suffix}").data, mask)
    prob = RNG.random((8, 9)).astype(np.float32)
    io.write_mask(tmp_path / f"s{suffix}", prob, ref, soft=True)
    np.testing.assert_allclose(io.read_mask(tmp_path / f"s{suffix}").data, prob, atol=0.5 / 255 + 1e-6)


def test_lossy_mask_output_is_refused(tmp_path):
    write_png(tmp_path / "ref.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(OutputError, match="only as PNG or TIFF"):
        io.write_mask(tmp_path / "out.jpg", np.zeros((4, 4), bool), io.read_mask(tmp_path / "ref.png"))
    assert not (tmp_path / "out.jpg").exists()


def test_case_ids_treat_nii_gz_as_one_suffix():
    assert io.case_id("a/b/liver_003.nii.gz") == "liver_003"
    assert io.case_id("x.v2.png") == "x.v2"
    assert io.suffix_of("A.NII.GZ") == ".nii.gz"


def test_pairing_by_case_id_reports_unmatched(tmp_path):
    for name in ("a.png", "b.png", "c.nii.gz", "only_image.png"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).write_bytes(b"")
    for name in ("a.png", "b.tif", "c.nii.gz", "only_mask.png", ".hidden.png", "notes.txt"):
        (tmp_path / "msk").mkdir(exist_ok=True)
        (tmp_path / "msk" / name).write_bytes(b"")
    pairing = io.pair_folders(tmp_path / "img", tmp_path / "msk")
    assert [(c.case_id, [p.name for p in c.images], c.mask.name) for c in pairing.cases] == [
        ("a", ["a.png"], "a.png"), ("b", ["b.png"], "b.tif"), ("c", ["c.nii.gz"], "c.nii.gz"),
    ]
    assert [p.name for p in pairing.unmatched_images] == ["only_image.png"]
    assert [p.name for p in pairing.unmatched_masks] == ["only_mask.png"]


def test_pairing_nnunet_channels(tmp_path):
    for name in ("liver_001_0000.nii.gz", "liver_001_0001.nii.gz", "liver_002_0000.nii.gz"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).write_bytes(b"")
    (tmp_path / "msk").mkdir()
    (tmp_path / "msk" / "liver_001.nii.gz").write_bytes(b"")
    pairing = io.pair_folders(tmp_path / "img", tmp_path / "msk")
    assert len(pairing.cases) == 1
    assert [p.name for p in pairing.cases[0].images] == ["liver_001_0000.nii.gz", "liver_001_0001.nii.gz"]
    assert [p.name for p in pairing.unmatched_images] == ["liver_002_0000.nii.gz"]


def test_nnunet_channels_stack(tmp_path):
    a = write_nifti(tmp_path / "v_0000.nii.gz", np.zeros((4, 4, 2), np.float32))
    b = write_nifti(tmp_path / "v_0001.nii.gz", np.ones((4, 4, 2), np.float32))
    assert io.read_images([a, b]).data.shape == (4, 4, 2, 2)


def test_atomic_write_interrupted_leaves_no_file(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.png", None, "no such file"),
        ("broken.png", b"not a png", "cannot read image"),
        ("broken.nii.gz", b"garbage", "cannot read NIfTI"),
        ("table.csv", b"a,b", "unsupported file type"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        io.read_image(path)
    assert str(path) in str(info.value)


def test_atomic_write_os_error_names_the_target_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.atomic.os, "replace", full_disk)
    with pytest.raises(OutputError, match="No space left on device") as info:
        with io.atomic_path(target) as tmp:
            tmp.write_text("new")
    assert str(target) in str(info.value)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_where_no_file_can_be_made(tmp_path, monkeypatch):
    def refused(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.atomic.tempfile, "mkstemp", refused)
    with pytest.raises(OutputError, match=r"out\.png: cannot write in .*Permission denied"):
        with io.atomic_path(tmp_path / "out.png"):
            pass


def test_make_folder_with_a_file_in_the_way(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(OutputError, match="cannot create the folder") as info:
        io.make_folder(tmp_path / "taken" / "sub")
    assert str(tmp_path / "taken" / "sub") in str(info.value)
    assert io.make_folder(tmp_path / "a" / "b").is_dir()


def test_atomic_write_gives_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with io.atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name, fmt, volume, writable", [
    ("a.nii.gz", "NIfTI", True, True), ("A.NII", "NIfTI", True, True), ("a.png", "PNG", False, True),
    ("a.tiff", "TIFF", False, True), ("a.tif", "TIFF", False, True), ("a.jpg", "2D image (read only)", False, False),
    ("a.gif", "2D image (read only)", False, False),
])
def test_the_suffix_registry_picks_each_format(name, fmt, volume, writable):
    found = io.format_of(name)
    assert (found.name, found.volume, found.write is not None) == (fmt, volume, writable)
    assert io.case_id(name) == name.split(".")[0]


def test_a_new_format_is_one_registration(tmp_path, monkeypatch):
    """A format registered by suffix is read, paired and written like the built-in ones."""
    def read(path):
        return np.load(path), {}

    def write(path, data, meta):
        with open(path, "wb") as f:  # np.save would add ".npy" to the temporary name
            np.save(f, data)

    npy = io.Format("NumPy", (".npy",), False, read, lambda p: np.load(p, mmap_mode="r").shape[:2], write)
    monkeypatch.setattr(io.formats, "FORMATS", dict(io.FORMATS))
    io.register(npy)
    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:4] = 1
    np.save(tmp_path / "case.npy", mask)
    loaded = io.read_mask(tmp_path / "case.npy")
    assert io.peek_shape(tmp_path / "case.npy") == (5, 6) and loaded.data.sum() == 4
    assert io.list_files(tmp_path) == [tmp_path / "case.npy"]
    io.write_mask(tmp_path / "out.npy", loaded.data > 0, loaded)
    assert np.array_equal(np.load(tmp_path / "out.npy"), mask * 255)


def png_claiming(path, width: int, height: int):
    """A tiny PNG file whose header claims width x height gray pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("read", [io.read_mask, io.read_image, io.peek_shape])
def test_a_decompression_bomb_is_one_input_error(tmp_path, read):
    bomb = png_claiming(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(InputError, match="bomb.png: refused as a decompression bomb"):
        read(bomb)


def test_a_large_image_opens_without_warning_lines(tmp_path):
    import warnings

    big = png_claiming(tmp_path / "big.png", 12000, 12000)  # above Pillow's warning limit, below its error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert io.peek_shape(big) == (12000, 12000)
