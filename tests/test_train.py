"""Pool training (rnca_cli.train)."""

from __future__ import annotations

import csv
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from rnca_cli import train as tr
from rnca_cli.checkpoint import load_checkpoint
from rnca_cli.engines import select_engine
from rnca_cli.errors import InputError, OutputError, UsageError
from rnca_cli.model import FireNoise, ModelConfig
from rnca_cli.refine import refine_array

from conftest import requires_kernels, ring, tiny_model, write_nifti, write_png

SMALL = ModelConfig(channels=4, hidden=16)


def make_folders(root, n=8, size=32):
    rng = np.random.default_rng(0)
    for k in range(n):
        target = ring(size, radius=6 + k % 4, width=3)
        broken = ring(size, radius=6 + k % 4, width=3, gap=True)
        image = np.clip(target * 170 + rng.normal(40, 20, target.shape), 0, 255).astype(np.uint8)
        write_png(root / "images" / f"c{k}.png", image)
        write_png(root / "labels" / f"c{k}.png", target.astype(np.uint8) * 255)
        write_png(root / "states" / f"c{k}.png", broken.astype(np.uint8) * 255)
    return root / "images", root / "labels", root / "states"


def test_window_starts_cover_and_end_flush():
    assert tr.window_starts(64, 64, 0.25) == [0]
    assert tr.window_starts(40, 64, 0.25) == [0]
    assert tr.window_starts(160, 64, 0.25) == [0, 48, 96]
    assert tr.window_starts(150, 64, 0.25) == [0, 48, 86]


def test_patches_skip_empty_coarse_masks_and_pad_small_inputs():
    image = np.zeros((100, 40, 1), np.float32)
    label = np.zeros((100, 40), np.float32)
    coarse = np.zeros((100, 40), np.float32)
    coarse[5, 5] = 1.0  # only the first window holds anything
    patches = list(tr.cut_patches(image, label, coarse, 64, 0.25))
    assert len(patches) == 1
    img, lab, st = patches[0]
    assert img.shape == (64, 64, 1) and lab.shape == st.shape == (64, 64)
    assert st[5, 5] == 1.0 and st[:, 40:].sum() == 0


def test_dataset_holds_out_validation_cases(tmp_path):
    folders = make_folders(tmp_path)
    data = tr.load_dataset(*folders, tr.TrainConfig(patch=32, val_cases=2))
    assert len(data.train) == 6 and len(data.val) == 2
    assert [c.case_id for c in data.val] == ["c6", "c7"] and data.val[0].image.shape == (32, 32, 1)
    assert data.train.images.shape == (6, 1, 32, 32)
    assert "2 validation cases" in data.description
    by_fraction = tr.load_dataset(*folders, tr.TrainConfig(patch=32, val_fraction=0.25))
    assert [c.case_id for c in by_fraction.val] == ["c6", "c7"]


