"""Synthetic calibration images for the vision export tests (test code only)."""

from __future__ import annotations

import numpy as np


def write_images(folder, n: int, size: int = 72, seed: int = 0):
    """Smooth synthetic scenes (gradient + a bright square): images with structure, not noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(0.3, 1.0, 3)
        x0, y0 = rng.integers(0, size // 2, 2)
        base[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.uniform(0, 1, 3)
        img = Image.fromarray((base * 255).astype(np.uint8))
        img.save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return folder
