"""Training objectives (rnca_cli.losses): tables of known values, far-pixel weighting, parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnca_cli.losses import FAR, far_from, sample_losses
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
    loss = sample_losses([(term, 1.0)], pred, RING, None, 0.0)
    assert loss.shape == (1,) and float(loss) == pytest.approx(expected, abs=2e-4)


def test_far_weight_multiplies_the_cost_of_stray_pixels_only():
    far = torch.from_numpy(far_from(RING.numpy() > 0))
    speck, near_miss = RING.clone(), RING.clone()
    speck[0, 0, 15] = 1.0  # far from the ring
    near_miss[0, 3, 4] = 1.0  # next to it
    assert bool(far[0, 0, 15]) and not bool(far[0, 3, 4])
    plain = [float(sample_losses([("mse", 1.0)], p, RING, far, 0.0)) for p in (speck, near_miss)]
    weighted = [float(sample_losses([("mse", 1.0)], p, RING, far, 4.0)) for p in (speck, near_miss)]
    assert plain[0] == pytest.approx(plain[1]) == pytest.approx(1 / 256)
    assert weighted[0] == pytest.approx(5 * plain[0]) and weighted[1] == pytest.approx(plain[1])


def test_far_from_marks_pixels_beyond_the_distance_and_all_of_an_empty_target():
    target = np.zeros((1, 20, 20), bool)
    target[0, 10, 10] = True
    far = far_from(target)[0]
    assert not far[10, 10 + FAR] and far[10, 10 + FAR + 1]
    assert far_from(np.zeros((1, 5, 5), bool)).all()


def test_every_term_has_a_gradient():
    pred = (RING * 0.8 + 0.1).requires_grad_()
    sample_losses(parse_loss("mse+bce+dice+cldice"), pred, RING, None, 0.0).sum().backward()
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