def test_dataset_reports_unmatched_and_refuses_shape_mismatch(tmp_path):
    images, labels, states = make_folders(tmp_path, n=3)
    (states / "c2.png").unlink()
    data = tr.load_dataset(images, labels, states, tr.TrainConfig(patch=32))
    assert len(data.train) == 2 and [p.name for p in data.unmatched] == ["c2.png"]
    write_png(labels / "c0.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match=r"c0.png: shape \(16, 16\) differs"):
        tr.load_dataset(images, labels, states, tr.TrainConfig(patch=32))


def test_nifti_volumes_train_slice_by_slice(tmp_path):
    target = np.stack([ring(24, 7, 3)] * 3, axis=-1).astype(np.uint8)
    write_nifti(tmp_path / "i" / "v.nii.gz", target.astype(np.float32))
    write_nifti(tmp_path / "l" / "v.nii.gz", target)
    write_nifti(tmp_path / "s" / "v.nii.gz", target)
    data = tr.load_dataset(tmp_path / "i", tmp_path / "l", tmp_path / "s", tr.TrainConfig(patch=32))
    assert len(data.train) == 3


def test_a_few_iterations_lower_the_loss_and_the_checkpoint_refines(tmp_path):
    folders = make_folders(tmp_path)
    config = tr.TrainConfig(iterations=30, pool=16, batch=4, replace=1, steps=12, min_step=6, lr=3e-3,
                            patch=32, save_every=10, seed=0)
    data = tr.load_dataset(*folders, config)
    losses = []
    model, ckpt = tr.train(data, tmp_path / "run", config, SMALL, on_progress=lambda p: losses.append(p.loss))
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < np.mean(losses[:4])
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and float(rows[-1]["loss"]) == pytest.approx(losses[-1], rel=1e-4)
    loaded, provenance = load_checkpoint(ckpt)
    assert provenance["iterations"] == 30 and "c0" not in provenance["data"] and "8 training cases" in provenance["data"]
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    prob = refine_array(loaded, np.random.rand(32, 32), ring(32, 7, 3, gap=True).astype(np.float32), steps=12)
    assert prob.shape == (32, 32) and 0 <= prob.min() and prob.max() <= 1


def train_at(tmp_path, threads: list[int]) -> list:
    """The same small training run once per thread count in ``threads``; the trained models."""
    folders = make_folders(tmp_path, n=4)
    config = tr.TrainConfig(iterations=3, pool=8, batch=4, replace=1, steps=6, min_step=3, patch=32)
    data = tr.load_dataset(*folders, config)
    before, models = torch.get_num_threads(), []
    try:
        for run, count in enumerate(threads):
            torch.set_num_threads(count)
            models.append(tr.train(data, tmp_path / f"run{run}", config, SMALL)[0])
    finally:
        torch.set_num_threads(before)
    return models


def assert_same_weights(a, b):
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("threads", [1, 2])
def test_training_is_reproducible_from_the_seed(tmp_path, engine, threads):
    assert_same_weights(*train_at(tmp_path, [threads, threads]))


@requires_kernels
def test_training_with_the_kernels_is_the_same_at_any_thread_count(tmp_path):
    """The kernels' filter gradient is summed in a fixed order; PyTorch alone is reproducible
    only at a fixed thread count (its convolution backward splits work by thread)."""
    assert_same_weights(*train_at(tmp_path, [1, 2]))


def test_validation_metrics_are_logged_and_best_changes_only_when_the_selected_metric_improves(tmp_path):
    folders = make_folders(tmp_path, n=6)
    config = tr.TrainConfig(iterations=6, pool=4, batch=2, replace=1, steps=4, min_step=2, patch=32,
                            val_cases=2, val_every=1, lr=3e-3, select="dice")
    seen, best_bytes = [], []
    best = tmp_path / "run" / "best.pt"

    def progress(p):
        seen.append(p.val)
        best_bytes.append(best.read_bytes() if best.exists() else None)

    model, ckpt = tr.train(tr.load_dataset(*folders, config), tmp_path / "run", config, SMALL, on_progress=progress)
    assert ckpt == best and (tmp_path / "run" / "last.pt").exists()
    assert all(set(v) == {"dice", "cldice", "betti0_err", "betti1_err", "betti_err", "topology", "changed"} for v in seen)
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_dice"]) for r in rows] == pytest.approx([v["dice"] for v in seen], rel=1e-5)
    running = -1.0
    for val, before, after in zip(seen, [None] + best_bytes[:-1], best_bytes):
        if val["dice"] > running:  # improved: best.pt rewritten
            running = val["dice"]
            assert after is not None and after != before
        else:
            assert after == before
    _, provenance = load_checkpoint(best)
    assert provenance["val_dice"] == pytest.approx(running) and provenance["selected_by"] == "dice"
    with open(tmp_path / "run" / "final.csv") as f:
        final = list(csv.DictReader(f))
    assert [r["masks"] for r in final] == ["coarse", "best", "last"]
    from PIL import Image

    def opened(name):
        with Image.open(tmp_path / "run" / name) as im:
            return im.size, getattr(im, "n_frames", 1)

    assert opened("curves.png")[0] == (360, 5 * 200)  # loss and 4 validation panels
    (width, height), _ = opened("trajectory.png")  # 2 cases: image, coarse, 4 steps, truth
    assert height == 2 * (4 * 32 + 14 + 4) and width > 7 * 4 * 32
    assert opened("trajectory.gif")[1] == 5  # the coarse mask and 4 steps
    assert float(final[1]["dice"]) == pytest.approx(running, rel=1e-5)
    from rnca_cli.guard import DEFAULT_LIMITS
    from rnca_cli.validation import guard_limits

    for name in ("best.pt", "last.pt"):  # both carry guard limits that trust their validation cases
        chosen = load_checkpoint(tmp_path / "run" / name)[0]
        limits = chosen.refine_defaults
        assert limits == guard_limits(chosen, tr.load_dataset(*folders, config).val, 4, 0)
        assert limits["guard_change"] >= DEFAULT_LIMITS.max_change and limits["guard_agreement"] <= DEFAULT_LIMITS.min_agreement


def test_the_run_folder_records_options_data_and_command(tmp_path):
    import json

    folders = make_folders(tmp_path, n=4)
    config = tr.TrainConfig(iterations=2, pool=4, batch=2, replace=1, steps=4, min_step=2, patch=32, val_cases=1)
    data = tr.load_dataset(*folders, config)
    tr.train(data, tmp_path / "run", config, SMALL)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["train_config"]["iterations"] == 2 and record["model_config"]["channels"] == 4
    assert record["train_cases"] == ["c0", "c1", "c2"] and record["val_cases"] == ["c3"]
    assert record["data_digest"] == data.digest() and len(record["data_digest"]) == 64
    assert record["rnca_version"] and (tmp_path / "run" / "command.txt").read_text().strip()


def test_time_budget_stops_and_saves(tmp_path):
    folders = make_folders(tmp_path, n=2)
    config = tr.TrainConfig(iterations=1000, time_budget=1e-9, pool=2, batch=2, replace=1, steps=2, min_step=1,
                            patch=32, save_every=500)
    tr.train(tr.load_dataset(*folders, config), tmp_path / "run", config, SMALL)
    _, provenance = load_checkpoint(tmp_path / "run" / "last.pt")
    assert provenance["iterations"] == 1  # stopped after the first iteration, and saved it


def test_perturb_refills_draw_fresh_coarse_masks(tmp_path):
    images, labels, _ = make_folders(tmp_path, n=2)
    config = tr.TrainConfig(patch=32, perturb="breaks:1.0:count=2,specks:1.0")
    data = tr.load_dataset(images, labels, None, config)
    assert not data.has_states and torch.equal(data.train.coarse, data.train.targets)  # the labels, before corruption
    corrupt = tr.Corruption(config.perturb, 1.0, seed=0)
    which = torch.tensor([0, 0])
    first, second = (corrupt(data.train.targets[which], data.train.coarse[which]) for _ in range(2))
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[0], first[1])  # a fresh draw each refill
    assert not torch.equal(first[0], data.train.targets[0])  # really corrupted
    pool = tr.Pool(tiny_model(), data.train, 4, torch.Generator().manual_seed(0), corrupt)
    assert not torch.equal(pool.states[:, 0].clamp(0.1, 1.0), data.train.targets[pool.which].clamp(0.1, 1.0))
    with pytest.raises(ValueError, match="without --states, give a --perturb recipe"):
        tr.load_dataset(images, labels, None, tr.TrainConfig(patch=32))


