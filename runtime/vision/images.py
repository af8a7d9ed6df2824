"""Loading real photos safely and turning every pixel mode into the RGB the model was trained on.

    bytes/path/file/PIL --size cap--> Image.open(formats=allow-list) --pixel cap--> load (warnings = errors)
        --> EXIF orientation --> to_rgb --> preprocess (runtime/vision/preprocess.py)

Mode conversions (`to_rgb`), one table:
  RGB, L, 1, YCbCr      plain conversion (what TinyGPT-V's `.convert('RGB')` gives)
  RGBA, LA, PA, RGBa,   alpha composited on WHITE. Transparent pixels usually hold undefined (often
  La, P/L/RGB + tRNS    black) colour; TinyGPT-V's plain `.convert('RGB')` would show that colour, a white
                        background is what viewers show for logos, scans and screenshots.
  I;16*, I              16-bit grey scaled to 8 bits (v * 255 / 65535, rounded), never clipped at 255
  CMYK                  through the embedded ICC profile to sRGB when there is one, else Pillow's formula
  anything else (F, ...) ImageError naming the mode

Limits (`ImageLimits`): a byte cap, a pixel cap well under Pillow's own decompression-bomb threshold
(89.5 MP), checked from the header before any pixel is decoded, and an allow-list of formats. Pillow's
warnings (decompression bomb, corrupt EXIF, ...) are raised as errors while a file is read; an image
over Pillow's threshold gets the project's pixel-cap error too (its size read from the header), and
Pillow's threshold stays a ceiling that a larger `max_pixels` does not lift.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ..checks import not_regular
from ..errors import ConfigError, ImageError, ImageFormatError, ImageTooLargeError

ImageSource = str | Path | bytes | bytearray | BinaryIO | Image.Image

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("L", "1", "YCbCr")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255, 255)
# Pillow's reader errors: truncated data, bad headers, bad chunks, decompressors
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
# `warnings.catch_warnings` edits process-wide state: one reader at a time inside it
_WARN_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be. Defaults suit photos from phones and cameras (up to ~6500 x 4900)."""

    max_pixels: int = 32_000_000
    max_bytes: int = 64 * 1024 * 1024
    formats: tuple[str, ...] = DEFAULT_FORMATS
    # resizing costs memory in proportion to the longer side (Pillow's filter tables), not the pixels:
    # a 30000000 x 1 strip under the pixel cap takes ~1 GB to resize. Both are checked from the header.
    max_side: int = 16384  # WebP's own limit; JPEG allows 65535
    max_aspect: int = 100  # longer side / shorter side (full-page screenshots reach ~20)

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes", "max_side", "max_aspect"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ImageLimits.{name}: expected a positive integer, got {value!r}")
        if not self.formats:
            raise ConfigError("ImageLimits.formats: expected at least one format")
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:
            known = sorted(Image.OPEN)
            raise ConfigError(f"ImageLimits.formats: Pillow cannot open {unknown}; known: {known}")


def load_image(source: ImageSource, limits: ImageLimits | None = None) -> Image.Image:
    """Read an image (path, bytes, binary file or PIL image) into an upright RGB PIL image.

    Every consumer (runtime, calibration, importance matrix, evaluation) reads images through here,
    so the same caps apply everywhere; errors about a file name it.
    """
    try:
        return _load_image(source, limits or ImageLimits())
    except ImageError as e:
        if isinstance(source, (str, Path)) and str(source) not in str(e):
            raise type(e)(f"{source}: {e}") from None
        raise


def _load_image(source: ImageSource, limits: ImageLimits) -> Image.Image:
    if isinstance(source, Image.Image):
        _check_pixels(source.size, limits)
        return to_rgb(_upright(source))
    data = read_bytes(source, limits)
    with _WARN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            image: Image.Image = Image.open(io.BytesIO(data), formats=list(limits.formats))
        except UnidentifiedImageError:
            raise _unidentified(data, limits) from None
        except _BOMB as e:  # over Pillow's threshold: the project's caps say why, from the header's size
            raise _bomb(data, limits, e) from None
        except (Warning, *_READ_ERRORS) as e:
            raise ImageError(f"cannot read image header: {e}") from None
        _check_pixels(image.size, limits)
        try:
            image.load()
            image = _upright(image)
        except _BOMB as e:
            raise ImageTooLargeError(f"image refused as a decompression bomb: {e}") from None
        except (Warning, *_READ_ERRORS) as e:
            raise ImageError(f"image data is truncated or corrupt ({image.format}): {e}") from None
    return to_rgb(image)


