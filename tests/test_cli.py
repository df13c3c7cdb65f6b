"""The rnca command line, end to end through Typer's runner."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rnca_cli.cli import app

from conftest import requires_cuda, ring, write_png
from test_train import make_folders

runner = CliRunner()


def rnca(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    result = rnca("--help")
    assert result.exit_code == 0
    for command in ("train", "refine"):
        assert command in result.output
    assert rnca("refine", "--help").exit_code == 0


def test_refine_one_png(tmp_path, png_folders, model_file):
    images, masks = png_folders
    out = tmp_path / "refined.png"
    result = rnca("refine", "--image", images / "case0.png", "--mask", masks / "case0.png", "--out", out,
                  "--model", model_file, "--steps", 4, "--save-prob")
    assert result.exit_code == 0, result.output
    written = np.array(Image.open(out))
    assert written.shape == (32, 32) and written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
    assert (tmp_path / "refined_prob.png").exists()
    assert "refined 1 case" in result.output


def test_refine_shows_progress_for_one_large_case_only(tmp_path, png_folders, model_file):
    """A case refined in several passes (here 2 x 2 tiles) gets a progress bar; a case refined in one does not."""
    images, masks = png_folders
    args = ["refine", "--image", images / "case0.png", "--mask", masks / "case0.png", "--model", model_file,
            "--steps", 2]
    tiled = rnca(*args, "--out", tmp_path / "tiled.png", "--tile", 16)
    assert tiled.exit_code == 0, tiled.output
    assert "refining" in tiled.output and "100%" in tiled.output and "1/1 case0" in tiled.output
    whole = rnca(*args, "--out", tmp_path / "whole.png")
    assert whole.exit_code == 0 and "refining" not in whole.output and "refined 1 case" in whole.output


def test_refine_default_output_goes_beside_the_mask(png_folders, model_file):
    images, masks = png_folders
    result = rnca("refine", "--image", images / "case0.png", "--mask", masks / "case0.png", "--model", model_file,
                  "--steps", 2, "-q")
    assert result.exit_code == 0, result.output
    assert (masks / "case0_refined.png").exists() and result.output == ""


def test_refine_png_folder(tmp_path, png_folders, model_file):
    images, masks = png_folders
    (images / "extra.png").write_bytes((images / "case0.png").read_bytes())
    result = rnca("refine", "--image", images, "--mask", masks, "--out", tmp_path / "out", "--model", model_file,
                  "--steps", 3)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0.png", "case1.png", "case2.png", "refine.csv"]
    assert "unmatched image, skipped" in result.output and "extra.png" in result.output


def test_refine_nifti_folder_keeps_geometry(tmp_path, nifti_folders, model_file):
    images, masks = nifti_folders
    result = rnca("refine", "--image", images, "--mask", masks, "--out", tmp_path / "out", "--model", model_file,
                  "--steps", 3, "--axis", 2)
    assert result.exit_code == 0, result.output
    out = nib.load(str(tmp_path / "out" / "vol.nii.gz"))
    src = nib.load(str(masks / "vol.nii.gz"))
    assert out.shape == src.shape == (24, 24, 5) and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, src.affine)
    assert out.header.get_zooms() == src.header.get_zooms()


def test_existing_output_needs_overwrite(tmp_path, png_folders, model_file):
    images, masks = png_folders
    out = tmp_path / "r.png"
    out.write_bytes(b"precious")
    args = ["refine", "--image", images / "case0.png", "--mask", masks / "case0.png", "--out", out,
            "--model", model_file, "--steps", 2]
    result = rnca(*args)
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    assert out.read_bytes() == b"precious"
    assert rnca(*args, "--overwrite").exit_code == 0
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize(
    "case",
    ["missing_image", "shape_mismatch", "unreadable", "no_pairs", "bad_model", "bad_device", "bad_option",
     "bad_precision", "out_blocked"],
)
def test_bad_input_gives_one_line_and_its_exit_code(tmp_path, png_folders, model_file, case):
    """Bad data exits 1, a bad option value (device, precision, threshold) 2: the exit-code table."""
    images, masks = png_folders
    image, mask, model, extra = images / "case0.png", masks / "case0.png", model_file, []
    out = tmp_path / "out.png"
    if case == "missing_image":
        image, expected = images / "nope.png", "nope.png: no such file"
    elif case == "shape_mismatch":
        write_png(masks / "case0.png", np.zeros((8, 8), np.uint8))
        expected = "case0.png: mask shape (8, 8) differs"
    elif case == "unreadable":
        (masks / "case0.png").write_bytes(b"junk")
        expected = "case0.png: cannot read"
    elif case == "no_pairs":
        (tmp_path / "empty").mkdir()
        image, mask, out, expected = images, tmp_path / "empty", tmp_path / "o", "no image has a mask"
    elif case == "bad_model":
        model, expected = tmp_path / "nothing.pt", "nothing.pt: no such model file"
    elif case == "bad_device":
        extra, expected = ["--device", "tpu"], "--device tpu"
    elif case == "bad_precision":
        extra, expected = ["--precision", "fp64"], "precision must be one of fp32, bf16, fp16, not 'fp64'"
    elif case == "out_blocked":  # the output folder cannot be made: a file is in the way
        (tmp_path / "taken").write_text("")
        out, expected = tmp_path / "taken" / "out.png", "taken: cannot create the folder"
    else:
        extra, expected = ["--threshold", "0"], "threshold must be in (0, 1]"
    result = rnca("refine", "--image", image, "--mask", mask, "--out", out, "--model", model, "--steps", 2, *extra)
    assert result.exit_code == (2 if case in ("bad_device", "bad_precision", "bad_option") else 1), result.output
    assert expected in result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["perturb", "--labels", "{tmp}/nope", "--out", "{tmp}/o"], "{tmp}/nope: no such folder"),
        (["perturb", "--labels", "{tmp}/file.png", "--out", "{tmp}/o"], "{tmp}/file.png: a file, not a folder"),
        (["synth", "--kind", "foo", "--n", "2", "--out", "{tmp}/o"], "unknown kind 'foo'; valid: vessels, rings, blobs"),
        (["evaluate", "--pred", "{tmp}/nope", "--gt", "{tmp}"], "{tmp}/nope: no such file or folder"),
    ],
)
def test_commands_with_a_progress_bar_fail_with_only_the_error_line(tmp_path, args, message):
    """The progress bar a command started is removed when it fails: the error is all that is printed."""
    (tmp_path / "file.png").write_bytes(b"")
    result = rnca(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == (2 if "unknown kind" in message else 1)
    assert result.output == f"error: {message.format(tmp=tmp_path)}\n"


def test_commands_without_tensors_start_without_pytorch(tmp_path):
    """``--help``, ``synth``, ``perturb`` and ``evaluate`` never import PyTorch: about 2 s of start-up
    each on a 2-core machine (``rnca --help`` 2.6 -> 0.3 s)."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom rnca_cli.cli import app\n"
        "result = CliRunner().invoke(app, sys.argv[1:])\nassert result.exit_code == 0, result.output\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    data = tmp_path / "data"
    for args in (
        ["--help"],
        ["synth", "--kind", "rings", "--n", "2", "--size", "32", "--out", data, "-q"],
        ["perturb", "--labels", data / "labels", "--out", tmp_path / "coarse", "-q"],
        ["evaluate", "--pred", data / "states", "--gt", data / "labels", "-q"],
    ):
        run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1] == "no torch", args