def small_run_command(tmp_path, iterations: int, save_every: int, threads: int, val_every: int) -> list[str]:
    """``rnca train`` of a tiny model on 4 small cases, as a subprocess command (the kill tests)."""
    import sys

    images, labels, _ = make_folders(tmp_path, n=4)
    return [sys.executable, "-m", "rnca_cli", "train", "--images", str(images), "--labels", str(labels),
            "--perturb", "breaks:0.8,specks:0.5", "--iterations", str(iterations), "--pool", "8", "--batch", "2",
            "--replace", "1", "--steps", "4", "--patch", "32", "--save-every", str(save_every), "--channels", "4",
            "--hidden", "8", "--threads", str(threads), "--val-cases", "1", "--val-every", str(val_every), "-q"]


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """A training process killed with SIGKILL mid-run and resumed from its last.pt ends bit for bit
    where the same run uninterrupted ends (CPU, same thread count)."""
    import signal
    import subprocess
    import time

    args = small_run_command(tmp_path, iterations=12, save_every=3, threads=2, val_every=4)
    subprocess.run([*args, "-o", str(tmp_path / "whole")], check=True, timeout=300)
    killed = subprocess.Popen([*args, "-o", str(tmp_path / "killed")])
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if last.exists() and load_checkpoint(last)[1]["iterations"] >= 3:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert load_checkpoint(last)[1]["iterations"] < 12  # it really was interrupted
    subprocess.run([*args, "--resume", str(tmp_path / "killed")], check=True, timeout=300)
    a, _ = load_checkpoint(tmp_path / "whole" / "last.pt")
    b, provenance = load_checkpoint(last)
    assert provenance["iterations"] == 12
    assert_same_weights(a, b)
    assert (tmp_path / "whole" / "log.csv").read_text().count("\n") == (tmp_path / "killed" / "log.csv").read_text().count("\n")


