"""The row formulation (rnca_cli.engines.rows) that the sparse and fused engines share, and the
engines' differentiable steps: equal to the rule of rnca_cli.model, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnca_cli.device import float32_convolutions
from rnca_cli.engines import rows as R, select_engine
from rnca_cli.model import FireNoise

from conftest import requires_cuda, tiny_model


def inputs(b=2, c=1, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g), torch.rand(b, h, w, generator=g)


def training_engine(name: str, model):
    return select_engine(torch.device("cpu"), torch.float32, model, name)


@pytest.mark.parametrize("grad", [False, True])
def test_train_steps_equal_the_rule(grad, engine):
    """The folded image term, the gathered rows and (fused) the compiled perception give the
    rule's step, with and without autograd."""
    model = tiny_model()
    image, mask = inputs()
    fast = training_engine(engine, model)
    state = model.initial_state(mask).contiguous(memory_format=torch.channels_last)
    ref = state.contiguous()
    features = model.perceive_image(image)
    noise = FireNoise(torch.tensor([1, 2]), (12, 10))
    with torch.set_grad_enabled(grad):
        inputs_ = fast.training_inputs(model, image)
        for step in range(10):
            state = fast.train_step(model, state, inputs_, noise, step)
            ref = model.step(ref, features, noise, step)
    assert torch.allclose(state, ref, atol=1e-5)


@pytest.mark.parametrize("centre_fires, expected_rows", [
    (False, ["00000", "01110", "01110", "01110", "00000"]),  # the alive cells' survival is decided
    (True, ["11111", "11111", "11111", "11111", "11111"]),  # undecided: their dead neighbours count
])
def test_needed_leaves_out_dead_cells_next_to_decided_alive_cells(centre_fires, expected_rows):
    visible_cells = torch.zeros(1, 5, 5, dtype=torch.bool)
    visible_cells[0, 2, 2] = True  # one visible cell; the 3x3 block around it is alive
    fire = torch.zeros(1, 5, 5, dtype=torch.bool)
    fire[0, 2, 2] = centre_fires
    expected = torch.tensor([[c == "1" for c in row] for row in expected_rows])[None]
    assert torch.equal(R.needed(R.near(visible_cells), visible_cells, fire), expected)


def test_cells_left_out_of_a_step_do_not_change_it(engine):
    """Sparse visible cells make many dead cells with alive neighbours; leaving out those that
    ``needed`` rejects gives the paper's step exactly. The updates are made large and varied
    (visible cells can die, dead ones cross the threshold), so that this setting tells a correct
    ``needed`` from one that ignores the update mask or leaves out every dead cell: each of
    those changes 5-6 cells here."""
    model = tiny_model()
    torch.nn.init.normal_(model.fc2.weight, std=1.0)
    with torch.no_grad():
        model.fc2.bias[0] = -0.5
    image, _ = inputs(h=16, w=16)
    g = torch.Generator().manual_seed(5)
    state = torch.rand(2, 4, 16, 16, generator=g) * 0.05
    state[:, 1:] = torch.randn(2, 3, 16, 16, generator=g) * 3
    state[:, 0] += (torch.rand(2, 16, 16, generator=g) < 0.15) * 0.6  # isolated visible cells
    state = state.contiguous(memory_format=torch.channels_last)
    fast = training_engine(engine, model)
    inputs_, features = fast.training_inputs(model, image), model.perceive_image(image)
    skipped = 0
    for t in range(6):
        noise = FireNoise(torch.tensor([t, t + 10]), (16, 16))
        fire = model.fire_mask(noise, t)
        pre = model.alive(state[:, :1])[:, 0]
        left_out = R.near(pre) & fire[:, 0] & ~R.needed(pre, state[:, 0] >= model.config.alive_threshold, fire[:, 0])
        skipped += int(left_out.sum())
        with torch.no_grad():
            ref = model.step(state.contiguous(), features, noise, t)
            assert torch.allclose(fast.train_step(model, state, inputs_, noise, t), ref, atol=1e-5)
    assert skipped > 20  # the pruning was exercised