def test_train_then_refine_with_the_checkpoint(tmp_path):
    images, labels, states = make_folders(tmp_path, n=6)
    run = tmp_path / "run"
    result = rnca("train", "--images", images, "--labels", labels, "--states", states, "--out", run,
                  "--iterations", 4, "--pool", 8, "--batch", 2, "--replace", 1, "--steps", 6, "--min-step", 3,
                  "--patch", 32, "--channels", 4, "--hidden", 16, "--val-cases", 2, "--val-every", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (run / "best.pt").exists() and (run / "last.pt").exists() and (run / "log.csv").exists()
    assert "final.csv" not in result.output and "coarse" in result.output and "best" in result.output  # the final table
    result = rnca("refine", "--image", images / "c0.png", "--mask", states / "c0.png", "--out", tmp_path / "r.png",
                  "--model", run / "best.pt", "--steps", 6)
    assert result.exit_code == 0, result.output
    again = rnca("train", "--images", images, "--labels", labels, "--states", states, "--out", run, "--patch", 32)
    assert again.exit_code == 1 and "already exists" in again.output


def test_train_bad_option_and_empty_folder(tmp_path):
    images, labels, states = make_folders(tmp_path, n=2)
    result = rnca("train", "--images", images, "--labels", labels, "--states", states, "--out", tmp_path / "r",
                  "--batch", 64, "--pool", 8)
    assert result.exit_code == 2 and "pool (8) must be >= batch (64)" in result.output
    (tmp_path / "none").mkdir()
    result = rnca("train", "--images", tmp_path / "none", "--labels", labels, "--states", states, "--out", tmp_path / "r")
    assert result.exit_code == 1 and "no case has an image" in result.output
    assert not (tmp_path / "r").exists()


def test_module_entry_point():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rnca_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("rnca ")
    assert "compiled CPU kernels: " in done.stdout  # built, or unavailable and why
    assert "selected" in done.stdout  # the engine a CPU rollout runs on


def test_threads_option_is_applied_and_validated(png_folders, model_file, tmp_path):
    import torch

    images, masks = png_folders
    before = torch.get_num_threads()
    try:
        args = ["refine", "--image", images / "case0.png", "--mask", masks / "case0.png", "--model", model_file,
                "--steps", 2, "-q"]
        assert rnca(*args, "--out", tmp_path / "a.png", "--threads", 1).exit_code == 0
        assert torch.get_num_threads() == 1
        bad = rnca(*args, "--out", tmp_path / "b.png", "--threads", -2)
        assert bad.exit_code == 2 and "--threads -2" in bad.output and not (tmp_path / "b.png").exists()
    finally:
        torch.set_num_threads(before)


def test_train_refuses_bad_model_options_before_reading_data(tmp_path):
    result = rnca("train", "--images", tmp_path / "nowhere", "--labels", tmp_path, "--states", tmp_path,
                  "--out", tmp_path / "r", "--fire-rate", 2)
    assert result.exit_code == 2 and "fire_rate must be in [0, 1]" in result.output


def test_half_precision_refine_runs_and_stays_close(tmp_path, png_folders, model_file):
    images, masks = png_folders
    common = ["refine", "--image", images / "case1.png", "--mask", masks / "case1.png", "--model", model_file,
              "--steps", 4, "-q"]
    assert rnca(*common, "--out", tmp_path / "fp32.png").exit_code == 0
    assert rnca(*common, "--out", tmp_path / "bf16.png", "--precision", "bf16").exit_code == 0
    fp32, bf16 = (np.asarray(Image.open(tmp_path / f"{name}.png")) > 0 for name in ("fp32", "bf16"))
    assert (fp32 == bf16).mean() >= 0.95


def test_tiled_refine_writes_the_same_mask(tmp_path, png_folders, model_file):
    images, masks = png_folders
    common = ["refine", "--image", images / "case1.png", "--mask", masks / "case1.png", "--model", model_file,
              "--steps", 3, "--save-prob", "-q"]
    assert rnca(*common, "--out", tmp_path / "whole.png").exit_code == 0
    assert rnca(*common, "--out", tmp_path / "tiled.png", "--tile", 16).exit_code == 0
    for name in ("whole", "tiled"):
        assert (tmp_path / f"{name}_prob.png").exists()
    assert (tmp_path / "whole_prob.png").read_bytes() == (tmp_path / "tiled_prob.png").read_bytes()
    assert rnca(*common, "--out", tmp_path / "x.png", "--tile", 4).exit_code == 2


@requires_cuda
def test_refine_and_train_on_cuda(tmp_path, png_folders, model_file):
    """--device cuda end to end: the refined probabilities match the CPU's to uint8 rounding, and a
    model trained on the GPU is saved as CPU tensors that refine anywhere."""
    import torch

    from rnca_cli import load_checkpoint

    images, masks = png_folders
    common = ["refine", "--image", images / "case1.png", "--mask", masks / "case1.png", "--model", model_file,
              "--steps", 6, "--save-prob", "-q"]
    for device in ("cpu", "cuda"):
        assert rnca(*common, "--out", tmp_path / f"{device}.png", "--device", device).exit_code == 0
    cpu, gpu = (np.asarray(Image.open(tmp_path / f"{d}_prob.png")).astype(int) for d in ("cpu", "cuda"))
    assert np.abs(cpu - gpu).max() <= 1
    images, labels, states = make_folders(tmp_path / "train", n=4)
    run = tmp_path / "run"
    result = rnca("train", "--images", images, "--labels", labels, "--states", states, "--out", run,
                  "--iterations", 3, "--pool", 8, "--batch", 2, "--replace", 1, "--steps", 6, "--min-step", 3,
                  "--patch", 32, "--channels", 4, "--hidden", 16, "--val-cases", 1, "--val-every", 3, "--device", "cuda")
    assert result.exit_code == 0, result.output
    raw = torch.load(run / "last.pt", weights_only=True)  # no map_location: tensors load where they were saved
    assert all(t.device.type == "cpu" for t in raw["state_dict"].values())
    model, provenance = load_checkpoint(run / "last.pt")
    assert provenance["iterations"] == 3


@pytest.mark.parametrize("command", ["refine", "train", "evaluate", "perturb", "synth"])
def test_every_command_has_short_help_and_ends_with_examples(command):
    result = rnca(command, "-h")
    assert result.exit_code == 0, result.output
    tail = result.output[result.output.index("Examples:"):]
    assert tail.count(f"rnca {command} ") >= 2


def test_refine_takes_nnunet_style_short_options(tmp_path, png_folders, model_file):
    images, masks = png_folders
    out = tmp_path / "short.png"
    result = rnca("refine", "-i", images / "case0.png", "-m", masks / "case0.png", "-o", out, "--model", model_file,
                  "--steps", 2, "-q")
    assert result.exit_code == 0, result.output
    assert out.exists()


@pytest.mark.parametrize("name", ["x[/].png", "[red]x[/red].png", ":warning:.png"])
def test_paths_are_printed_exactly_as_given(tmp_path, png_folders, model_file, name):
    """A path with square brackets or colons is shown as it is, not read as rich markup."""
    images, _ = png_folders
    missing = tmp_path / name
    result = rnca("refine", "-i", images / "case0.png", "-m", missing, "--model", model_file)
    assert result.exit_code == 1, result.output
    assert str(missing) in result.output and "Traceback" not in result.output


def test_refine_saves_overlay_and_trajectory_pictures(tmp_path, png_folders, model_file):
    images, masks = png_folders
    over, traj = tmp_path / "overlay", tmp_path / "trajectory"
    args = ["refine", "-i", images, "-m", masks, "-o", tmp_path / "out", "--model", model_file, "--steps", 5,
            "--save-overlay", over, "--save-trajectory", traj]
    result = rnca(*args)
    assert result.exit_code == 0, result.output
    for k in range(3):
        with Image.open(over / f"case{k}.png") as overlay:
            assert overlay.size == (32, 32) and overlay.mode == "RGB"
        with Image.open(traj / f"case{k}.gif") as gif:
            assert gif.n_frames == 6  # the coarse mask and 5 steps
        with Image.open(traj / f"case{k}.png") as strip:
            assert strip.height > 32
    refined = np.asarray(Image.open(tmp_path / "out" / "case0.png")) > 0
    coarse = np.asarray(Image.open(masks / "case0.png")) > 0
    pixels = np.asarray(Image.open(over / "case0.png")).reshape(-1, 3)
    added = int((refined & ~coarse).sum())
    assert int((pixels == (40, 200, 60)).all(1).sum()) == added  # green marks exactly the added pixels
    again = rnca(*args[:6], tmp_path / "out2", *args[7:])
    assert again.exit_code == 1 and "case0.png: already exists" in again.output  # pictures are outputs too
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("case, code, message", [
    ("size", 1, "c1.png: shape (16, 16) differs from image"),
    ("soft_label", 1, "c1.png: ground truth is not binary"),
    ("select", 2, "unknown --select metric 'iou'"),
    ("recipe", 2, "unknown operator 'smudge'"),
    ("empty", 1, "nothing to train on"),
    ("fraction", 2, "--val-fraction holds out 4 of 4 cases and leaves none to train on"),
    ("val_both", 2, "give --val-cases or --val-images/--val-labels, not both"),
    ("resume", 2, "the run used lr=0.0001, not 0.001"),
])
def test_train_bad_input_is_one_line_and_overwrites_nothing(tmp_path, case, code, message):
    images, labels, states = make_folders(tmp_path, n=4)
    base = ["train", "--images", images, "--labels", labels, "--states", states, "--iterations", 1, "--pool", 2,
            "--batch", 2, "--replace", 1, "--steps", 2, "--patch", 32, "--channels", 4, "--hidden", 8]
    out, extra = tmp_path / "run", []
    if case == "size":
        write_png(labels / "c1.png", np.zeros((16, 16), np.uint8))
    elif case == "soft_label":
        write_png(labels / "c1.png", (np.arange(32 * 32).reshape(32, 32) % 200 + 40).astype(np.uint8))
    elif case == "select":
        extra = ["--select", "iou"]
    elif case == "recipe":
        extra = ["--perturb", "breaks:0.5,smudge:1"]
    elif case == "empty":
        for k in range(4):
            write_png(states / f"c{k}.png", np.zeros((32, 32), np.uint8))
    elif case == "fraction":
        extra = ["--val-fraction", "0.99"]
    elif case == "val_both":
        extra = ["--val-cases", 1, "--val-images", images, "--val-labels", labels]
    else:
        assert rnca(*base, "-o", out, "-q").exit_code == 0
        extra = ["--lr", 0.001]
    before = {p: p.read_bytes() for p in out.rglob("*")} if out.exists() else None
    result = rnca(*base, *extra, *(["--resume", out] if case == "resume" else ["-o", out]), "-q")
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output and result.output.count("\n") == 1
    if before is None:
        assert not out.exists()
    else:
        assert {p: p.read_bytes() for p in out.rglob("*")} == before


@pytest.mark.parametrize("seed", [2**63, 2**62, -1])
def test_out_of_range_seeds_are_usage_errors(tmp_path, png_folders, model_file, seed):
    images, masks = png_folders
    result = rnca("refine", "-i", images / "case0.png", "-m", masks / "case0.png", "-o", tmp_path / "o.png",
                  "--model", model_file, "--seed", seed)
    assert result.exit_code == 2 and "seed must be in 0..2^62-1" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("command", ["evaluate", "perturb"])
def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, command):
    from test_io import png_claiming

    (tmp_path / "labels").mkdir()
    bomb = png_claiming(tmp_path / "labels" / "bomb.png", 30000, 30000)
    if command == "evaluate":
        result = rnca("evaluate", "--pred", bomb, "--gt", bomb)
    else:
        result = rnca("perturb", "--labels", tmp_path / "labels", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "bomb.png: refused as a decompression bomb" in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["synth", "--kind", "rings", "--n", "2", "--seed", "-1"], "seed must be in 0..2^62-1, not -1"),
    (["synth", "--kind", "rings", "--n", "2", "--size", "100000"], "--size 100000: a case would need about 111.8 GiB"),
])
def test_synth_refuses_seeds_and_sizes_up_front_and_writes_nothing(tmp_path, args, message):
    result = rnca(*args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_perturb_refuses_a_negative_seed_and_writes_nothing(tmp_path):
    write_png(tmp_path / "labels" / "a.png", ring(32).astype(np.uint8) * 255)
    result = rnca("perturb", "--labels", tmp_path / "labels", "-o", tmp_path / "out", "--seed", -3)
    assert result.exit_code == 2 and "seed must be in 0..2^62-1, not -3" in result.output
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_pool_that_cannot_fit_before_reading_data(tmp_path):
    images, labels, states = make_folders(tmp_path, n=2)
    result = rnca("train", "--images", images, "--labels", labels, "--states", states, "-o", tmp_path / "run",
                  "--patch", 100000)
    assert result.exit_code == 2 and "--patch 100000 with --pool 256: the pool alone would need" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_an_output_path_with_brackets_is_written_and_shown_as_given(tmp_path, png_folders, model_file):
    images, masks = png_folders
    out = tmp_path / "o[/bold].png"
    result = rnca("refine", "-i", images / "case0.png", "-m", masks / "case0.png", "-o", out, "--model", model_file,
                  "--steps", 2)
    assert result.exit_code == 0 and out.exists() and f"wrote {out}" in result.output.replace("\n", "")


def test_export_writes_a_shippable_model_and_refuses_bad_input(tmp_path, model_file):
    out = tmp_path / "shipped.pt"
    result = rnca("export", "--model", model_file, "-o", out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    again = rnca("export", "--model", model_file, "-o", out)
    assert again.exit_code != 0 and "already exists" in again.output and "Traceback" not in again.output
    (tmp_path / "junk.pt").write_text("not a model")
    bad = rnca("export", "--model", tmp_path / "junk.pt", "-o", tmp_path / "x.pt")
    assert bad.exit_code != 0 and "junk.pt" in bad.output and not (tmp_path / "x.pt").exists()


def test_train_init_keeps_the_models_architecture(tmp_path, model_file):
    images, labels, states = make_folders(tmp_path)
    result = rnca("train", "--images", images, "--labels", labels, "--states", states, "--out", tmp_path / "r",
                  "--init", model_file, "--hidden", 64)
    assert result.exit_code != 0 and "drop --hidden" in result.output and "Traceback" not in result.output
    result = rnca("train", "--images", images, "--labels", labels, "--states", states, "--out", tmp_path / "r",
                  "--init", tmp_path / "missing.pt")
    assert result.exit_code != 0 and "missing.pt: no such model file" in result.output
