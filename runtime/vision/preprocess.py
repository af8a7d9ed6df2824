"""Image preprocessing exactly as TinyGPT-V's Blip2ImageEvalProcessor, without torch.

    RGB -> Resize((S, S), bicubic, PIL) -> ToTensor (/255) -> Normalize(mean, std)   # (3, S, S)

This is the one implementation: the runtime, the calibration readers and the reference checks
all call `preprocess`. Non-RGB modes go through `images.to_rgb` (alpha on white, 16-bit scaled, ...);
for RGB and L images that is exactly TinyGPT-V's `.convert('RGB')`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..config import PreprocessConfig
from .images import to_rgb

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """PIL image -> float32 (3, S, S) normalised pixels."""
    rgb = to_rgb(image)
    resized = rgb.resize((cfg.image_size, cfg.image_size), _RESAMPLE[cfg.resample])
    x = np.asarray(resized, dtype=np.float32) / 255.0  # (S, S, 3)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))
