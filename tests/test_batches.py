"""Folder refines that are safe to interrupt and to run twice: --skip-existing, --continue-on-error,
the output-folder claim, and kills at random moments."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rnca_cli import io
from rnca_cli.cli import app

from conftest import ring, write_png


def rnca(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def folders(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for k in range(n):
        write_png(tmp_path / "images" / f"case{k}.png", (ring() * 160 + rng.integers(0, 60, (32, 32))).astype(np.uint8))
        write_png(tmp_path / "masks" / f"case{k}.png", ring(gap=True).astype(np.uint8) * 255)
    return tmp_path / "images", tmp_path / "masks"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_skip_existing_finishes_an_interrupted_batch_and_sweeps_its_temporaries(tmp_path, model_file):
    images, masks = folders(tmp_path)
    whole = tmp_path / "whole"
    assert rnca("refine", "-i", images, "-m", masks, "-o", whole, "--model", model_file, "--steps", 3, "-q").exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "case1.png").write_bytes((whole / "case1.png").read_bytes())  # finished before the kill
    stale = out / ".case2.png.ab12cd34.tmp.png"  # what a kill during a write leaves
    stale.write_bytes(b"half a png")
    result = rnca("refine", "-i", images, "-m", masks, "-o", out, "--model", model_file, "--steps", 3, "--skip-existing")
    assert result.exit_code == 0, result.output
    assert "skipped 1 finished case(s)" in result.output and "removed 1 temporary file(s)" in result.output
    done = snapshot(out)
    assert {k: v for k, v in done.items() if k != "refine.csv"} == {k: v for k, v in snapshot(whole).items() if k != "refine.csv"}
    assert not stale.exists() and not (out / io.LOCK_NAME).exists()


def test_skip_existing_and_overwrite_together_are_refused(tmp_path, model_file):
    images, masks = folders(tmp_path, 1)
    result = rnca("refine", "-i", images, "-m", masks, "-o", tmp_path / "o", "--model", model_file,
                  "--skip-existing", "--overwrite")
    assert result.exit_code == 2 and "choose one" in result.output and not (tmp_path / "o").exists()


def test_continue_on_error_refines_the_good_cases_and_lists_the_bad_ones(tmp_path, model_file):
    images, masks = folders(tmp_path)
    bad = masks / "case2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: its header reads, its pixels do not
    out = tmp_path / "out"
    stopped = rnca("refine", "-i", images, "-m", masks, "-o", out, "--model", model_file, "--steps", 2)
    assert stopped.exit_code == 1 and str(bad) in stopped.output and "Traceback" not in stopped.output
    result = rnca("refine", "-i", images, "-m", masks, "-o", tmp_path / "out2", "--model", model_file, "--steps", 2,
                  "--continue-on-error", "-q")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert any(str(bad) in line for line in lines) and "1 case(s) failed" in lines[-1]
    written = sorted(p.name for p in (tmp_path / "out2").iterdir())
    assert written == ["case0.png", "case1.png", "case3.png", "refine.csv"]


def test_continue_on_error_also_leaves_out_cases_whose_headers_disagree(tmp_path, model_file):
    images, masks = folders(tmp_path)
    write_png(masks / "case1.png", np.zeros((20, 20), np.uint8))  # wrong shape: found before any write
    result = rnca("refine", "-i", images, "-m", masks, "-o", tmp_path / "out", "--model", model_file, "--steps", 2,
                  "--continue-on-error")
    assert result.exit_code == 1 and "differs from image" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0.png", "case2.png", "case3.png", "refine.csv"]


def test_a_second_run_into_a_held_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, model_file):
    images, masks = folders(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / io.LOCK_NAME).write_text(f"{socket.gethostname()} {holder.pid}\n")
        result = rnca("refine", "-i", images, "-m", masks, "-o", out, "--model", model_file, "--steps", 2)
        assert result.exit_code == 1 and f"pid {holder.pid}" in result.output and "is writing here" in result.output
        assert sorted(p.name for p in out.iterdir()) == [io.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    result = rnca("refine", "-i", images, "-m", masks, "-o", out, "--model", model_file, "--steps", 2)
    assert result.exit_code == 0, result.output  # the holder is gone: its lock is stale
    assert sorted(p.name for p in out.iterdir()) == ["case0.png", "case1.png", "refine.csv"]


@pytest.mark.slow
def test_folder_refines_killed_at_random_moments_leave_complete_files_and_resume(tmp_path, model_file):
    """Kills (SIGKILL) at random moments: every output present is complete and equal to an
    uninterrupted run's; --skip-existing then finishes the batch to the same files. 5 kills in the
    suite; ``RNCA_KILLS=20 pytest -m slow`` for the full check."""
    images, masks = folders(tmp_path, 12)
    command = [sys.executable, "-m", "rnca_cli", "refine", "-i", str(images), "-m", str(masks), "--model",
               str(model_file), "--steps", "40", "--batch", "1", "--save-prob", "-q", "--threads", "1"]
    whole = tmp_path / "whole"
    subprocess.run([*command, "-o", str(whole)], check=True)
    expected = {k: v for k, v in snapshot(whole).items() if k != "refine.csv"}
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    for kill in range(int(os.environ.get("RNCA_KILLS", "5"))):
        process = subprocess.Popen([*command, "-o", str(out), "--skip-existing"])
        deadline = time.time() + 60  # past start-up (the folder is claimed), then a random moment
        while time.time() < deadline and process.poll() is None and not (out / io.LOCK_NAME).exists():
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        process.send_signal(signal.SIGKILL)  # a run that already finished is left alone
        process.wait()
        for name, data in snapshot(out).items():
            if name.endswith((".png",)) and not Path(name).name.startswith("."):
                assert data == expected[name], f"kill {kill}: {name} differs from the uninterrupted run's"
    subprocess.run([*command, "-o", str(out), "--skip-existing"], check=True)
    final = snapshot(out)
    assert {k: v for k, v in final.items() if k != "refine.csv"} == expected


@pytest.mark.parametrize("options", [
    ["--save-overlay", "{tmp}/pics", "--save-trajectory", "{tmp}/pics"],  # both write <case>.png
    ["--ensemble", "2", "--save-uncertainty", "{tmp}/out"],  # the std maps would replace the masks
    ["--report", "{tmp}/out/case0.png"],
])
def test_two_outputs_of_one_run_never_share_a_path(tmp_path, model_file, options):
    images, masks = folders(tmp_path, 2)
    args = [o.replace("{tmp}", str(tmp_path)) for o in options]
    result = rnca("refine", "-i", images, "-m", masks, "-o", tmp_path / "out", "--model", model_file, *args)
    assert result.exit_code == 1 and "two outputs of this run would share this path" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "pics").exists()


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder_never_interleave(tmp_path, model_file):
    """Two folder refines into one --out at once: one writes every file, the other is refused with
    one line; the files are the winner's (compared with a run of the same settings alone)."""
    images, masks = folders(tmp_path, 6)
    base = [sys.executable, "-m", "rnca_cli", "refine", "-i", str(images), "-m", str(masks), "--model", str(model_file),
            "--steps", "30", "--batch", "1", "--save-prob", "-q", "--threads", "1"]
    runs = [subprocess.Popen([*base, "--seed", str(seed), "-o", str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    errors = [run.communicate()[1] for run in runs]
    results = [(run.returncode, err) for run, err in zip(runs, errors)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    winner = [seed for seed, (code, _) in zip((1, 2), results) if code == 0][0]
    loser_message = [err for code, err in results if code == 1][0]
    assert "is writing here" in loser_message or "already exists" in loser_message
    assert len(loser_message.strip().splitlines()) == 1
    alone = tmp_path / "alone"
    subprocess.run([*base, "--seed", str(winner), "-o", str(alone)], check=True)
    drop = ("refine.csv",)
    assert {k: v for k, v in snapshot(tmp_path / "out").items() if k not in drop} == \
        {k: v for k, v in snapshot(alone).items() if k not in drop}