def test_a_resume_folder_from_another_configuration_is_refused(tmp_path):
    folders = make_folders(tmp_path, n=2)
    config = tr.TrainConfig(iterations=2, pool=2, batch=2, replace=1, steps=2, min_step=1, patch=32)
    data = tr.load_dataset(*folders, config)
    tr.train(data, tmp_path / "run", config, SMALL)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    other = tr.TrainConfig(iterations=4, pool=2, batch=2, replace=1, steps=2, min_step=1, patch=32, lr=1e-3)
    with pytest.raises(ValueError, match=r"config.json: the run used lr=0.0001, not 0.001"):
        tr.train(data, tmp_path / "run", other, SMALL, resume=True)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    longer = tr.TrainConfig(iterations=4, pool=2, batch=2, replace=1, steps=2, min_step=1, patch=32)
    tr.train(data, tmp_path / "run", longer, SMALL, resume=True)  # more iterations: allowed
    assert load_checkpoint(tmp_path / "run" / "last.pt")[1]["iterations"] == 4


@pytest.mark.parametrize("change, message", [
    (dict(select="iou"), "unknown --select metric 'iou'"),
    (dict(perturb="breaks:0.5,smudge:1"), "unknown operator 'smudge'"),
    (dict(val_fraction=0.5, val_cases=1), "not both"),
    (dict(perturb_share=0.5), "perturb-share needs a --perturb recipe"),
])
def test_bad_training_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        tr.TrainConfig(**change)


def test_validation_from_separate_folders_keeps_every_training_case(tmp_path):
    images, labels, states = make_folders(tmp_path / "train", n=4)
    v_images, v_labels, v_states = make_folders(tmp_path / "val", n=3)
    data = tr.load_dataset(images, labels, states, tr.TrainConfig(patch=32), None, v_images, v_labels, v_states)
    assert len(data.train) == 4 and [c.case_id for c in data.val] == ["c0", "c1", "c2"]
    assert "3 validation cases" in data.description


@pytest.mark.parametrize("config, given, message", [
    (dict(val_cases=1), ("images", "labels", None), "give --val-cases or --val-images/--val-labels, not both"),
    (dict(val_fraction=0.5), ("images", "labels", "states"), "give --val-fraction or --val-images/--val-labels, not both"),
    (dict(), ("images", None, None), "--val-images and --val-labels go together"),
    (dict(), (None, None, "states"), "--val-states needs --val-images and --val-labels"),
])
def test_validation_options_that_would_be_ignored_are_refused(tmp_path, config, given, message):
    folders = make_folders(tmp_path / "train", n=4)
    val_root = tmp_path / "val"
    make_folders(val_root, n=2)
    val = [val_root / name if name else None for name in given]
    with pytest.raises(ValueError, match=message):
        tr.load_dataset(*folders, tr.TrainConfig(patch=32, **config), None, *val)


def test_val_fraction_leaving_no_training_case_is_refused(tmp_path):
    folders = make_folders(tmp_path, n=2)
    with pytest.raises(ValueError, match="--val-fraction holds out 2 of 2 cases and leaves none"):
        tr.load_dataset(*folders, tr.TrainConfig(patch=32, val_fraction=0.9))


def test_existing_run_is_not_overwritten(tmp_path):
    folders = make_folders(tmp_path, n=2)
    config = tr.TrainConfig(iterations=1, pool=2, batch=2, replace=1, steps=2, min_step=1, patch=32)
    data = tr.load_dataset(*folders, config)
    tr.train(data, tmp_path / "run", config, SMALL)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        tr.train(data, tmp_path / "run", config, SMALL)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("steps, min_step", [(64, 32), (4, 2), (5, 3), (1, 1)])
def test_min_step_defaults_to_half_of_steps(steps, min_step):
    assert tr.TrainConfig(steps=steps).min_step == min_step
    assert tr.TrainConfig(steps=steps, min_step=1).min_step == 1  # an explicit value is kept


@pytest.mark.parametrize("bad", [dict(pool=4, batch=8), dict(replace=9, batch=8), dict(min_step=70), dict(overlap=1.0)])
def test_invalid_train_config_is_refused(bad):
    with pytest.raises(ValueError):
        tr.TrainConfig(**bad)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from rnca_cli.errors import TrainingError

    folders = make_folders(tmp_path, n=2)
    config = tr.TrainConfig(iterations=5, pool=2, batch=2, replace=1, steps=2, min_step=1, patch=32, save_every=2)
    data = tr.load_dataset(*folders, config)
    losses = iter([0.5, 0.4, 0.3, float("nan"), 0.1])
    monkeypatch.setattr(tr, "train_step", lambda *args: next(losses))
    with pytest.raises(TrainingError, match="diverged at iteration 4"):
        tr.train(data, tmp_path / "run", config, SMALL)
    _, provenance = load_checkpoint(tmp_path / "run" / "last.pt")
    assert provenance["iterations"] == 2


