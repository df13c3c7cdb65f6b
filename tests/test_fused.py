"""The fused engine and its compiled kernels (rnca_cli.engines.fused, rnca_cli.kernels, _fused.c):
built where a C compiler is, equal to the reference rule for every model shape they take, refused
cleanly where they cannot run, and never handed a tensor the C code would misread."""

from __future__ import annotations

import shutil
import sysconfig

import pytest
import torch

from rnca_cli import inference, kernels
from rnca_cli.engines import precision_dtype
from rnca_cli.engines import rows as R, select_engine
from rnca_cli.engines.fused import FusedEngine, perceive_rows
from rnca_cli.errors import UsageError
from rnca_cli.model import RNCA, ModelConfig, visible

from conftest import requires_kernels



def test_kernels_are_built_wherever_a_c_compiler_is():
    """setup.py builds them optionally; a silent build failure would leave every user (and CI)
    on the slower path while the fused tests skip, so a compiler without kernels is a failure."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine")
    assert kernels.status() is None, kernels.status()
    assert kernels._fused is not None


def strong_model(channels: int, filters: int, fire_rate: float = 0.5, seed: int = 0) -> RNCA:
    """Large, varied updates: visible cells die and dead ones cross the alive threshold every
    step, so the alive tests, ``needed`` and clearing all decide something."""
    torch.manual_seed(seed)
    model = RNCA(ModelConfig(channels=channels, filters=filters, hidden=16, fire_rate=fire_rate, visible_floor=0.0))
    torch.nn.init.normal_(model.fc2.weight, std=0.3)
    with torch.no_grad():
        model.fc2.bias[0] = -0.05
        model.state_filters.add_(0.1 * torch.randn_like(model.state_filters))  # learnt filters, not the fixed ones
    return model.eval()


def case(shape, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, *shape, generator=g)
    mask = (torch.rand(batch, *shape, generator=g) > 0.7).float() * torch.rand(batch, *shape, generator=g)
    return image, mask


def reference(model, image, mask, steps, seeds):
    with torch.no_grad():
        return visible(model.rollout(image, mask, steps, seeds=seeds)[0])


@requires_kernels
@pytest.mark.parametrize("channels, filters, fire_rate", [
    (16, 3, 0.5),  # the paper's model: the 16-channel vector kernel
    (16, 1, 0.5), (16, 4, 0.5),  # its other filter counts
    (4, 3, 0.5), (20, 2, 0.5), (5, 4, 0.5),  # the generic kernel
    (16, 3, 1.0),  # every cell fires: no hash
    (4, 2, 0.0),  # no cell fires: nothing is updated, cells only die
])
@pytest.mark.parametrize("shape", [(48, 64), (37, 21)])  # whole blocks; padding to whole blocks
@pytest.mark.parametrize("sparse", [False, True])
def test_fused_rollout_equals_the_reference(channels, filters, fire_rate, shape, sparse):
    model = strong_model(channels, filters, fire_rate)
    image, mask = case(shape)
    seeds = torch.tensor([3, 11])
    stats = {}
    out = inference.rollout(model, image, mask, 12, seeds, stats=stats, engine=FusedEngine(skip_blocks=sparse))
    ref = reference(model, image, mask, 12, seeds)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if fire_rate > 0:
        assert stats["update_share"] > 0.05  # the MLP ran on many cells
    assert int((ref > 0.1).sum()) > 0  # and something is left alive to compare


@requires_kernels
def test_fused_and_pytorch_steps_agree_on_the_shipped_model():
    """The paper-sized model on a batch of rings, 32 steps: both engines within float rounding."""
    from rnca_cli import load_model

    model = load_model("rings")
    image, mask = case((64, 64), batch=4, seed=1)
    seeds = torch.arange(4) * 7919
    a = inference.rollout(model, image, mask, 32, seeds, engine="fused")
    b = inference.rollout(model, image, mask, 32, seeds, engine="sparse")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@requires_kernels
def test_fused_steps_skip_dead_blocks_and_stay_exact():
    """One small object in a large image: after the first steps only the blocks around it run."""
    model = strong_model(16, 3)
    with torch.no_grad():
        model.fc2.bias[0] = -0.15  # drains where the mask does not hold it
    image, _ = case((160, 160), batch=1)
    mask = torch.zeros(1, 160, 160)
    mask[0, 60:80, 70:95] = 1.0
    stats = {}
    out = inference.rollout(model, image, mask, 20, torch.tensor([5]), stats=stats, engine="fused")
    assert stats["sparse_steps"] == 20 and stats["block_share"] < 0.2
    torch.testing.assert_close(out, reference(model, image, mask, 20, torch.tensor([5])), atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting, why", [
    ({"precision": "bf16"}, "float32 only"),
    ({"env": "0"}, "RNCA_FUSED=0"),
])
def test_the_fused_engine_refuses_what_the_kernels_cannot_run(setting, why, monkeypatch):
    model = strong_model(4, 3)
    image, mask = case((16, 16), batch=1)
    if "env" in setting:
        monkeypatch.setenv("RNCA_FUSED", setting["env"])
    precision = setting.get("precision", "fp32")
    with pytest.raises(UsageError, match=why):
        inference.rollout(model, image, mask, 2, torch.tensor([0]), precision=precision, engine="fused")
    assert select_engine(torch.device("cpu"), precision_dtype(precision), model).name == "sparse"


@pytest.mark.parametrize("config, why", [
    (ModelConfig(channels=80, filters=4), "at most 256 perception features"),
    (ModelConfig(alive_threshold=0.0), "alive threshold above 0"),
])
def test_models_beyond_the_kernels_use_the_sparse_engine(config, why):
    model = RNCA(config)
    assert why in FusedEngine().unavailable(torch.device("cpu"), torch.float32, model)
    assert select_engine(torch.device("cpu"), torch.float32, model).name == "sparse"


def test_status_says_whether_the_kernels_run(monkeypatch):
    monkeypatch.setenv("RNCA_FUSED", "0")
    assert kernels.status() == "switched off (RNCA_FUSED=0)"
    monkeypatch.delenv("RNCA_FUSED")
    assert kernels.status() is None or kernels.status().startswith("not built")


# -- the typed boundary: a wrong tensor raises before any pointer reaches C ---------------------------


def perceive_args(**change):
    """Valid arguments of kernels.perceive_rows (2 images of 6x6, 16 channels, 3 filters), with
    ``change`` replacing some."""
    args = {"cells": torch.zeros(2, 6, 6, 16), "rows": torch.tensor([0, 7, 40]), "filters": torch.zeros(3, 9, 16),
            "out": torch.zeros(3, 48), "threads": 1}
    return {**args, **change}


@requires_kernels
@pytest.mark.parametrize("change, message", [
    ({"cells": torch.zeros(2, 6, 6, 16, dtype=torch.float64)}, "cells must be torch.float32, not torch.float64"),
    ({"cells": torch.zeros(2, 6, 16, 6).transpose(2, 3)}, "cells must be contiguous"),
    ({"cells": torch.zeros(2, 6, 6)}, r"cells must have shape \(\*, \*, \*, \*\)"),
    ({"rows": torch.tensor([0, 7, 72])}, r"rows must ascend and lie in \[0, 72\)"),  # checked in C
    ({"rows": torch.tensor([0, 7, 40], dtype=torch.int32)}, "rows must be torch.int64"),
    ({"rows": torch.tensor([7, 0, 40])}, "rows must ascend"),
    ({"filters": torch.zeros(5, 9, 16)}, "takes 1-4 filters"),
    ({"filters": torch.zeros(3, 9, 8)}, r"filters must have shape \(\*, 9, 16\)"),
    ({"out": torch.zeros(2, 48)}, r"out must have shape \(3, 48\)"),
    ({"out": "not a tensor"}, "out must be a tensor"),
])
def test_kernels_refuse_tensors_the_c_code_would_misread(change, message):
    with pytest.raises(ValueError, match="perceive_rows: " + message):
        kernels.perceive_rows(**perceive_args(**change))
    kernels.perceive_rows(**perceive_args())  # the valid call runs


def step_buffers(**change):
    """Valid buffers of kernels.StepKernels: one image of one 16x16 block plus its ring, 4
    channels, 3 filters, with ``change`` replacing some."""
    n = 20 * 20
    args = {"flat": torch.zeros(n, 4), "bright": torch.zeros(n, dtype=torch.uint8),
            "keys": torch.zeros(n, dtype=torch.int64), "inside": torch.ones(n, dtype=torch.uint8),
            "patches": torch.zeros(n, 10), "filters": torch.zeros(3, 9, 4), "hr": 20, "wr": 20,
            "todo": torch.zeros(1, 16, dtype=torch.int32), "pre": torch.zeros(1, 16, dtype=torch.int32),
            "keep": torch.zeros(1, 16, dtype=torch.int32), "flags": torch.zeros(1, 9, dtype=torch.uint8),
            "counts": torch.zeros(1, dtype=torch.int64), "reach": torch.zeros(1, dtype=torch.bool)}
    return {**args, **change}


@requires_kernels
@pytest.mark.parametrize("change, message", [
    ({"hr": 19}, "a 19x20 buffer is not whole 16x16 blocks"),
    ({"keys": torch.zeros(400, dtype=torch.int32)}, "keys must be torch.int64"),
    ({"bright": torch.zeros(399, dtype=torch.uint8)}, r"bright must have shape \(400\)"),
    ({"todo": torch.zeros(2, 16, dtype=torch.int32)}, r"todo must have shape \(1, 16\)"),
    ({"reach": torch.zeros(1, dtype=torch.uint8)}, "reach must be torch.bool"),
])
def test_step_kernels_refuse_bad_buffers(change, message):
    with pytest.raises(ValueError, match="StepKernels: " + message):
        kernels.StepKernels(**step_buffers(**change))


@requires_kernels
def test_step_kernels_refuse_bad_blocks_and_rows_before_touching_memory():
    step = kernels.StepKernels(**step_buffers())
    assert step.select(torch.tensor([0]), 0, 0, False, False, 1) == (0, 0)  # nothing bright: nothing to do
    with pytest.raises(ValueError, match=r"select: blocks must lie in \[0, 1\)"):  # checked in C
        step.select(torch.tensor([1]), 0, 0, False, False, 1)
    with pytest.raises(ValueError, match="select: blocks must be torch.int64"):
        step.select(torch.tensor([0], dtype=torch.int32), 0, 0, False, False, 1)
    with pytest.raises(ValueError, match=r"gather: x must have shape \(2, 22\)"):  # 3 x 4 features + 10 patch
        step.gather(torch.tensor([0]), torch.zeros(2, 21), torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 1)
    step.counts[0] = 5  # five cells chosen, room for two
    with pytest.raises(ValueError, match="gather: 5 rows chosen, the outputs hold 2"):
        step.gather(torch.tensor([0]), torch.zeros(2, 22), torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=r"scatter: rows must lie in \[0, 400\)"):
        step.scatter(torch.tensor([0]), torch.zeros(1, 4), torch.tensor([400]), 0.1, 1)


@requires_kernels
@pytest.mark.parametrize("channels, filters", [(16, 3), (16, 4), (5, 2)])  # vector kernel; generic
@pytest.mark.parametrize("state_grad", [True, False])
def test_perceive_rows_and_its_gradient_equal_perceive(channels, filters, state_grad):
    """Training's perception of the updated cells equals the rows of ``RNCA.perceive`` (zero
    padding at the image border), and so do the gradients for the state and the filters."""
    model = RNCA(ModelConfig(channels=channels, filters=filters))
    with torch.no_grad():
        model.state_filters.normal_()  # learnt filters differ per channel
    g = torch.Generator().manual_seed(0)
    state = torch.randn(3, channels, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    rows = torch.randperm(3 * 7 * 9, generator=g)[:80].sort().values  # ascending, border cells included
    grad = torch.randn(80, filters * channels, generator=g)
    results = []
    for use_kernel in (True, False):
        model.zero_grad()
        s = state.clone().requires_grad_(state_grad)
        if use_kernel:
            out = perceive_rows(s, model.state_filters, rows)
        else:
            out = torch.cat(R.perceive_maps(model, s), 1)[rows]
        (out * grad).sum().backward()
        results.append((out.detach(), s.grad, model.state_filters.grad.clone()))
    (out, g_state, g_filters), (ref, ref_state, ref_filters) = results
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_filters, ref_filters, atol=1e-4, rtol=1e-5)
    if state_grad:
        torch.testing.assert_close(g_state, ref_state, atol=1e-5, rtol=1e-5)


@requires_kernels
def test_perceive_rows_refuses_unsorted_rows():
    model = RNCA(ModelConfig(channels=16))
    state = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    with pytest.raises(ValueError, match="perceive_rows: rows must ascend"):
        perceive_rows(state, model.state_filters, torch.tensor([5, 2]))


@requires_kernels
@pytest.mark.parametrize("channels", [16, 5])  # the vector kernel and the generic one
def test_perceive_rows_gradient_is_the_same_at_any_thread_count(channels):
    """The filter gradient is summed per image in image order, so training is reproducible from
    its seed whatever the thread count (per-thread sums added as threads finished were not)."""
    model = RNCA(ModelConfig(channels=channels, filters=3))
    g = torch.Generator().manual_seed(1)
    state = torch.randn(8, channels, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
    rows = torch.randperm(8 * 12 * 12, generator=g)[:600].sort().values
    grad = torch.randn(600, 3 * channels, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 1, 2, 3):
            torch.set_num_threads(threads)
            model.zero_grad()
            s = state.clone().requires_grad_()
            (perceive_rows(s, model.state_filters, rows) * grad).sum().backward()
            results.append((s.grad, model.state_filters.grad.clone()))
    finally:
        torch.set_num_threads(before)
    for g_state, g_filters in results[1:]:
        assert torch.equal(g_state, results[0][0]) and torch.equal(g_filters, results[0][1])
