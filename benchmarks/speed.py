"""Speed and memory of rnca's engines, as ratios against the rule they implement.

    python benchmarks/speed.py [--quick] [--device cpu|cuda|cuda:N] [--json benchmarks/speed.json]

Everything is measured in one run, on this machine, side by side (alternating rounds, best of):

* ``straightforward``: the rule of ``rnca_cli.model`` (``RNCA.step`` on every pixel at every
  step, NCHW convolutions, image features concatenated each step): the reference the engines are
  tested against. It shares the model's weights and update-mask draws, so outputs compare exactly.
* ``rnca``: ``rnca_cli.inference.rollout`` on the engine rnca selects (``fused`` where the
  compiled kernels run, else ``sparse``), and the engine's ``train_step`` with autograd for
  training; ``rnca in PyTorch alone`` is the ``sparse`` engine.

Timings run with glibc's malloc keeping freed memory (``rnca_cli.device.keep_freed_memory``, as
the ``rnca`` command sets it), so that no formulation is timed page-faulting; the inference row is
repeated in a fresh process with glibc's defaults. Rows: batch-16 inference of 64x64 images
(64 steps), training iterations (batch 16), one 584x565 image, a 512x512 image with one small
ring (cost against alive share), peak RSS for a 4096x4096 image and a 256^3 volume. ``--device
cuda`` measures the rows that mean something on a GPU (:func:`device_rows`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rnca_cli import RncaError, inference, kernels, load_model, synth, train
from rnca_cli.device import keep_freed_memory, resolve_device
from rnca_cli.engines import PRECISION_NAMES, select_engine
from rnca_cli.engines.fused import FusedEngine
from rnca_cli.engines.rows import fc1_weight, mlp, mlp_weights
from rnca_cli.engines.sparse import SparseEngine
from rnca_cli.model import RNCA, FireNoise, visible

ROOT = Path(__file__).resolve().parents[1]


# -- the baseline: the rule of rnca_cli.model, as the paper writes it -----------------------------------


class Straightforward:
    """The rule of :mod:`rnca_cli.model` (``RNCA.step``: every pixel, every step, image features
    concatenated each step), the reference every engine is tested against, timed as the baseline."""

    def __init__(self, model: RNCA):
        self.m = model

    def step(self, state, image_features, noise, t):
        return self.m.step(state, image_features, noise, t)

    def rollout(self, image, mask, steps, seeds):
        with torch.no_grad():
            return self.m.rollout(image, mask, steps, seeds=seeds)[0]


def train_iteration(model: RNCA, naive: Straightforward, image, mask, seeds, steps: int, fast: bool) -> None:
    """One training iteration, every sample unrolled ``steps`` steps, MSE at the last, backward:
    the engine's differentiated step (what ``rnca_cli.train`` runs) or the rule's, on the device
    the tensors are on."""
    state = model.initial_state(mask).contiguous(memory_format=torch.channels_last)
    noise = FireNoise(seeds, tuple(mask.shape[-2:]))
    engine = select_engine(image.device, torch.float32, model)
    inputs = engine.training_inputs(model, image) if fast else model.perceive_image(image)
    for t in range(steps):
        state = engine.train_step(model, state, inputs, noise, t) if fast else naive.step(state, inputs, noise, t)
    loss = ((state[:, 0] - (mask > 0.5).float()) ** 2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def whole_image_engine():
    """The fastest engine with block skipping off: every step on the whole image."""
    return FusedEngine(skip_blocks=False) if kernels.status() is None else SparseEngine(skip_blocks=False)


# -- helpers --------------------------------------------------------------------------------------


def without_kernels(fn, *args):
    """``fn(*args)`` on the sparse engine (``RNCA_ENGINE=sparse``): rnca in PyTorch alone, as it
    runs where no C compiler was at install time."""
    before = os.environ.get("RNCA_ENGINE")
    os.environ["RNCA_ENGINE"] = "sparse"
    try:
        return fn(*args)
    finally:
        if before is None:
            del os.environ["RNCA_ENGINE"]
        else:
            os.environ["RNCA_ENGINE"] = before


def best_of(fn, repeat: int) -> float:
    """Minimum wall time of ``repeat`` calls (after one warm-up call)."""
    return side_by_side({"fn": fn}, repeat)["fn"]


def side_by_side(fns: dict, repeat: int) -> dict:
    """Minimum wall time of each function over ``repeat`` rounds, the functions taking turns within
    a round, so that the machine's slow and fast phases fall on all of them alike: the ratios are
    what this script reports. Each timed call directly follows an untimed call of the same
    function, so that none is timed in the state another left behind: batch-16 inference timed
    right after the straightforward formulation took 0.80 s at best, after itself 0.74 s."""
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def ring_batch(n: int, size: int = 64):
    steps = synth.perturb.parse_recipe(synth.DEFAULT_RECIPES["rings"])
    cases = [synth.make_case("rings", k, size, 0, steps, 0.0) for k in range(n)]
    image = torch.from_numpy(np.stack([c.image for c in cases]))[:, None]
    mask = torch.from_numpy(np.stack([np.asarray(c.state, np.float32) for c in cases]))
    return image, mask


def ring_grid(size: int, n: int):
    """A size x size image (1, 1, S, S) and mask (1, S, S) holding n x n of the 64x64 ring cases,
    one centred in each cell of an n x n grid, on a black background."""
    img, msk = ring_batch(n * n)
    image, mask = torch.zeros(1, 1, size, size), torch.zeros(1, size, size)
    cell = size // n
    for i in range(n):
        for j in range(n):
            y, x = i * cell + (cell - 64) // 2, j * cell + (cell - 64) // 2
            image[0, 0, y : y + 64, x : x + 64] = img[i * n + j, 0]
            mask[0, y : y + 64, x : x + 64] = msk[i * n + j]
    return image, mask


def run_child(code: str) -> str:
    """Standard output of a fresh Python process running ``code`` in the repository root."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


