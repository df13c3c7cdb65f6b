"""The engines agree with the reference rule: dense, sparse, batched and tiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnca_cli import inference
from rnca_cli.constants import RING
from rnca_cli.engines import rows as R
from rnca_cli.engines.fused import FusedEngine
from rnca_cli.engines.sparse import FRAME, SparseEngine, _Run
from rnca_cli.model import RNCA, ModelConfig, visible

from conftest import requires_cuda, ring, tiny_model


def pruning_model(seed=0):
    """A model whose visible channel drains where the mask does not hold it: most cells die."""
    model = tiny_model(seed)
    with torch.no_grad():
        model.fc2.bias[0] = -0.15
    return model


def small_object(size=96, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.float32)
    mask[10:42, 30:62] = ring(32, 10, 3)
    return rng.random((size, size, 1)).astype(np.float32), mask


def reference(model, image, mask, steps, seed):
    img = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        state, _ = model.rollout(img, torch.from_numpy(mask)[None], steps, seeds=torch.tensor([seed]))
    return visible(state)[0].numpy()


@pytest.mark.parametrize("shape", [(64, 64), (40, 37), (17, 50)])
def test_dense_and_sparse_equal_the_reference(shape, engine):
    model = pruning_model()
    rng = np.random.default_rng(1)
    image = rng.random((*shape, 1)).astype(np.float32)
    mask = (rng.random(shape) > 0.8).astype(np.float32)
    ref = reference(model, image, mask, 20, 3)
    img, msk = torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(mask)[None]
    kind = {"sparse": SparseEngine, "fused": FusedEngine}[engine]
    for skip_blocks in (False, True):
        out = inference.rollout(model, img, msk, 20, torch.tensor([3]), engine=kind(skip_blocks))[0].numpy()
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_sparse_steps_run_and_agree_when_little_is_alive(engine):
    model = pruning_model()
    image, mask = small_object()
    img, msk = torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(mask)[None]
    stats = {}
    out = inference.rollout(model, img, msk, 30, torch.tensor([2]), stats=stats)[0].numpy()
    assert stats["sparse_steps"] > 10  # the point of the test: the gathered path really ran
    assert 0 < stats["alive_share"] < stats["block_share"] < 1
    np.testing.assert_allclose(out, reference(model, image, mask, 30, 2), atol=1e-5)


@pytest.mark.parametrize("growth, long", [(0.08, 25), (0.3, 12)])
def test_sparse_steps_follow_growth_across_block_edges_and_image_borders(growth, long, engine):
    """A model that grows from single cells: activity crosses block edges and corners, reaches the
    image border and its padding to whole blocks; sparse steps must track it exactly. At 0.3 per
    step, cells two pixels out of the alive region turn bright in one update without being alive,
    so each step must clear them (their bright flags included) before the next reads them."""
    torch.manual_seed(0)
    model = RNCA(ModelConfig(channels=4, hidden=8, visible_floor=0.0))
    torch.nn.init.normal_(model.fc2.weight, std=0.05)
    with torch.no_grad():
        model.fc2.bias.copy_(torch.tensor([growth, 0.0, 0.0, 0.0]))
    image = torch.from_numpy(np.random.default_rng(0).random((2, 1, 100, 90)).astype(np.float32))
    mask = torch.zeros(2, 100, 90)
    seeds_at = [(0, 15, 15), (0, 60, 47), (1, 1, 88), (1, 99, 0), (1, 47, 31)]  # near a block corner, the border
    for b, y, x in seeds_at:
        mask[b, y, x] = 1.0
    for steps in (6, long):  # long: as many steps as stay sparse
        stats = {}
        out = inference.rollout(model, image, mask, steps, torch.tensor([1, 2]), stats=stats)
        with torch.no_grad():
            ref = visible(model.rollout(image, mask, steps, seeds=torch.tensor([1, 2]))[0])
        assert stats["dense_steps"] == 0 and stats["sparse_steps"] == steps
        assert int((ref > 0.1).sum()) > 10 * len(seeds_at)  # it did grow from the seed cells
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def centre_block_run():
    """A rollout's buffers for a 48x48 image: 3x3 blocks of 16x16, block 4 in the middle."""
    model = tiny_model()
    bufs = R.Buffers(model, torch.zeros(1, 1, 48, 48), torch.zeros(1, 48, 48), torch.tensor([0]), (0, 0))
    return _Run(model, bufs, torch.float32, counting=False)


