"""The bad-input matrix: every command, every kind of bad input or option.

Each case asserts the exit code (1 bad input, 2 bad option), one line that names the file exactly
as it was given, no traceback, and that nothing was created or changed on disk.
"""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rnca_cli.checkpoint import save_checkpoint
from rnca_cli.cli import app

from conftest import ring, tiny_model, write_nifti, write_png
from test_io import png_claiming


def rnca(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def setup(tmp: Path) -> None:
    """Good inputs the cases start from: 2D pairs in img/ and msk/, NIfTI pairs in vimg/ and vmsk/, a model."""
    rng = np.random.default_rng(0)
    for k in range(2):
        write_png(tmp / "img" / f"c{k}.png", (ring() * 160 + rng.integers(0, 60, (32, 32))).astype(np.uint8))
        write_png(tmp / "msk" / f"c{k}.png", ring(gap=True).astype(np.uint8) * 255)
    volume = np.zeros((12, 12, 3), np.float32)
    volume[3:9, 3:9] = 1
    write_nifti(tmp / "vimg" / "v.nii.gz", volume * 0.5)
    write_nifti(tmp / "vmsk" / "v.nii.gz", volume)
    save_checkpoint(tmp / "model.pt", tiny_model())


def corrupt(tmp: Path, case: str) -> None:
    """Make the input of ``case`` bad (see CASES)."""
    msk, vmsk = tmp / "msk" / "c0.png", tmp / "vmsk" / "v.nii.gz"
    if case == "zero-byte png":
        msk.write_bytes(b"")
    elif case == "truncated png":
        msk.write_bytes(msk.read_bytes()[:60])
    elif case == "text named png":
        msk.write_text("this is not an image\n")
    elif case == "shape mismatch":
        write_png(msk, np.zeros((8, 8), np.uint8))
    elif case == "multi-label mask":
        labels = np.zeros((32, 32), np.uint8)
        labels[4:10, 4:10], labels[20:28, 20:28] = 1, 2
        write_png(msk, labels)
    elif case == "4D nifti":
        nib.save(nib.Nifti1Image(np.zeros((12, 12, 3, 2), np.float32), np.eye(4)), str(vmsk))
    elif case == "nan nifti":
        data = np.zeros((12, 12, 3), np.float32)
        data[0, 0, 0] = np.nan
        write_nifti(vmsk, data)
    elif case == "truncated nifti":
        vmsk.write_bytes(gzip.compress(gzip.decompress(vmsk.read_bytes())[:200]))
    elif case == "spacing mismatch":
        write_nifti(vmsk, np.asanyarray(nib.load(str(vmsk)).dataobj).astype(np.float32), zooms=(2.0, 2.0, 2.0))
    elif case == "empty folder":
        (tmp / "empty").mkdir()
    elif case == "decompression bomb":
        png_claiming(msk, 30000, 30000)  # a header claiming 900 Mpx
    elif case == "output blocked":
        (tmp / "blocker").write_text("a file where a folder must go")
    elif case == "nan checkpoint":
        model = tiny_model()
        with torch.no_grad():
            model.fc2.weight[0, 0] = float("nan")
        torch.save({**torch.load(tmp / "model.pt", weights_only=True),
                    "state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "weights_sha256": None},
                   tmp / "model.pt")
    elif case == "flipped checkpoint":
        raw = bytearray((tmp / "model.pt").read_bytes())
        with zipfile.ZipFile(tmp / "model.pt") as z:
            info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor's bytes
            start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        for k in range(64):
            raw[start + 8 + k] ^= 0xFF
        (tmp / "model.pt").write_bytes(bytes(raw))


# (case id, corruption, command line ({t}: the test folder, as given), exit code, message (the path as given))
CASES = [
    ("refine: missing image", None, "refine -i {t}/img/nope.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt", 1, "{t}/img/nope.png: no such file"),
    ("refine: empty folder", "empty folder", "refine -i {t}/img -m {t}/empty -o {t}/o --model {t}/model.pt", 1, "{t}/img: no image has a mask"),
    ("refine: zero-byte png", "zero-byte png", "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt", 1, "{t}/msk/c0.png:"),
    ("refine: truncated png", "truncated png", "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt", 1, "{t}/msk/c0.png:"),
    ("refine: text named .png", "text named png", "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt", 1, "{t}/msk/c0.png:"),
    ("refine: shape mismatch", "shape mismatch", "refine -i {t}/img -m {t}/msk -o {t}/o --model {t}/model.pt", 1, "{t}/msk/c0.png: mask shape (8, 8) differs"),
    ("refine: multi-label", "multi-label mask", "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt", 1, "{t}/msk/c0.png: mask holds several labels"),
    ("refine: 4D nifti", "4D nifti", "refine -i {t}/vimg/v.nii.gz -m {t}/vmsk/v.nii.gz -o {t}/o.nii.gz --model {t}/model.pt", 1, "{t}/vmsk/v.nii.gz:"),
    ("refine: nan nifti", "nan nifti", "refine -i {t}/vimg/v.nii.gz -m {t}/vmsk/v.nii.gz -o {t}/o.nii.gz --model {t}/model.pt", 1, "{t}/vmsk/v.nii.gz:"),
    ("refine: truncated nifti", "truncated nifti", "refine -i {t}/vimg/v.nii.gz -m {t}/vmsk/v.nii.gz -o {t}/o.nii.gz --model {t}/model.pt", 1, "{t}/vmsk/v.nii.gz:"),
    ("refine: spacing mismatch", "spacing mismatch", "refine -i {t}/vimg -m {t}/vmsk -o {t}/o --model {t}/model.pt", 1, "{t}/vmsk/v.nii.gz: mask spacing"),
    ("refine: bomb", "decompression bomb", "refine -i {t}/img -m {t}/msk -o {t}/o --model {t}/model.pt", 1, "{t}/msk/c0.png:"),
    ("refine: output blocked", "output blocked", "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/blocker/o.png --model {t}/model.pt", 1, "{t}/blocker"),
    ("refine: nan checkpoint", "nan checkpoint", "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt", 1, "{t}/model.pt: refused: weight"),
    ("refine: flipped checkpoint", "flipped checkpoint", "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt", 1, "{t}/model.pt:"),
    ("refine: seed 2^63", None, "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt --seed 9223372036854775808", 2, "seed must be in 0..2^62-1"),
    ("refine: bad device", None, "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt --device tpu", 2, "--device tpu"),
    ("refine: guard limit nan", None, "refine -i {t}/img/c0.png -m {t}/msk/c0.png -o {t}/o.png --model {t}/model.pt --guard-change nan", 2, "guard-change must be > 0"),
    ("refine: out inside the mask folder", None, "refine -i {t}/img -m {t}/msk -o {t}/msk/refined --model {t}/model.pt", 1, "{t}/msk/refined: is inside the input folder {t}/msk"),
    ("evaluate: missing pred", None, "evaluate --pred {t}/nope --gt {t}/msk", 1, "{t}/nope: no such file or folder"),
    ("evaluate: truncated png", "truncated png", "evaluate --pred {t}/msk --gt {t}/msk -o {t}/m.csv", 1, "{t}/msk/c0.png:"),
    ("evaluate: bomb", "decompression bomb", "evaluate --pred {t}/msk --gt {t}/msk -o {t}/m.csv", 1, "{t}/msk/c0.png:"),
    ("evaluate: spacing mismatch", "spacing mismatch", "evaluate --pred {t}/vmsk --gt {t}/vimg -o {t}/m.csv", 1, "{t}/vmsk/v.nii.gz: spacing"),
    ("evaluate: threshold nan", None, "evaluate --pred {t}/msk --gt {t}/msk --fail-under dice=nan", 2, "a threshold must be a finite number"),
    ("evaluate: threshold not computed", None, "evaluate --pred {t}/msk --gt {t}/msk --metrics dice --fail-under hd95=3", 2, "threshold on hd95: not computed"),
    ("evaluate: out onto ground truth", None, "evaluate --pred {t}/msk --gt {t}/img -o {t}/img/c0.png --overwrite", 1, "{t}/img/c0.png: is an input"),
    ("evaluate: out and json one file", None, "evaluate --pred {t}/msk --gt {t}/msk -o {t}/m.csv --json {t}/m.csv", 2, "{t}/m.csv: --out and --json would write the same file"),
    ("perturb: out is the labels folder", None, "perturb --labels {t}/msk --out {t}/msk", 1, "{t}/msk: is the input folder {t}/msk"),
    ("perturb: empty folder", "empty folder", "perturb --labels {t}/empty --out {t}/o", 1, "{t}/empty: no label files"),
    ("perturb: negative seed", None, "perturb --labels {t}/msk --out {t}/o --seed -1", 2, "seed must be in 0..2^62-1"),
    ("perturb: bomb", "decompression bomb", "perturb --labels {t}/msk --out {t}/o", 1, "{t}/msk/c0.png:"),
    ("perturb: multi-label", "multi-label mask", "perturb --labels {t}/msk --out {t}/o", 1, "{t}/msk/c0.png:"),
    ("train: run folder inside the images", None, "train --images {t}/img --labels {t}/msk --states {t}/msk -o {t}/img/run", 1, "{t}/img/run: is inside the input folder {t}/img"),
    ("train: bomb", "decompression bomb", "train --images {t}/img --labels {t}/msk --states {t}/msk -o {t}/run --iterations 1", 1, "{t}/msk/c0.png:"),
    ("train: empty folder", "empty folder", "train --images {t}/empty --labels {t}/msk --states {t}/msk -o {t}/run", 1, "{t}/empty"),
    ("train: seed 2^63", None, "train --images {t}/img --labels {t}/msk --states {t}/msk -o {t}/run --seed 9223372036854775808", 2, "seed must be in 0..2^62-1"),
    ("train: patch too large", None, "train --images {t}/img --labels {t}/msk --states {t}/msk -o {t}/run --patch 100000", 2, "GiB"),
    ("synth: size too large", None, "synth --kind rings --n 2 --size 100000 -o {t}/o", 2, "GiB"),
    ("synth: negative seed", None, "synth --kind rings --n 2 -o {t}/o --seed -1", 2, "seed must be in 0..2^62-1"),
]


@pytest.mark.parametrize("case, corruption, command, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(tmp_path, case, corruption, command, code, message):
    setup(tmp_path)
    if corruption:
        corrupt(tmp_path, corruption)
    before = tree(tmp_path)
    result = rnca(*command.format(t=tmp_path).split())
    assert result.exit_code == code, result.output
    assert message.format(t=tmp_path) in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert tree(tmp_path) == before  # nothing created, nothing changed
