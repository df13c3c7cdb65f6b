"""What a model sees of an image: its channel count, and (if the model says so) local contrast.

Both steps are properties of the model, stored in its :class:`~rnca_cli.model.ModelConfig`, so a
checkpoint is refined with exactly the preprocessing it was trained with:

* :func:`match_channels` adapts gray <-> RGB (``image_channels``);
* :func:`normalise` (``image_norm`` = sigma > 0) rescales each channel of each 2D image by its
  local mean and standard deviation. Faint structures such as retinal vessels in a fundus photo
  differ from their surroundings by a few grey levels; the automaton only sees a 3x3
  neighbourhood of the raw image and does not learn from so small a signal. After normalisation
  the same vessels stand out by about a standard deviation whatever the illumination.

Normalisation is computed on the whole 2D image (each slice of a volume), before it is cut into
tiles or training patches, so tiled refinement stays exact and training sees what refinement sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Local standard deviations are floored at this (in [0, 1] intensity units), so flat regions
# (a black border, a constant background) map to mid-grey instead of amplified noise.
SD_FLOOR = 0.01
# Normalised values are mapped to [0, 1] with z = -SPAN at 0 and z = +SPAN at 1.
SPAN = 3.0


def match_channels(image: np.ndarray, channels: int, path: Path | str = "image") -> np.ndarray:
    """Adapt (..., C) image data to the model's channel count (gray <-> RGB), or refuse.

    A model trained on gray images given an RGB image uses its luminance
    (0.299 R + 0.587 G + 0.114 B); a model trained on RGB given a gray image sees the gray value
    in all three channels."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 3 and channels == 1:
        return (image @ LUMA)[..., None].astype(np.float32)
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    raise InputError(f"{path}: image has {have} channel(s) but the model expects {channels}")


def normalise(images: np.ndarray, sigma: float) -> np.ndarray:
    """Local contrast normalisation of 2D images: (H, W, C) or (B, H, W, C) -> same shape, float32.

    Per channel and image: ``z = (x - m) / sqrt(v + SD_FLOOR**2)`` with ``m`` the Gaussian
    (``sigma`` pixels) mean of ``x`` and ``v`` the Gaussian mean of ``(x - m)**2``, edges
    mirrored; returned as ``clip(0.5 + z / (2 * SPAN), 0, 1)``. ``sigma == 0``: the images as given.
    """
    if sigma == 0:
        return images
    x = np.asarray(images, dtype=np.float32)
    spatial = (sigma, sigma, 0) if x.ndim == 3 else (0, sigma, sigma, 0)
    mean = ndimage.gaussian_filter(x, spatial, mode="mirror")
    x = x - mean
    var = ndimage.gaussian_filter(x * x, spatial, mode="mirror")
    z = x / np.sqrt(var + SD_FLOOR**2)
    return np.clip(0.5 + z / (2 * SPAN), 0.0, 1.0).astype(np.float32)
