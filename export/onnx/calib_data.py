"""Calibration data for the vision graph: a folder of images through the one shared preprocessing.

    folder/*  --runtime.images.load_image (the loader `run` uses: EXIF orientation, alpha, 16-bit)-->
              upright RGB --runtime.preprocess--> (3,S,S) float32
              --stack--> (N,3,S,S) --get_next--> {"pixel_values": (1,3,S,S)} ... None

Every file in the folder (hidden files aside) must be an image: a stray file, a truncated image or
an empty folder is an error that names it, before any calibration runs. `ArrayReader` takes
already-preprocessed pixels and checks them the same way (shape, finite values).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image

from tinygptv_edge.runtime.config import PreprocessConfig
from tinygptv_edge.runtime.contract import VISION_INPUT
from tinygptv_edge.runtime.errors import CalibrationError, ImageError, ImageFormatError, ImageTooLargeError
from tinygptv_edge.runtime.vision import images
from tinygptv_edge.runtime.vision.preprocess import preprocess


def list_images(folder: str | Path) -> list[Path]:
    """The non-hidden files of `folder`, sorted; an empty or missing folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(
            f"calibration images: expected a folder, got {folder} (does not exist or not a folder)"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CalibrationError(f"calibration images: expected at least one image in {folder}, found none")
    return files


def load_image(path: str | Path) -> Image.Image:
    """One image file through the runtime's loader (`runtime/vision/images.py`: the upright RGB `run` sees),
    its errors naming the file: unreadable, non-image and truncated files raise ImageError."""
    try:
        return images.load_image(Path(path))
    except ImageFormatError as e:
        raise ImageError(f"{path}: expected an image file (PNG, JPEG, ...), got: {e}") from e
    except ImageTooLargeError as e:
        raise ImageTooLargeError(f"{path}: refused, {e}") from e
    except ImageError as e:
        raise ImageError(f"{path}: expected a complete image, got a damaged or truncated file ({e})") from e


def check_pixels(x: np.ndarray, image_size: int, source: str = "calibration data") -> np.ndarray:
    """(N,3,S,S) float32 with finite values, or CalibrationError saying what was found."""
    x = np.asarray(x)
    want = (3, image_size, image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
        raise CalibrationError(
            f"{source}: expected pixels of shape (N, {', '.join(map(str, want))}), got {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise CalibrationError(f"{source}: expected float pixels, got dtype {x.dtype}")
    bad = int(np.size(x) - np.isfinite(x).sum())
    if bad:
        raise CalibrationError(f"{source}: expected finite pixel values, got {bad} NaN/inf value(s)")
    return np.ascontiguousarray(x, dtype=np.float32)


class ArrayReader(CalibrationDataReader):
    """Feeds (N,3,S,S) pixels one image at a time as {VISION_INPUT: (1,3,S,S)}; `rewind` restarts."""

    def __init__(self, pixels: np.ndarray, image_size: int, input_name: str = VISION_INPUT):
        self.pixels = check_pixels(pixels, image_size)
        self.input_name = input_name
        self._it: Iterator[int] = iter(range(len(self.pixels)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        return None if i is None else {self.input_name: self.pixels[i : i + 1]}

    def rewind(self) -> None:
        self._it = iter(range(len(self.pixels)))

    def __len__(self) -> int:
        return len(self.pixels)


def load_folder(folder: str | Path, cfg: PreprocessConfig, max_images: int | None = None) -> np.ndarray:
    """Preprocess up to `max_images` images of `folder` (sorted by name): (N,3,S,S) float32.

    Every file is checked even past `max_images`, so a broken set fails before calibration.
    """
    paths = list_images(folder)
    for p in paths[max_images:] if max_images else ():
        load_image(p)  # decode-check only
    used = paths[:max_images] if max_images else paths
    return check_pixels(np.stack([preprocess(load_image(p), cfg) for p in used]), cfg.image_size, str(folder))


def pixels_from_images(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    return check_pixels(np.stack([preprocess(im, cfg) for im in images]), cfg.image_size, "images")