def read_bytes(source: str | Path | bytes | bytearray | BinaryIO, limits: ImageLimits) -> bytes:
    """The file's bytes, refusing more than `limits.max_bytes`."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        kind = not_regular(path)  # a FIFO would block read_bytes()
        if kind is not None or not path.is_file():
            raise ImageError(f"no image file at {path}" + (f": found {kind}" if kind else ""))
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"{path}: {size} bytes, more than the {limits.max_bytes}-byte cap")
        data = path.read_bytes()
    elif isinstance(source, io.TextIOBase):  # reading would decode the image bytes as text
        raise ImageError(
            f"expected a binary file (opened with 'rb'), got a text-mode {type(source).__name__}"
        )
    elif hasattr(source, "read"):
        try:
            data = source.read(limits.max_bytes + 1)
        except (OSError, ValueError) as e:  # closed file, text decoding of binary data, ...
            raise ImageError(f"cannot read the image file object: {type(e).__name__}: {e}") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"expected a binary file, its read() gave {type(data).__name__}")
        data = bytes(data)
    else:
        raise ImageError(f"expected a path, bytes, a binary file or a PIL image, got {type(source).__name__}")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"image data is more than the {limits.max_bytes}-byte cap")
    if not data:
        raise ImageError("image data is empty")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit RGB (see the module's table)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info and mode in ("P", "L", "RGB"):
        return _on_white(image)
    if mode in ("P", *_PLAIN_MODES):
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT:
        return _sixteen_to_rgb(image)
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    raise ImageError(
        f"unsupported pixel mode {mode!r}; supported: RGB, L, 1, P, YCbCr, CMYK, 16-bit grey, "
        "and their alpha forms"
    )


# ---------------------------------------------------------------------------------------------


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phones store pixels sideways and set the tag)."""
    return ImageOps.exif_transpose(image) or image


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels: {w} x {h}")
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(f"image is {w} x {h} = {w * h} pixels, over the cap of {limits.max_pixels}")
    if max(w, h) > limits.max_side:
        raise ImageTooLargeError(
            f"image is {w} x {h}: a side of {max(w, h)} pixels, over the cap of {limits.max_side}"
        )
    if max(w, h) > limits.max_aspect * min(w, h):
        raise ImageTooLargeError(
            f"image is {w} x {h}: aspect ratio {max(w, h) / min(w, h):.0f}:1, "
            f"over the cap of {limits.max_aspect}:1"
        )


def _header_size(data: bytes, limits: ImageLimits) -> tuple[int, int] | None:
    """The size in the header, read by the format's plugin without Pillow's decompression-bomb check
    (`Image.open` runs the same factories, then that check); None when no allowed plugin reads it."""
    for fmt in limits.formats:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        try:
            if factory is None or (accept is not None and not accept(data[:16])):
                continue
            return factory(io.BytesIO(data), "").size  # header only: no pixel is decoded
        except Exception:  # a plugin failing on these bytes means "not this one"
            continue
    return None


def _bomb(data: bytes, limits: ImageLimits, e: Exception) -> ImageTooLargeError:
    """Pillow's decompression-bomb refusal as the project's error: the pixel cap first (as under the
    threshold), else Pillow's limit, which `ImageLimits.max_pixels` cannot lift."""
    size = _header_size(data, limits)
    if size is None:
        return ImageTooLargeError(f"image refused as a decompression bomb: {e}")
    _check_pixels(size, limits)  # raises the same error a 36 MP image gets
    w, h = size
    return ImageTooLargeError(
        f"image is {w} x {h} = {w * h} pixels, over Pillow's decompression bomb limit of "
        f"{Image.MAX_IMAGE_PIXELS} (ImageLimits.max_pixels = {limits.max_pixels} does not lift it)"
    )


def _unidentified(data: bytes, limits: ImageLimits) -> ImageError:
    """Name the format from its magic bytes alone (no foreign parser runs) to say why it was refused."""
    head = data[:64]
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in limits.formats or accept is None:
            continue
        try:
            if accept(head):
                allowed = ", ".join(limits.formats)
                return ImageFormatError(f"data looks like {fmt}, a format not allowed; allowed: {allowed}")
        except Exception:  # a plugin's sniffing function failing on odd bytes just means "not this one"
            continue
    return ImageFormatError(f"not an image in an allowed format ({', '.join(limits.formats)}), or corrupt")


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode == "La":  # premultiplied grey: Pillow converts it only to LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")  # P/L/RGB + tRNS, LA, PA, premultiplied RGBa all become straight RGBA
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _sixteen_to_rgb(image: Image.Image) -> Image.Image:
    x = np.asarray(image)  # (H, W) uint16 or int32
    if x.size and (x.min() < 0 or x.max() > 65535):
        raise ImageError(
            f"mode {image.mode} pixels span {x.min()}..{x.max()}; expected 16-bit values 0..65535"
        )
    x = x.astype(np.uint32)  # 65535 * 255 + 32767 fits; int64 would double the peak of a 32 MP image
    x *= 255
    x += 32767
    x //= 65535  # round(v * 255 / 65535) in integers
    return Image.fromarray(x.astype(np.uint8), mode="L").convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            rgb = ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if rgb is not None:  # None only when converted in place (inPlace=True)
                return rgb
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to Pillow's formula below
    return image.convert("RGB")
