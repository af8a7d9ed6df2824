"""Answer a question about an image file with the PyTorch reference (the shipped model by default).

The image goes through the runtime's loader (`runtime/vision/images.py`: EXIF orientation, alpha, 16-bit),
so the reference answers the same upright RGB picture as `run`; the model comes from the one source
resolver (`export/checkpoints/source.py`), with its BOS rule and prompt template.
"""

from __future__ import annotations

import torch

from tinygptv_edge.export.checkpoints.source import Loaded
from tinygptv_edge.runtime.vision.images import ImageSource, load_image
from tinygptv_edge.runtime.vision.preprocess import preprocess


def image_pixels(loaded: Loaded, image: ImageSource | None) -> torch.Tensor | None:
    """(1, 3, S, S) pixels of `image` as the model's preprocessing makes them; None for no image."""
    if image is None:
        return None
    return torch.from_numpy(preprocess(load_image(image), loaded.model.cfg.preprocess))[None]