def test_unroll_drops_finished_samples_without_changing_loss_or_gradients(engine):
    model = tiny_model()
    fast_engine = select_engine(torch.device("cpu"), torch.float32, model, engine)
    g = torch.Generator().manual_seed(0)
    image, coarse = torch.rand(4, 1, 12, 12, generator=g), torch.rand(4, 12, 12, generator=g)
    target = (coarse > 0.5).float()
    t_star = torch.tensor([3, 7, 5, 7])
    noise = FireNoise(torch.tensor([1, 2, 3, 4]), (12, 12))
    model.train()

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    loss, at_t = tr.unroll(model, fast_engine, model.initial_state(coarse), image, target, noise, t_star)
    fast = grads_of(loss)
    # Reference: the rule; every sample runs to max(t*), its loss taken at its own t*.
    state, features, ref_loss, ref_at = model.initial_state(coarse), model.perceive_image(image), 0.0, {}
    for t in range(1, 8):
        state = model.step(state, features, noise, t - 1)
        for i in (t_star == t).nonzero().flatten().tolist():
            ref_loss = ref_loss + ((state[i, 0] - target[i]) ** 2).mean()
            ref_at[i] = state[i].detach()
    slow = grads_of(ref_loss)
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    for i in range(4):
        assert torch.allclose(at_t[i], ref_at[i], atol=1e-6)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_data_parallel_training_with_two_gloo_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): a few iterations, the gradients averaged, one run folder."""
    import json
    import subprocess
    import sys

    images, labels, states = make_folders(tmp_path, n=4)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rnca_cli",
         "train", "--images", str(images), "--labels", str(labels), "--states", str(states), "-o", str(tmp_path / "run"),
         "--iterations", "3", "--pool", "8", "--batch", "4", "--replace", "2", "--steps", "4", "--patch", "32",
         "--channels", "4", "--hidden", "8", "--threads", "1", "--device", "cpu", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    _, provenance = load_checkpoint(tmp_path / "run" / "last.pt")
    assert provenance["iterations"] == 3
    with open(tmp_path / "run" / "log.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3]  # one log, written by rank 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]["batch"] == 4
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["command.txt", "config.json", "curves.png",
                                                                     "last.pt", "log.csv"]


def test_gradient_averaging_over_ranks_is_the_mean(monkeypatch):
    """What each rank applies is the mean of the ranks' gradients (all_reduce sums, then / world)."""
    import torch.distributed as dist

    model = tiny_model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))  # two ranks with equal gradients: sum = 2x
    tr.Ranks(rank=0, world=2).average_gradients(model)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())


