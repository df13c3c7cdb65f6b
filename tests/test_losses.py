"""Training objectives (rnca_cli.losses): tables of known values, far and missed pixel weights, parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnca_cli.losses import FAR, far_from, gaps, pixel_weights, sample_losses
from rnca_cli.options import parse_loss

RING = torch.zeros(1, 16, 16)
RING[0, 4:12, 4:12] = 1.0
RING[0, 6:10, 6:10] = 0.0  # a square ring, 2 px thick
EMPTY = torch.zeros(1, 16, 16)


@pytest.mark.parametrize("term, pred, expected", [
    ("mse", RING, 0.0), ("mse", EMPTY, 48 / 256), ("mse", 1 - RING, 1.0),
    ("dice", RING, 0.0), ("dice", EMPTY, 1.0),
    ("cldice", RING, 0.0), ("cldice", EMPTY, 1.0),
    ("bce", RING, 1e-4),  # the clamp keeps it finite: -log(1 - 1e-4) per pixel
])
def test_terms_of_known_values(term, pred, expected):
    loss = sample_losses([(term, 1.0)], pred, RING)
    assert loss.shape == (1,) and float(loss) == pytest.approx(expected, abs=2e-4)


def test_far_weight_multiplies_the_cost_of_stray_pixels_only():
    far = torch.from_numpy(far_from(RING.numpy() > 0))
    none = torch.zeros_like(far)
    speck, near_miss = RING.clone(), RING.clone()
    speck[0, 0, 15] = 1.0  # far from the ring
    near_miss[0, 3, 4] = 1.0  # next to it
    assert bool(far[0, 0, 15]) and not bool(far[0, 3, 4])
    plain = [float(sample_losses([("mse", 1.0)], p, RING, pixel_weights(far, 0.0, none, 0.0))) for p in (speck, near_miss)]
    weighted = [float(sample_losses([("mse", 1.0)], p, RING, pixel_weights(far, 4.0, none, 0.0))) for p in (speck, near_miss)]
    assert plain[0] == pytest.approx(plain[1]) == pytest.approx(1 / 256)
    assert weighted[0] == pytest.approx(5 * plain[0]) and weighted[1] == pytest.approx(plain[1])


@pytest.mark.parametrize("far_weight, miss_weight, expected", [
    (0.0, 0.0, None),  # no weights: plain terms
    (0.0, 9.0, [[1, 10, 1]]),  # the coarse mask's gap weighs 1 + 9
    (2.0, 0.0, [[3, 1, 1]]),  # the far pixel weighs 1 + 2
    (2.0, 9.0, [[3, 10, 1]]),  # both, each on its own pixels
])
def test_pixel_weights_of_far_and_missed_pixels(far_weight, miss_weight, expected):
    far = torch.tensor([[True, False, False]])
    missed = torch.tensor([[False, True, False]])
    weight = pixel_weights(far, far_weight, missed, miss_weight)
    assert weight is None if expected is None else torch.equal(weight, torch.tensor(expected, dtype=torch.float32))


def test_gaps_are_missed_pixels_away_from_the_coarse_mask_and_their_neighbours_not_thin_walls():
    target = torch.zeros(1, 5, 12, dtype=torch.bool)
    target[0, 1:4, :] = True  # a bar 3 px thick ...
    coarse = target.clone()
    coarse[0, 1:4, 4:9] = False  # ... broken over 5 columns
    coarse[0, 1, 9:] = False  # and drawn a pixel too thin on its right: a wall, not a gap
    expected = torch.zeros_like(target)
    expected[0, 1:4, 4:9] = True  # the break: columns 5-7 are far from the mask, 4 and 8 their neighbours
    assert torch.equal(gaps(target, coarse), expected)
    assert not gaps(target, target).any()
    assert torch.equal(gaps(target, torch.zeros_like(target)), target)  # nothing drawn: all of it is missed
    short = target.clone()
    short[0, 1:4, 5:7] = False  # a 2-column break: every pixel is beside the mask
    assert not gaps(target, short).any()


def test_miss_weight_makes_a_gap_cost_more_than_a_wall_pixel():
    gap, wall = RING.clone(), RING.clone()
    gap[0, 4, 8] = 0.0  # a ring pixel the coarse mask missed, still missing
    wall[0, 8, 8] = 1.0  # a background pixel inside the ring, wrongly set
    missed = torch.zeros_like(RING, dtype=torch.bool)
    missed[0, 4, 8] = True
    assert RING[0, 4, 8] == 1 and RING[0, 8, 8] == 0
    weight = pixel_weights(torch.zeros_like(missed), 0.0, missed, 9.0)
    costs = [float(sample_losses([("mse", 1.0)], p, RING, weight)) for p in (gap, wall)]
    assert costs[0] == pytest.approx(10 * costs[1])


def test_far_from_marks_pixels_beyond_the_distance_and_all_of_an_empty_target():
    target = np.zeros((1, 20, 20), bool)
    target[0, 10, 10] = True
    far = far_from(target)[0]
    assert not far[10, 10 + FAR] and far[10, 10 + FAR + 1]
    assert far_from(np.zeros((1, 5, 5), bool)).all()


def test_every_term_has_a_gradient():
    pred = (RING * 0.8 + 0.1).requires_grad_()
    sample_losses(parse_loss("mse+bce+dice+cldice"), pred, RING).sum().backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0


@pytest.mark.parametrize("text, terms", [("mse", [("mse", 1.0)]), ("mse+cldice:0.5", [("mse", 1.0), ("cldice", 0.5)]),
                                         ("BCE + dice", [("bce", 1.0), ("dice", 1.0)])])
def test_parse_loss(text, terms):
    assert parse_loss(text) == terms


@pytest.mark.parametrize("text, message", [("mse+focal", "unknown term 'focal'"), ("mse:x", "not a number"),
                                           ("mse:-1", "weights must be > 0"), ("", "name at least one")])
def test_bad_losses_are_usage_errors(text, message):
    from rnca_cli.errors import UsageError

    with pytest.raises(UsageError, match=message):
        parse_loss(text)
