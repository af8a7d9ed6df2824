"""Answer a question about an image file with the PyTorch reference (the shipped model by default)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from tinygptv_edge.runtime.errors import ImageError
from tinygptv_edge.runtime.preprocess import preprocess
from tinygptv_edge.runtime.tokenizer import Tokenizer


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as e:
        raise ImageError(f"image {path}: no such file") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"image {path}: expected a readable image file, got an error: {e}") from e


def answer_image(
    image: str | Path | Image.Image,
    question: str,
    model_dir: str | Path | None = None,
    max_new_tokens: int = 32,
) -> str:
    """Greedy first-turn answer of the model in `model_dir` (single-checkpoint folder)."""
    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.export.checkpoints.single import load_single

    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    model, _ = load_single(folder)
    tok = Tokenizer.from_file(folder)
    im = image if isinstance(image, Image.Image) else open_image(image)
    pixels = torch.from_numpy(preprocess(im, model.cfg.preprocess))[None]
    return model.answer(question, tok, pixels, max_new_tokens=max_new_tokens)