# First lines of every memory row's child process: set up as the ``rnca`` command sets itself up.
AS_THE_COMMAND = "from rnca_cli.device import keep_freed_memory\nkeep_freed_memory()\n"


def peak_rss_child(code: str) -> float:
    """Peak resident memory (GiB) of a fresh Python process running ``code`` after
    :data:`AS_THE_COMMAND`, so that rnca and the straightforward formulation get the same allocator."""
    # VmHWM belongs to the address space, which exec replaces; ru_maxrss would carry the parent's peak.
    out = run_child(AS_THE_COMMAND + code + "\nprint('RSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    kib = int([line for line in out.splitlines() if line.startswith("RSS")][-1].split()[1])
    return kib / 2**20


def peak_cuda_child(code: str) -> float:
    """Peak CUDA memory allocated by tensors (GiB, ``torch.cuda.max_memory_allocated``) in a fresh
    Python process running ``code``: what the caching allocator handed to rnca's tensors, not what
    it reserved from the driver."""
    out = run_child(AS_THE_COMMAND + code + "\nprint('CUDA', torch.cuda.max_memory_allocated())")
    return int([line for line in out.splitlines() if line.startswith("CUDA")][-1].split()[1]) / 2**30


def device_rows(model_name: str, device: torch.device, steps: int, repeat: int, quick: bool) -> dict:
    """rnca against the straightforward formulation on ``device`` (a GPU; on a CPU it runs the same
    code as a check of this function): batch-16 and large-batch inference, the CPU's result as the
    reference, half precision, a training iteration, a 584x565 image, the one-ring image with and
    without block-sparse steps, and peak CUDA memory of a 4096x4096 image and a 256^3 volume.

    Both formulations run with float32 convolutions (``rnca_cli.device.float32_convolutions``, as
    refine and train run): with cuDNN's default TF32 the straightforward formulation's 1x1
    convolutions would compute its MLP with 10-bit mantissas and its output would differ from rnca's
    for that reason alone. GPU work is asynchronous, so every timed call ends with a synchronisation."""
    from rnca_cli.device import float32_convolutions

    def synced(fn):
        if device.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize(device))

    def timed(fns: dict, rounds: int) -> dict:
        return side_by_side({name: synced(fn) for name, fn in fns.items()}, rounds)

    model = load_model(model_name, device=device)
    naive = Straightforward(model)
    cpu_model = load_model(model_name)
    rows: dict[str, dict] = {}
    name = device.type
    with float32_convolutions(device), torch.no_grad():
        for batch in (16, 32 if quick else 256):
            image, mask = ring_batch(batch)
            seeds = torch.arange(batch)
            on = (image.to(device), mask.to(device), steps, seeds.to(device))
            fast = inference.rollout(model, *on).cpu()
            cpu = inference.rollout(cpu_model, image, mask, steps, seeds)
            slow = visible(naive.rollout(*on)).cpu()
            t = timed({"fast": lambda: inference.rollout(model, *on), "slow": lambda: naive.rollout(*on)}, repeat)
            per = batch * steps / 1e3
            rows[f"{name}: inference ms / 64x64 image / step (batch {batch})"] = {
                "rnca": t["fast"] / per, "straightforward": t["slow"] / per,
                "max |diff| vs straightforward": float((fast - slow).abs().max()),
                "max |diff| vs rnca on the CPU": float((fast - cpu).abs().max()),
                "mask agreement with the CPU": float(((fast >= 0.5) == (cpu >= 0.5)).float().mean())}
            if batch != 16:
                continue
            t = timed({p: (lambda p=p: inference.rollout(model, *on, precision=p)) for p in PRECISION_NAMES}, repeat)
            for p in ("bf16", "fp16"):
                half = inference.rollout(model, *on, precision=p).cpu()
                rows[f"{name}: inference with --precision {p}, ms / image / step (batch 16)"] = {
                    "rnca": t[p] / per, "rnca fp32": t["fp32"] / per, "time vs fp32": t[p] / t["fp32"],
                    "mask agreement with fp32 on the CPU": float(((half >= 0.5) == (cpu >= 0.5)).float().mean()),
                    "mean |diff| vs fp32 on the CPU": float((half - cpu).abs().mean())}
        h, w = (584, 565) if not quick else (146, 141)
        big_img = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(0)).to(device)
        big_mask = torch.from_numpy(np.pad(ring_batch(1, 128)[1][0].numpy(), ((0, h - 128), (0, w - 128))))[None].to(device)
        zero = torch.tensor([0], device=device)
        t = timed({"fast": lambda: inference.rollout(model, big_img, big_mask, steps, zero),
                   "slow": lambda: naive.rollout(big_img, big_mask, steps, zero)}, repeat)
        rows[f"{name}: {h}x{w} image, {steps} steps, s"] = {"rnca": t["fast"], "straightforward": t["slow"]}
        size = 512 if not quick else 256
        s_img, s_mask = (x.to(device) for x in ring_grid(size, 1))
        t = timed({"sparse": lambda: inference.rollout(model, s_img, s_mask, steps, zero),
                   "dense": lambda: inference.rollout(model, s_img, s_mask, steps, zero, engine=whole_image_engine()),
                   "slow": lambda: naive.rollout(s_img, s_mask, steps, zero)}, repeat)
        rows[f"{name}: {size}x{size}, one ring, {steps} steps, s"] = {
            "rnca": t["sparse"], "rnca without block-sparse steps": t["dense"], "straightforward": t["slow"]}
    with float32_convolutions(device):
        image, mask = (x.to(device) for x in ring_batch(16))
        seeds = torch.arange(16, device=device)
        model.train()
        t = timed({"fast": lambda: train_iteration(model, naive, image, mask, seeds, steps, True),
                   "slow": lambda: train_iteration(model, naive, image, mask, seeds, steps, False)}, repeat)
        model.eval()
        rows[f"{name}: training s / iteration, all samples {steps} steps (batch 16)"] = {
            "rnca": t["fast"], "straightforward": t["slow"]}
    if device.type == "cuda":
        big, vol = (4096, 256) if not quick else (1024, 64)
        fmt = dict(threads=torch.get_num_threads(), model=model_name, steps=steps, tile=inference.DEFAULT_TILE,
                   device=str(device))
        rows[f"{name}: peak CUDA memory allocated GiB, {big}x{big} image"] = {
            "rnca": peak_cuda_child(REFINE_2D.format(size=big, **fmt))}
        rows[f"{name}: peak CUDA memory allocated GiB, {vol}^3 volume"] = {
            "rnca": peak_cuda_child(REFINE_3D.format(size=vol, **fmt))}
    return rows