def test_resume_restores_ema_optimizer_and_pool_exactly(tmp_path):
    """Four iterations at once, or two and two more with --resume: the same weights and EMA."""
    folders = make_folders(tmp_path, n=4)
    options = dict(pool=4, batch=2, replace=1, steps=4, min_step=2, patch=32, lr=3e-3, ema=0.9, val_cases=1,
                   val_every=2, loss="mse+dice", far_weight=2.0, miss_weight=5.0, perturb="specks:1.0",
                   perturb_share=0.5)
    whole = tr.TrainConfig(iterations=4, **options)
    data = tr.load_dataset(*folders, whole)
    a, _ = tr.train(data, tmp_path / "whole", whole, SMALL)
    tr.train(data, tmp_path / "split", tr.TrainConfig(iterations=2, **options), SMALL)
    b, _ = tr.train(data, tmp_path / "split", whole, SMALL, resume=True)
    assert_same_weights(a, b)
    ema_a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["training"]["ema"]
    ema_b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["training"]["ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not all(torch.equal(ema_a[k], a.state_dict()[k]) for k in ema_a)  # the average lags the weights


def test_a_run_saved_before_the_pool_kept_its_starting_masks_resumes(tmp_path):
    """last.pt files written before --miss-weight existed hold no pool_start; such runs resume."""
    folders = make_folders(tmp_path, n=4)
    options = dict(pool=4, batch=2, replace=1, steps=4, min_step=2, patch=32, lr=3e-3, val_cases=1, val_every=2)
    whole = tr.TrainConfig(iterations=4, **options)
    data = tr.load_dataset(*folders, whole)
    a, _ = tr.train(data, tmp_path / "whole", whole, SMALL)
    tr.train(data, tmp_path / "split", tr.TrainConfig(iterations=2, **options), SMALL)
    last = tmp_path / "split" / "last.pt"
    payload = torch.load(last, weights_only=True)
    del payload["training"]["pool_start"]
    torch.save(payload, last)
    b, _ = tr.train(data, tmp_path / "split", whole, SMALL, resume=True)
    assert_same_weights(a, b)


def test_an_overwritten_run_keeps_no_pictures_of_the_old_one(tmp_path):
    folders = make_folders(tmp_path, n=4)
    options = dict(iterations=1, pool=2, batch=2, replace=1, steps=2, min_step=1, patch=32)
    with_val = tr.TrainConfig(val_cases=1, **options)
    tr.train(tr.load_dataset(*folders, with_val), tmp_path / "run", with_val, SMALL)
    assert (tmp_path / "run" / "trajectory.png").exists() and (tmp_path / "run" / "best.pt").exists()
    plain = tr.TrainConfig(**options)
    tr.train(tr.load_dataset(*folders, plain), tmp_path / "run", plain, SMALL, overwrite=True)
    left = {p.name for p in (tmp_path / "run").iterdir()}
    assert not left & {"trajectory.png", "trajectory.gif", "best.pt", "final.csv"}


@pytest.mark.slow
def test_kills_at_random_moments_then_resume_end_like_the_uninterrupted_run(tmp_path):
    """SIGKILL at random moments (in training, validation or a checkpoint write), each time resumed
    from last.pt: the run ends with the weights of the same run uninterrupted. 5 kills in the
    suite; ``RNCA_KILLS=20 pytest -m slow`` for the full check."""
    import signal
    import subprocess
    import time

    args = small_run_command(tmp_path, iterations=150, save_every=2, threads=1, val_every=10)
    subprocess.run([*args, "-o", str(tmp_path / "whole")], check=True, timeout=300)
    run, last = tmp_path / "killed", tmp_path / "killed" / "last.pt"
    kills = int(os.environ.get("RNCA_KILLS", "5"))
    rng = np.random.default_rng(0)
    interrupted = 0
    for _kill in range(kills):
        start = ["--resume", str(run)] if last.exists() else ["-o", str(run), "--overwrite"]
        before = last.stat().st_mtime_ns if last.exists() else 0
        process = subprocess.Popen([*args, *start], stderr=subprocess.DEVNULL)
        deadline = time.time() + 60  # past start-up (the first checkpoint of this process), then a random moment
        while time.time() < deadline and process.poll() is None and (not last.exists() or last.stat().st_mtime_ns == before):
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.5)))
        process.send_signal(signal.SIGKILL)
        interrupted += process.wait() == -signal.SIGKILL
        if last.exists():
            load_checkpoint(last)  # never a half-written checkpoint
    assert interrupted >= kills // 2
    subprocess.run([*args, "--resume", str(run)], check=True, timeout=300)
    a, _ = load_checkpoint(tmp_path / "whole" / "last.pt")
    b, provenance = load_checkpoint(last)
    assert provenance["iterations"] == 150
    assert_same_weights(a, b)


def test_init_starts_from_a_models_weights_and_refuses_another_architecture(tmp_path):
    folders = make_folders(tmp_path)
    config = tr.TrainConfig(iterations=15, pool=4, batch=2, replace=1, steps=4, min_step=2, patch=32, lr=1e-2)
    data = tr.load_dataset(*folders, config)
    trained, _ = tr.train(data, tmp_path / "a", config, SMALL)
    one = replace(config, iterations=1, lr=1e-5)
    tuned, _ = tr.train(data, tmp_path / "b", replace(one, init=str(tmp_path / "a" / "last.pt")), SMALL)
    fresh, _ = tr.train(data, tmp_path / "c", one, SMALL)

    def distance(m1, m2):
        return sum(float((a - b).abs().sum()) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))

    assert distance(tuned, trained) < 0.01 < distance(fresh, trained)
    with pytest.raises(UsageError, match="last.pt: --init model differs from this run's model: hidden 16"):
        tr.train(data, tmp_path / "d", replace(one, init=str(tmp_path / "a" / "last.pt")), ModelConfig(channels=4, hidden=8))
