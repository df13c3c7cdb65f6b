"""The rNCA update rule (DESIGN §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnca_cli.device import float32_convolutions
from rnca_cli.model import (RNCA, FireNoise, ModelConfig, count_parameters, draw_seeds, flat_nonzero, near, needed,
                             row_chunks, row_updates, visible)

from conftest import requires_cuda, tiny_model


def inputs(b=2, c=1, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g), torch.rand(b, h, w, generator=g)


def test_output_shapes():
    model = tiny_model()
    image, mask = inputs()
    state, history = model.rollout(image, mask, steps=5, generator=torch.Generator().manual_seed(0), record=True)
    assert state.shape == (2, 4, 12, 10)
    assert history.shape == (5, 2, 12, 10)
    assert model(image, mask, steps=3).shape == (2, 12, 10)
    assert torch.equal(history[-1], state[:, 0])


def test_paper_sized_model_has_k16_and_128_hidden():
    model = RNCA()
    assert model.config.channels == 16 and model.config.hidden == 128
    # state filters 16*3*9, image conv 48*9, fc1 (48+48)*128 + 128, fc2 128*16 + 16
    assert count_parameters(model) == 432 + 432 + 96 * 128 + 128 + 128 * 16 + 16


def test_initial_state_floors_visible_and_zeroes_latent():
    model = tiny_model()
    mask = torch.tensor([[[0.0, 0.05], [0.5, 1.0]]])
    state = model.initial_state(mask)
    assert torch.allclose(state[0, 0], torch.tensor([[0.1, 0.1], [0.5, 1.0]]))
    assert torch.count_nonzero(state[:, 1:]) == 0


def test_alive_masking_zeroes_dead_cells():
    model = tiny_model()
    image = torch.rand(1, 1, 16, 16)
    state = torch.zeros(1, 4, 16, 16)
    state[0, :, 2:4, 2:4] = 0.9  # a live blob in one corner
    state[0, 1:, 12, 12] = 5.0  # latent values in a cell whose visible neighbourhood is empty
    state = state.contiguous(memory_format=torch.channels_last)
    out = model.step(state, model.image_patches(image), FireNoise(torch.tensor([0]), (16, 16)), 0)
    pre = F.max_pool2d(state[:, :1], 3, 1, 1) >= 0.1
    dead = ~pre[0, 0]
    assert dead[12, 12]
    assert torch.count_nonzero(out[0][:, dead]) == 0  # whole state vector zeroed
    assert torch.count_nonzero(out[0][:, ~dead]) > 0


def test_fixed_generator_gives_identical_runs():
    model = tiny_model()
    image, mask = inputs()
    a = model(image, mask, 8, torch.Generator().manual_seed(3))
    b = model(image, mask, 8, torch.Generator().manual_seed(3))
    c = model(image, mask, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("fire_rate", [0.0, 1.0])
def test_deterministic_fire_rates_ignore_the_generator(fire_rate):
    model = tiny_model(fire_rate=fire_rate)
    image, mask = inputs()
    a = model(image, mask, 6, torch.Generator().manual_seed(1))
    b = model(image, mask, 6, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    if fire_rate == 0.0:  # nothing updates: only the initial clamp and alive masking act
        initial = visible(model.initial_state(mask))
        assert torch.equal(a, initial)


def test_per_sample_generators_make_a_case_independent_of_its_batch():
    model = tiny_model()
    image, mask = inputs(b=3)
    batched = model(image, mask, 6, [torch.Generator().manual_seed(7) for _ in range(3)])
    alone = model(image[1:2], mask[1:2], 6, [torch.Generator().manual_seed(7)])
    assert torch.allclose(batched[1], alone[0], atol=1e-6)


def reference_step(model: RNCA, state, image, fire):
    """The paper's formulation written plainly: NCHW convs, image features concatenated each step."""
    k = model.config.channels
    f_state = F.conv2d(state, model.state_filters, padding=1, groups=k)
    f_image = model.image_conv(image)
    w1 = torch.cat([model.fc1_state.weight, model.fc1_image.weight], dim=1)
    feats = torch.cat([f_state, f_image], dim=1)
    hidden = torch.relu(F.conv2d(feats, w1[:, :, None, None], model.fc1_image.bias))
    delta = F.conv2d(hidden, model.fc2.weight[:, :, None, None], model.fc2.bias)
    pre = F.max_pool2d(state[:, :1], 3, 1, 1) >= model.config.alive_threshold
    new = state + delta * fire
    post = F.max_pool2d(new[:, :1], 3, 1, 1) >= model.config.alive_threshold
    return new * (pre & post)