def default_malloc_inference(threads: int, model: str, steps: int, rounds: int) -> dict:
    """Batch-16 inference of both formulations (best of ``rounds`` alternating rounds, ms per
    image-step) and the straightforward formulation's minor page faults per rollout, in a fresh
    process with glibc's default malloc settings: what a first call in a new process costs."""
    out = run_child(INFERENCE_DEFAULT_MALLOC.format(threads=threads, model=model, steps=steps, rounds=rounds))
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


REFINE_2D = """
import numpy as np, torch
from rnca_cli import load_model
from rnca_cli.refine import refine_array
torch.set_num_threads({threads})
model = load_model({model!r}, device={device!r})
size = {size}
yy, xx = np.ogrid[:size, :size]  # broadcast grids: the input costs 2 float32 images, not 6 float64 ones
r = np.hypot((yy - size / 2).astype(np.float32), (xx - size / 2).astype(np.float32))
mask = ((r > size * 0.3) & (r < size * 0.3 + 6)).astype(np.float32)
del r
image = 0.3 + 0.4 * mask
refine_array(model, image, mask, steps={steps}, tile={tile})
"""

REFINE_3D = """
import numpy as np, torch
from rnca_cli import load_model
from rnca_cli.refine import refine_array
torch.set_num_threads({threads})
model = load_model({model!r}, device={device!r})
n = {size}
zz, yy, xx = (g.astype(np.float32) - n / 2 for g in np.ogrid[:n, :n, :n])
r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
mask = ((r > n * 0.3) & (r < n * 0.3 + 4)).astype(np.float32)
del r
image = 0.3 + 0.4 * mask
refine_array(model, image, mask, steps={steps}, axis=2, batch=16)
"""