@pytest.mark.parametrize("cell, blocks", [
    ((8, 8), {4}),
    ((2, 2), {4}),  # 3 pixels from the edges: a step cannot reach the neighbours
    ((0, 8), {1, 4}),
    ((1, 2), {1, 4}),  # near the top edge only
    ((1, 15), {1, 2, 4, 5}),  # within 2 pixels of the top-right corner
    ((15, 0), {3, 4, 6, 7}),
    ((14, 13), {4, 7}),
])
def test_reach_takes_the_blocks_a_kept_cell_can_change_next(cell, blocks):
    run, r = centre_block_run(), RING
    keep = torch.zeros(1, FRAME, FRAME, dtype=torch.bool)  # block 4's frame
    keep[0, r + cell[0], r + cell[1]] = True
    reach = run.reach(keep.view(1, -1), torch.tensor([4]))
    assert set(reach.nonzero().view(-1).tolist()) == blocks
    assert not run.reach(torch.zeros_like(keep).view(1, -1), torch.tensor([4])).any()
    margin = torch.ones_like(keep)
    margin[0, r:-r, r:-r] = False  # the frame's margin belongs to the neighbours: it is never read
    assert set(run.reach((keep | margin).view(1, -1), torch.tensor([4])).nonzero().view(-1).tolist()) == blocks


@pytest.mark.parametrize("tile", [16, 40])
def test_tiled_equals_untiled(tile, engine):
    model = pruning_model(1)
    image, mask = small_object(size=70)
    steps = 6
    untiled = reference(model, image, mask, steps, 4)
    tiled = inference.refine_image(model, image, mask, steps, 4, tile=tile)
    assert len(inference.tiles(70, tile, inference.halo(steps))) > 1
    np.testing.assert_allclose(tiled, untiled, atol=1e-5)


def test_batched_cases_equal_single_cases(engine):
    model = pruning_model()
    images = np.random.default_rng(0).random((3, 32, 32, 1)).astype(np.float32)
    masks = np.stack([ring(32), ring(32, gap=True), ring(32, 6, 2)]).astype(np.float32)
    img, msk = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(masks)
    batch = inference.rollout(model, img, msk, 8, torch.tensor([7, 7, 7]))
    alone = inference.rollout(model, img[1:2], msk[1:2], 8, torch.tensor([7]))
    torch.testing.assert_close(batch[1], alone[0], atol=1e-6, rtol=0)


def test_halo_and_tiles_cover_the_axis():
    assert inference.halo(64) == 129
    spans = inference.tiles(100, 40, 9)
    assert [(a, b) for a, b, _, _ in spans] == [(0, 40), (40, 80), (80, 100)]
    assert spans[1][2:] == (31, 89)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_mlp_stays_close_to_float32(precision):
    """Documented tolerance (README): binary masks agree on >= 98 % of pixels, mean |diff| <= 0.02."""
    model = pruning_model()
    image, mask = small_object(64)
    img, msk = torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(mask)[None]
    full = inference.rollout(model, img, msk, 16, torch.tensor([5]))
    assert torch.equal(full, inference.rollout(model, img, msk, 16, torch.tensor([5]), precision="fp32"))
    half = inference.rollout(model, img, msk, 16, torch.tensor([5]), precision=precision)
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # the MLP really ran in half precision
    assert float(((half >= 0.5) == (full >= 0.5)).float().mean()) >= 0.98
    assert float((half - full).abs().mean()) <= 0.02


@requires_cuda
@pytest.mark.parametrize("skip_blocks", [False, True])
def test_cuda_rollout_matches_the_cpu(skip_blocks):
    """Documented tolerance (README): in fp32 a GPU refines like the CPU to float rounding (max |diff|
    <= 1e-4); in bf16 / fp16 it stays within half precision's tolerance of the CPU's fp32 result."""
    model = pruning_model()
    image, mask = small_object()
    img, msk = torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(mask)[None]
    stats = {}
    cpu = inference.rollout(model, img, msk, 30, torch.tensor([2]), engine=SparseEngine(skip_blocks))
    gpu_model = pruning_model().cuda()
    gpu = inference.rollout(gpu_model, img.cuda(), msk.cuda(), 30, torch.tensor([2]).cuda(), stats=stats,
                            engine=SparseEngine(skip_blocks))
    assert gpu.is_cuda and (stats["sparse_steps"] > 10) == skip_blocks
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    for precision in ("bf16", "fp16"):
        half = inference.rollout(gpu_model, img.cuda(), msk.cuda(), 30, torch.tensor([2]).cuda(), precision=precision).cpu()
        assert float(((half >= 0.5) == (cpu >= 0.5)).float().mean()) >= 0.98
        assert float((half - cpu).abs().mean()) <= 0.02


@requires_cuda
def test_cuda_tiles_equal_the_cpu_untiled():
    model = pruning_model(1)
    image, mask = small_object(size=70)
    untiled = reference(model, image, mask, 6, 4)
    tiled = inference.refine_image(pruning_model(1).cuda(), image, mask, 6, 4, tile=16)
    np.testing.assert_allclose(tiled, untiled, atol=1e-4)