@pytest.mark.parametrize("grad", [False, True])
def test_folded_image_patches_equal_concatenating_image_features(grad, engine):
    model = tiny_model()
    image, mask = inputs()
    state = model.initial_state(mask)
    ref = state.contiguous()
    patches = model.image_patches(image)
    noise = FireNoise(torch.tensor([1, 2]), (12, 10))
    with torch.set_grad_enabled(grad):
        for step in range(10):
            state = model.step(state, patches, noise, step)
            ref = reference_step(model, ref, image, model.fire_mask(noise, step))
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
    assert torch.equal(needed(near(visible_cells), visible_cells, fire), expected)


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
    patches = model.image_patches(image)
    skipped = 0
    for t in range(6):
        noise = FireNoise(torch.tensor([t, t + 10]), (16, 16))
        fire = model.fire_mask(noise, t)
        pre = model.alive(state[:, :1])[:, 0]
        left_out = near(pre) & fire[:, 0] & ~needed(pre, state[:, 0] >= model.config.alive_threshold, fire[:, 0])
        skipped += int(left_out.sum())
        with torch.no_grad():
            ref = reference_step(model, state.contiguous(), image, fire)
            assert torch.allclose(model.step(state, patches, noise, t), ref, atol=1e-5)
    assert skipped > 20  # the pruning was exercised


def test_gradients_equal_those_of_the_concatenating_formulation(engine):
    """The gathered, chunk-recomputing step trains exactly like the paper's formulation."""
    model = tiny_model()
    image, mask = inputs()
    target = (mask > 0.5).float()
    noise = FireNoise(torch.tensor([3, 4]), (12, 10))
    grads = []
    for fast in (True, False):
        model.zero_grad()
        state = model.initial_state(mask)
        patches = model.image_patches(image)
        ref = state.contiguous()
        for step in range(8):
            if fast:
                state = model.step(state, patches, noise, step)
            else:
                ref = reference_step(model, ref, image, model.fire_mask(noise, step))
        final = state if fast else ref
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
    maps = model.perceive(state.contiguous(memory_format=torch.channels_last), padding=0)  # 7x9 interior
    neighbourhoods = F.unfold(state, 3).view(2, k, 9, 63).permute(0, 3, 2, 1).reshape(2 * 63, 9 * k)  # (dy, dx), c
    torch.testing.assert_close(neighbourhoods @ model.perception_matrix(), torch.cat(maps, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags, positions", [([], []), ([False] * 3, []), ([True] * 3, [0, 1, 2]),
                                              ([False, True, False, True, True], [1, 3, 4])])
def test_flat_nonzero_lists_the_true_positions_as_int64(flags, positions):
    found = flat_nonzero(torch.tensor(flags, dtype=torch.bool))
    assert found.dtype == torch.int64 and found.tolist() == positions


def test_flat_nonzero_reads_views_and_inference_tensors():
    with torch.inference_mode():
        grid = torch.zeros(4, 6, dtype=torch.bool)
        grid[1, 2] = grid[3, 5] = True
        assert flat_nonzero(grid.view(-1)).tolist() == [8, 23]
        assert flat_nonzero(grid[:, 5]).tolist() == [3]  # a strided column


@pytest.mark.parametrize("n, sizes", [(0, []), (5, [5]), (2048, [2048]), (2300, [2300]), (3100, [1550, 1550]),
                                      (5000, [2500, 2500]), (7000, [2334, 2334, 2332])])
def test_row_chunks_are_balanced_and_cover_the_rows(n, sizes):
    chunks = list(row_chunks(n))
    assert [len(range(n)[c]) for c in chunks] == sizes


def test_row_updates_backward_matches_autograd(monkeypatch):
    """The gathering, chunk-recomputing MLP node has the exact gradient of its forward."""
    monkeypatch.setattr("rnca_cli.model._MLP_CHUNK", 7)  # several chunks, one ragged
    model = tiny_model().double()
    k, f = model.config.channels, model.config.filters
    maps = [torch.randn(40, k, dtype=torch.float64, requires_grad=True) for _ in range(f)]
    patches = torch.randn(40, 10, dtype=torch.float64)
    weights = [w.detach().requires_grad_() for w in model.mlp_weights()]
    rows = torch.tensor([0, 3, 4, 9, 17, 18, 25, 26, 30, 31, 33, 38, 39])  # distinct, 13 of 40

    def fn(*args):
        return row_updates(rows, args[:3], patches, args[3:])

    assert torch.autograd.gradcheck(fn, (*weights, *maps))
    # the same node on features gathered already (rnca_cli.fused.perceive_rows's output)
    features = torch.randn(len(rows), f * k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: row_updates(rows, a[:3], patches, a[3:], gathered=True),
                                    (*weights, features))
    with pytest.raises(ValueError, match="image patches are data"):
        row_updates(rows, weights, patches.requires_grad_(), maps)


