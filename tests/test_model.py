"""The rNCA update rule (rnca_cli.model): the reference every engine is tested against."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnca_cli.model import RNCA, FireNoise, ModelConfig, count_parameters, draw_seeds, visible

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
    out = model.step(state, model.perceive_image(image), FireNoise(torch.tensor([0]), (16, 16)), 0)
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


R = [0.2, 0.2, 0.2, 0.2]  # a row of grown neighbours


@pytest.mark.parametrize("bias, fire_rate, expected", [
    (0.2, 1.0, [R, [0.2, 0.7, 0.7, 0.2], [0.2, 0.7, 0.7, 0.2], R]),  # every cell grows; the alive ones stay
    (-0.5, 1.0, [[0.0] * 4] * 4),  # every visible value drops below the threshold: nothing stays alive
    (0.2, 0.0, [[0.0] * 4, [0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0] * 4]),  # no cell fires
])
def test_one_step_of_known_values(bias, fire_rate, expected):
    """A 2x2 square of visible 0.5 in a 6x6 state, fc2's weight zero and its visible bias ``bias``:
    the cells that fire add the bias; the cells within a pixel of the square are alive before the
    step, and they are kept if also alive after it; all others end at zero."""
    model = RNCA(ModelConfig(channels=2, hidden=4, fire_rate=fire_rate, visible_floor=0.0))
    with torch.no_grad():
        model.fc2.bias.copy_(torch.tensor([bias, 0.0]))
    mask = torch.zeros(1, 6, 6)
    mask[0, 2:4, 2:4] = 0.5
    state = model.initial_state(mask)
    out = model.step(state, model.perceive_image(torch.rand(1, 1, 6, 6)), FireNoise(torch.tensor([0]), (6, 6)), 0)
    full = torch.zeros(6, 6)
    full[1:5, 1:5] = torch.tensor(expected)
    assert torch.allclose(out[0, 0], full, atol=1e-6)
    assert torch.count_nonzero(out[0, 1]) == 0  # the latent channel's bias is 0


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
    out = model.step(state, model.perceive_image(image), FireNoise(torch.tensor([0, 0]), (12, 10)), 0)
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