def test_gradients_equal_those_of_the_concatenating_formulation(engine):
    """The gathered, chunk-recomputing step trains exactly like the rule."""
    model = tiny_model()
    image, mask = inputs()
    target = (mask > 0.5).float()
    noise = FireNoise(torch.tensor([3, 4]), (12, 10))
    fast_engine, grads = training_engine(engine, model), []
    for fast in (True, False):
        model.zero_grad()
        state = model.initial_state(mask)
        inputs_ = fast_engine.training_inputs(model, image) if fast else model.perceive_image(image)
        for step in range(8):
            if fast:
                state = fast_engine.train_step(model, state, inputs_, noise, step)
            else:
                state = model.step(state, inputs_, noise, step)
        final = state
        ((final[:, 0] - target) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name
    assert any(float(g.abs().max()) > 0 for g in grads[0].values())


def test_perception_matrix_on_raw_neighbourhoods_equals_perceive():
    """Sparse inference steps perceive gathered 3x3 neighbourhoods with one matrix product."""
    model = tiny_model(3)
    with torch.no_grad():
        model.state_filters.normal_()  # learned filters differ per channel
    k = model.config.channels
    state = torch.randn(2, k, 9, 11)
    maps = R.perceive_maps(model, state.contiguous(memory_format=torch.channels_last), padding=0)  # 7x9 interior
    neighbourhoods = F.unfold(state, 3).view(2, k, 9, 63).permute(0, 3, 2, 1).reshape(2 * 63, 9 * k)  # (dy, dx), c
    torch.testing.assert_close(neighbourhoods @ R.perception_matrix(model), torch.cat(maps, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags, positions", [([], []), ([False] * 3, []), ([True] * 3, [0, 1, 2]),
                                              ([False, True, False, True, True], [1, 3, 4])])
def test_flat_nonzero_lists_the_true_positions_as_int64(flags, positions):
    found = R.flat_nonzero(torch.tensor(flags, dtype=torch.bool))
    assert found.dtype == torch.int64 and found.tolist() == positions


def test_flat_nonzero_reads_views_and_inference_tensors():
    with torch.inference_mode():
        grid = torch.zeros(4, 6, dtype=torch.bool)
        grid[1, 2] = grid[3, 5] = True
        assert R.flat_nonzero(grid.view(-1)).tolist() == [8, 23]
        assert R.flat_nonzero(grid[:, 5]).tolist() == [3]  # a strided column


@pytest.mark.parametrize("n, sizes", [(0, []), (5, [5]), (2048, [2048]), (2300, [2300]), (3100, [1550, 1550]),
                                      (5000, [2500, 2500]), (7000, [2334, 2334, 2332])])
def test_row_chunks_are_balanced_and_cover_the_rows(n, sizes):
    chunks = list(R.row_chunks(n))
    assert [len(range(n)[c]) for c in chunks] == sizes


def test_row_updates_backward_matches_autograd(monkeypatch):
    """The gathering, chunk-recomputing MLP node has the exact gradient of its forward."""
    monkeypatch.setattr("rnca_cli.engines.rows._MLP_CHUNK", 7)  # several chunks, one ragged
    model = tiny_model().double()
    k, f = model.config.channels, model.config.filters
    maps = [torch.randn(40, k, dtype=torch.float64, requires_grad=True) for _ in range(f)]
    patches = torch.randn(40, 10, dtype=torch.float64)
    weights = [w.detach().requires_grad_() for w in R.mlp_weights(model)]
    rows = torch.tensor([0, 3, 4, 9, 17, 18, 25, 26, 30, 31, 33, 38, 39])  # distinct, 13 of 40

    def fn(*args):
        return R.row_updates(rows, args[:3], patches, args[3:])

    assert torch.autograd.gradcheck(fn, (*weights, *maps))
    # the same node on features gathered already (the fused engine's perceive_rows output)
    features = torch.randn(len(rows), f * k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: R.row_updates(rows, a[:3], patches, a[3:], gathered=True),
                                    (*weights, features))
    with pytest.raises(ValueError, match="image patches are data"):
        R.row_updates(rows, weights, patches.requires_grad_(), maps)


@requires_cuda
def test_training_gradients_on_cuda_match_the_cpu():
    """Training's differentiated step computes the same loss and gradients on a GPU, to float rounding."""
    image, mask = inputs(b=3, h=20, w=18)
    target = (mask > 0.5).float()
    results = []
    for device in ("cpu", "cuda"):
        model = tiny_model().to(device)
        noise = FireNoise(torch.tensor([3, 4, 5], device=device), (20, 18))
        sparse = select_engine(torch.device(device), torch.float32, model, "sparse")
        state, inputs_ = model.initial_state(mask.to(device)), sparse.training_inputs(model, image.to(device))
        with float32_convolutions(torch.device(device)):  # as rnca_cli.train.train runs its loop
            for step in range(10):
                state = sparse.train_step(model, state, inputs_, noise, step)
            loss = ((state[:, 0] - target.to(device)) ** 2).mean()
            loss.backward()
        results.append((float(loss.detach()), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) = results
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for g in grads_cpu.values())
