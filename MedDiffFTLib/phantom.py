"""A procedurally generated ultrasound-like phantom (speckled tissue layers with a dark,
irregular lesion and posterior enhancement), so the demo runs without any data."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .masks import random_blob


def ultrasound_phantom(seed: int, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 (size, size), mask uint8 {0, 255})."""
    rng = np.random.default_rng(seed)
    # Speckle: magnitude of low-pass filtered complex Gaussian noise (fully developed speckle).
    real = ndimage.gaussian_filter(rng.standard_normal((size, size)), (1.2, 0.8))
    imag = ndimage.gaussian_filter(rng.standard_normal((size, size)), (1.2, 0.8))
    speckle = np.hypot(real, imag)
    speckle /= speckle.mean()
    depth = np.linspace(0, 1, size)[:, None]
    layers = 0.55 + 0.25 * np.sin(depth * rng.uniform(8, 14) + rng.uniform(0, 6)) \
        + 0.15 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 12) * 8
    echo = np.clip(layers, 0.2, 1.2) * (1.1 - 0.5 * depth)
    lesion = random_blob((size, size), rng, min_radius=0.1, max_radius=0.2,
                         centre=(rng.uniform(0.4, 0.65) * size, rng.uniform(0.3, 0.7) * size))
    darkness = ndimage.gaussian_filter(lesion.astype(float), 1.5)
    echo = echo * (1.0 - 0.75 * darkness)
    columns = lesion.any(axis=0)
    below = np.cumsum(lesion, axis=0) > 0
    echo = echo * (1.0 + 0.35 * (below & ~lesion & columns[None, :]))  # posterior enhancement
    image = np.clip(echo * speckle * 110, 0, 255).astype(np.uint8)
    return image, (lesion * 255).astype(np.uint8)