INFERENCE_DEFAULT_MALLOC = """
import json, resource, sys, torch
sys.path.insert(0, 'benchmarks')
from speed import Straightforward, ring_batch, side_by_side
from rnca_cli import inference, load_model
torch.set_num_threads({threads})
model = load_model({model!r})
naive = Straightforward(model)
image, mask = ring_batch(16)
seeds = torch.arange(16)
with torch.no_grad():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    naive.rollout(image, mask, {steps}, seeds)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    t = side_by_side({{"fast": lambda: inference.rollout(model, image, mask, {steps}, seeds),
                      "slow": lambda: naive.rollout(image, mask, {steps}, seeds)}}, {rounds})
per = 16 * {steps} / 1e3
print(json.dumps({{"rnca": t["fast"] / per, "straightforward": t["slow"] / per, "straightforward page faults": faults}}))
"""

STRAIGHT_2D = """
import numpy as np, torch, sys
sys.path.insert(0, 'benchmarks')
from speed import Straightforward
from rnca_cli import load_model
torch.set_num_threads({threads})
model = load_model({model!r})
size = {size}
with torch.no_grad():
    Straightforward(model).rollout(torch.rand(1, 1, size, size), torch.rand(1, size, size), {steps}, torch.tensor([0]))
"""


def cpu_rows(model_name: str, steps: int, quick: bool) -> dict:
    """Every CPU row of the table (module docstring), rnca against the straightforward formulation."""
    threads = torch.get_num_threads()
    model = load_model(model_name)
    naive = Straightforward(model)
    repeat = 1 if quick else 5  # rounds; each row keeps its fastest, the machine drifts by a third
    # The batch-16 inference row and the cost rows are timed in ``passes`` passes of
    # ``pass_rounds`` rounds (the cost rows one more): at the start, after the training rows and at
    # the end of the run, each keeping its fastest round over all passes. This machine's phases
    # last minutes: in run Z rnca's inference took 0.77 ms per image-step in its row and 0.67 ms a
    # few minutes later, and a row timed within one minute reported whichever phase it fell in.
    # Each pass's own ratio is reported as well.
    passes, pass_rounds = (1, 1) if quick else (3, 3)
    rows: dict[str, dict] = {}

    # 1. inference, batch 16 of 64x64, and exactness
    image, mask = ring_batch(16)
    seeds = torch.arange(16)
    with torch.no_grad():
        fast = inference.rollout(model, image, mask, steps, seeds)
        slow = visible(naive.rollout(image, mask, steps, seeds))
        max_diff = float((fast - slow).abs().max())
    per = 16 * steps / 1e3  # image-steps per batch rollout, in thousands: seconds -> ms per image-step
    inference_row = "inference ms / 64x64 image / step"
    rows[inference_row] = {}  # filled after the last pass
    inference_passes: list[dict] = []  # per pass: fastest round of each formulation, s

    def inference_pass() -> None:
        with torch.no_grad():
            inference_passes.append(side_by_side({
                "fast": lambda: inference.rollout(model, image, mask, steps, seeds),
                "pytorch": lambda: inference.rollout(model, image, mask, steps, seeds, engine="sparse"),
                "slow": lambda: naive.rollout(image, mask, steps, seeds)}, pass_rounds))

    # 4. cost follows the work (timed in passes, like row 1): 512x512 images with 16, 4 and 1 rings;
    #    every cell is alive at step 0 (visible floor 0.1), the model prunes the background within
    #    ~10 steps. Each step's wall time comes from the rollout itself (stats["step_seconds"],
    #    minimum over rounds that alternate the three images): the all-alive step is step 0, the
    #    steady state steps 16..63. Timing steps inside one rollout keeps the drift of this
    #    machine out of the comparison.
    size = 512 if not quick else 256
    late_from = steps // 4
    grids = {n: ring_grid(size, n) for n in (4, 2, 1)}
    alive_late = {}
    with torch.no_grad():
        for n, (s_img, s_mask) in grids.items():  # alive share of steps 16..63, from the stats of two runs
            shares = {}
            for count in (late_from, steps):
                stats: dict = {}
                inference.rollout(model, s_img, s_mask, count, torch.tensor([0]), stats=stats)
                shares[count] = stats["alive_share"] * count
            alive_late[n] = (shares[steps] - shares[late_from]) / (steps - late_from)
    cost_rows = {n: f"{size}x{size}, {n * n} ring(s): steady-state step vs all-alive step" for n in grids}
    rows.update({name: {} for name in cost_rows.values()})  # filled after the last pass
    cost_passes: list[dict] = []  # per pass: ring count -> each step's fastest time over the pass's rounds, s

    def cost_pass() -> None:
        best: dict = {}
        with torch.no_grad():
            for _ in range(pass_rounds + 1):
                for n, (s_img, s_mask) in grids.items():
                    stats = {}
                    inference.rollout(model, s_img, s_mask, steps, torch.tensor([0]), stats=stats)
                    times = stats["step_seconds"]
                    best[n] = [min(a, b) for a, b in zip(best.get(n, times), times)]
        cost_passes.append(best)

    def cost_ratio(step_seconds: list, n: int) -> tuple[float, float, float]:
        """(steady-state step, all-alive step, (step / all-alive) / alive share) from per-step times."""
        dense, late = step_seconds[0], sum(step_seconds[late_from:]) / (steps - late_from)
        return late, dense, late / dense / alive_late[n]

    inference_pass()
    cost_pass()

    # 1b. the MLP in half precision (--precision): time and agreement with float32
    with torch.no_grad():
        t = side_by_side({p: (lambda p=p: inference.rollout(model, image, mask, steps, seeds, precision=p))
                          for p in PRECISION_NAMES}, repeat)
        for p in ("bf16", "fp16"):
            half = inference.rollout(model, image, mask, steps, seeds, precision=p)
            rows[f"inference with --precision {p}, ms / image / step"] = {
                "rnca": t[p] / per, "rnca fp32": t["fp32"] / per, "time vs fp32": t[p] / t["fp32"],
                "mask agreement with fp32": float(((half >= 0.5) == (fast >= 0.5)).float().mean()),
                "mean |diff| vs fp32": float((half - fast).abs().mean()),
            }

    # 2. training iteration, batch 16, backward included
    model.train()
    target = (mask > 0.5).float()
    t = side_by_side({"fast": lambda: train_iteration(model, naive, image, mask, seeds, steps, True),
                      "pytorch": lambda: without_kernels(train_iteration, model, naive, image, mask, seeds, steps, True),
                      "slow": lambda: train_iteration(model, naive, image, mask, seeds, steps, False)}, repeat)
    t_fast, t_slow = t["fast"], t["slow"]
    rows[f"training s / iteration, all samples {steps} steps (batch 16)"] = {
        "rnca": t_fast, "straightforward": t_slow, "rnca in PyTorch alone": t["pytorch"],
        "speed-up in PyTorch alone": t_slow / t["pytorch"]}

    # 2b. the iteration rnca train runs: loss at t* ~ U[steps/2, steps] per sample (rnca_cli.train). rnca:
    #     rnca_cli.train.unroll, which drops a sample once its t* has passed; straightforward: every
    #     sample unrolled to max(t*), as the paper's loop does. Same t* draws, same loss.
    t_star = torch.randint(steps // 2, steps + 1, (16,), generator=torch.Generator().manual_seed(0))

    def real_iteration(fast: bool):
        state = model.initial_state(mask).contiguous(memory_format=torch.channels_last)
        noise = FireNoise(seeds, (64, 64))
        if fast:
            loss, _ = train.unroll(model, select_engine(image.device, torch.float32, model), state, image, target,
                                   noise, t_star)
        else:
            loss, features = 0.0, model.perceive_image(image)
            for t in range(1, int(t_star.max()) + 1):
                state = naive.step(state, features, noise, t - 1)
                hit = t_star == t
                if hit.any():
                    loss = loss + ((state[hit, 0] - target[hit]) ** 2).mean(dim=(1, 2)).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    t = side_by_side({"fast": lambda: real_iteration(True), "slow": lambda: real_iteration(False)}, repeat)
    t_fast, t_slow = t["fast"], t["slow"]
    model.eval()
    rows["training s / iteration as rnca train runs it (batch 16, t* per sample)"] = {
        "rnca": t_fast, "straightforward": t_slow, "mean t*": float(t_star.float().mean()), "max t*": int(t_star.max())}

    if passes > 1:  # second pass of the inference and cost rows, some ten minutes after the first
        inference_pass()
        cost_pass()

    # 3. one DRIVE-sized image
    h, w = (584, 565) if not quick else (146, 141)
    big_img, big_mask = torch.rand(1, 1, h, w), torch.from_numpy(
        np.pad(ring_batch(1, 128)[1][0].numpy(), ((0, h - 128), (0, w - 128))))[None]
    with torch.no_grad():
        t = side_by_side({"fast": lambda: inference.rollout(model, big_img, big_mask, steps, torch.tensor([0])),
                          "slow": lambda: naive.rollout(big_img, big_mask, steps, torch.tensor([0]))}, 2)
        t_fast, t_slow = t["fast"], t["slow"]
    rows[f"{h}x{w} image, {steps} steps, s"] = {"rnca": t_fast, "straightforward": t_slow}

    # 4b. the one-ring image end to end, and without block-sparse steps
    s_img, s_mask = ring_grid(size, 1)
    with torch.no_grad():
        t = side_by_side({
            "sparse": lambda: inference.rollout(model, s_img, s_mask, steps, torch.tensor([0])),
            "dense": lambda: inference.rollout(model, s_img, s_mask, steps, torch.tensor([0]), engine=whole_image_engine()),
            "slow": lambda: naive.rollout(s_img, s_mask, steps, torch.tensor([0]))}, 2)
        t_sparse, t_dense, t_slow = t["sparse"], t["dense"], t["slow"]
    rows[f"{size}x{size}, one ring, {steps} steps, s"] = {
        "rnca": t_sparse, "rnca without block-sparse steps": t_dense, "straightforward": t_slow}

    # 5. GEMM rate and the MLP's share of it
    n = 16 * 64 * 64
    a, bmat = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / best_of(lambda: a @ bmat, 5) / 1e9
    x = torch.randn(n, fc1_weight(model).shape[1])  # [state features, image patch, 1] rows
    with torch.no_grad():
        weights = mlp_weights(model)
        t_mlp = best_of(lambda: mlp(x, *weights), 5)
    mlp_flops = 2 * n * (x.shape[1] * model.config.hidden + model.config.hidden * model.config.channels)
    rows["float32 GEMM GFLOP/s (2048^3)"] = {"rnca": gemm}
    rows["per-pixel MLP GFLOP/s (65536 px)"] = {"rnca": mlp_flops / t_mlp / 1e9, "share of GEMM rate": mlp_flops / t_mlp / 1e9 / gemm}

    # 6. peak memory, fresh processes
    big = 4096 if not quick else 1024
    vol = 256 if not quick else 64
    fmt = dict(threads=threads, model=model_name, steps=steps, tile=inference.DEFAULT_TILE, device="cpu")
    rows[f"peak RSS GiB, {big}x{big} image"] = {"rnca": peak_rss_child(REFINE_2D.format(size=big, **fmt))}
    rows[f"peak RSS GiB, {vol}^3 volume"] = {"rnca": peak_rss_child(REFINE_3D.format(size=vol, **fmt))}
    mid = 1024 if not quick else 256
    rows[f"peak RSS GiB, {mid}x{mid} image"] = {
        "rnca": peak_rss_child(REFINE_2D.format(size=mid, **fmt)),
        "straightforward": peak_rss_child(STRAIGHT_2D.format(size=mid, **fmt)),
    }

    if passes > 2:  # last pass of the inference and cost rows
        inference_pass()
        cost_pass()
    t_fast, t_torch, t_slow = (min(p[name] for p in inference_passes) for name in ("fast", "pytorch", "slow"))
    rows[inference_row].update({
        "rnca": t_fast / per, "straightforward": t_slow / per, "max |diff| after all steps": max_diff,
        "speed-up per pass": [p["slow"] / p["fast"] for p in inference_passes],
        "rnca in PyTorch alone": t_torch / per, "speed-up in PyTorch alone": t_slow / t_torch})
    fresh = default_malloc_inference(threads, model_name, steps, pass_rounds)
    rows["inference in a fresh process, glibc malloc defaults, ms / image / step"] = {
        **fresh, "speed-up": fresh["straightforward"] / fresh["rnca"]}
    for n, name in cost_rows.items():
        best = [min(times) for times in zip(*(p[n] for p in cost_passes))]  # each step's fastest over all passes
        late, dense, ratio = cost_ratio(best, n)
        rows[name].update({
            "rnca ms / step": late * 1e3, "all-alive step ms": dense * 1e3, "alive share": alive_late[n],
            "step / all-alive step": late / dense, "(step / all-alive) / alive share": ratio,
            "target <= 3 met": ratio <= 3, "ratio per pass": [cost_ratio(p[n], n)[2] for p in cost_passes]})

    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="rings")
    parser.add_argument("--device", default="cpu",
                        help="cpu: the CPU table; cuda or cuda:N: the GPU rows (device_rows) on that GPU")
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller sizes (a smoke run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    no_faults = keep_freed_memory()  # first: every allocation after it follows the new settings
    torch.manual_seed(0)
    try:
        device = resolve_device(args.device)
    except RncaError as error:
        parser.error(str(error))
    steps = 8 if args.quick else 64
    if device.type == "cpu":
        rows = cpu_rows(args.model, steps, args.quick)
    else:
        rows = device_rows(args.model, device, steps, 1 if args.quick else 5, args.quick)
    for name, row in rows.items():
        if "straightforward" in row and row.get("rnca"):
            key = "straightforward / rnca memory" if "RSS" in name else "speed-up"
            row[key] = row["straightforward"] / row["rnca"]
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "cuda": torch.cuda.is_available(),
               "malloc keeps freed memory (no page faults in timings)": no_faults,
               "engine": select_engine(torch.device("cpu"), torch.float32, RNCA()).name,
               "compiled kernels": kernels.status() or "built"}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(machine))

    def show(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "[" + ", ".join(map(show, v)) + "]" if isinstance(v, list) else str(v)

    for name, row in rows.items():
        print(f"{name:42} " + "  ".join(f"{k}={show(v)}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "steps": steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