def test_fire_noise_is_uniform_deterministic_and_tile_consistent():
    noise = FireNoise(torch.tensor([0, 1]), (64, 64))
    u = noise.uniform(0)
    assert u.shape == (2, 1, 64, 64) and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float((u < 0.5).float().mean()) - 0.5) < 0.02
    assert torch.equal(u, noise.uniform(0)) and not torch.equal(u, noise.uniform(1))
    assert not torch.equal(u[0], u[1])
    tile = FireNoise(torch.tensor([0, 1]), (10, 12), origin=(20, 30)).uniform(7)
    assert torch.equal(tile, noise.uniform(7)[:, :, 20:30, 30:42])


@pytest.mark.parametrize("rate", [0.5, 0.1, 1 / 3, 0.9, 2.0**-24, 1 - 2.0**-24, 1 - 2.0**-26, 0.0])
def test_fires_is_exactly_the_draw_below_the_rate(rate):
    keys = FireNoise(torch.tensor([3, 12345]), (40, 50), origin=(7, 9)).keys
    for t in (0, 1, 63):
        assert torch.equal(FireNoise.fires(keys, t, rate), FireNoise.draw(keys, t) < rate)


def test_seeds_from_generators():
    a = draw_seeds(3, "cpu", torch.Generator().manual_seed(0))
    b = draw_seeds(3, "cpu", torch.Generator().manual_seed(0))
    assert a.dtype == torch.int64 and torch.equal(a, b) and len(set(a.tolist())) == 3
    per_sample = draw_seeds(2, "cpu", [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)])
    assert per_sample[0] == per_sample[1]
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        draw_seeds(3, "cpu", [torch.Generator(), torch.Generator()])


def test_zero_initialised_last_layer_leaves_state_unchanged_on_first_step():
    model = RNCA(ModelConfig(channels=4, hidden=8))  # fresh: fc2 is zero
    image, _ = inputs()
    mask = torch.full((2, 12, 10), 0.7)  # every cell alive before and after
    state = model.initial_state(mask)
    out = model.step(state, model.image_patches(image), FireNoise(torch.tensor([0, 0]), (12, 10)), 0)
    assert torch.equal(out, state)


@pytest.mark.parametrize(
    "bad", [dict(channels=0), dict(filters=5), dict(fire_rate=1.5), dict(alive_threshold=-0.1), dict(hidden=0)]
)
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValueError, match="ModelConfig"):
        ModelConfig(**bad)


def test_config_round_trips_through_dict():
    config = ModelConfig(channels=8, filters=4, image_channels=3)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


@requires_cuda
def test_update_masks_are_the_same_on_cuda():
    """The hash is integer arithmetic, so a GPU draws exactly the CPU's update masks."""
    seeds = torch.tensor([0, 5, (1 << 62) - 1])
    cpu = FireNoise(seeds, (37, 41), origin=(3, 900))
    gpu = FireNoise(seeds.cuda(), (37, 41), origin=(3, 900))
    assert torch.equal(cpu.keys, gpu.keys.cpu())
    for t in (0, 1, 63, 1000):
        assert torch.equal(FireNoise.draw(cpu.keys, t), FireNoise.draw(gpu.keys, t).cpu())
        assert torch.equal(FireNoise.fires(cpu.keys, t, 0.5), FireNoise.fires(gpu.keys, t, 0.5).cpu())


@requires_cuda
def test_training_gradients_on_cuda_match_the_cpu():
    """Training's differentiated step computes the same loss and gradients on a GPU, to float rounding."""
    image, mask = inputs(b=3, h=20, w=18)
    target = (mask > 0.5).float()
    results = []
    for device in ("cpu", "cuda"):
        model = tiny_model().to(device)
        noise = FireNoise(torch.tensor([3, 4, 5], device=device), (20, 18))
        state, patches = model.initial_state(mask.to(device)), model.image_patches(image.to(device))
        with float32_convolutions(torch.device(device)):  # as rnca_cli.train.train runs its loop
            for step in range(10):
                state = model.step(state, patches, noise, step)
            loss = ((state[:, 0] - target.to(device)) ** 2).mean()
            loss.backward()
        results.append((float(loss.detach()), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) = results
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for g in grads_cpu.values())
