"""Image loading and preprocessing: TinyGPT-V parity on golden images, every pixel mode, every bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from tinygptv_edge.runtime.config import PreprocessConfig
from tinygptv_edge.runtime.errors import ConfigError, ImageError, ImageFormatError, ImageTooLargeError
from tinygptv_edge.runtime.vision.images import ImageLimits, load_image, to_rgb
from tinygptv_edge.runtime.vision.preprocess import preprocess


def golden(name: str) -> Image.Image:
    """Deterministic photo-like images: gradients, edges and noise, odd sizes, up- and down-sampling."""
    size = {"landscape": (320, 200), "portrait": (90, 160), "tiny": (7, 5), "square": (224, 224)}[name]
    w, h = size
    rng = np.random.default_rng(sum(map(ord, name)))
    yy, xx = np.mgrid[0:h, 0:w]
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = np.where((xx // 8 + yy // 8) % 2 == 0, 40.0, 215.0)
    x = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


def torchvision_reference(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Blip2ImageEvalProcessor with torchvision's semantics, written in torch ops (torchvision has no
    CPU wheel here): Resize((S, S), BICUBIC) on a PIL image is PIL's `resize`; ToTensor is
    HWC uint8 -> CHW float / 255; Normalize is (x - mean) / std per channel."""
    torch = pytest.importorskip("torch")
    resized = image.convert("RGB").resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
    t = torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return t.sub(mean).div(std).numpy()  # Normalize


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# -- parity with TinyGPT-V ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["landscape", "portrait", "tiny", "square"])
@pytest.mark.parametrize("size", [224, 448, 56])
@pytest.mark.torch
def test_preprocess_matches_torchvision_semantics(name, size):
    cfg = PreprocessConfig(image_size=size)
    im = golden(name)
    got = preprocess(im, cfg)
    assert got.shape == (3, size, size) and got.dtype == np.float32
    np.testing.assert_array_equal(got, torchvision_reference(im, cfg))


@pytest.mark.torch
def test_preprocess_of_loaded_file_equals_reference_on_the_decoded_image():
    im = golden("landscape")
    data = encode(im, "PNG")
    cfg = PreprocessConfig()
    np.testing.assert_array_equal(preprocess(load_image(data), cfg), torchvision_reference(im, cfg))


# -- pixel modes ---------------------------------------------------------------------------------


def rgba_image() -> Image.Image:
    rgb = np.asarray(golden("portrait")).copy()
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return rgb.astype(np.float64) * a + 255 * (1 - a)


def test_rgba_is_composited_on_white():
    im = rgba_image()
    got = np.asarray(load_image(encode(im, "PNG"))).astype(np.float64)
    x = np.asarray(im)
    assert np.abs(got - on_white(x[..., :3], x[..., 3])).max() <= 1  # Pillow's integer blend rounds
    assert (got[:, 0] == 255).all()  # fully transparent column -> white, not the hidden colour


def test_la_and_palette_with_transparency_on_white():
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (10, 1))
    alpha = np.full_like(grey, 128)
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    got = np.asarray(load_image(encode(la, "PNG"))).astype(np.float64)
    assert np.abs(got - on_white(np.dstack([grey] * 3), alpha)).max() <= 1

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((1, 1), 1)
    got = np.asarray(load_image(encode(pal, "PNG", transparency=0)))
    assert (got[0, 0] == 255).all() and tuple(got[1, 1]) == (200, 10, 10)
    got = np.asarray(load_image(encode(pal, "GIF", transparency=0)))
    assert (got[0, 0] == 255).all() and tuple(got[1, 1]) == (200, 10, 10)


def test_palette_without_transparency_keeps_colours():
    pal = golden("portrait").quantize(16)
    got = np.asarray(load_image(encode(pal, "PNG")))
    np.testing.assert_array_equal(got, np.asarray(pal.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(fmt):
    x = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    data = encode(Image.fromarray(x), fmt)
    got = np.asarray(load_image(data))
    want = np.rint(x.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], want)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    assert got.max() == 255 and len(np.unique(got)) == len(np.unique(want))  # not all clipped to 255


def test_int32_grey_out_of_16_bit_range_is_refused():
    x = np.array([[0, 70000]], dtype=np.int32)
    with pytest.raises(ImageError, match="0..65535"):
        to_rgb(Image.fromarray(x, "I"))


def test_grey_and_bilevel():
    grey = golden("landscape").convert("L")
    got = np.asarray(load_image(encode(grey, "PNG")))
    np.testing.assert_array_equal(got, np.dstack([np.asarray(grey)] * 3))
    bw = grey.convert("1")
    got = np.asarray(load_image(encode(bw, "PNG")))
    assert set(np.unique(got)) <= {0, 255}


def test_cmyk_jpeg_plain_and_with_icc_profile():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    got = np.asarray(load_image(encode(cmyk, "JPEG", quality=100)))
    assert got[..., 0].min() > 240 and got[..., 1:].max() < 15
    # no CMYK ICC profile can be built offline (littlecms makes only sRGB/LAB/XYZ): an embedded profile
    # of the wrong colour space must fall back to Pillow's formula, not fail
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    got = np.asarray(load_image(encode(cmyk, "TIFF", icc_profile=srgb)))  # profile of the wrong space
    assert got[..., 0].min() > 240


def test_exif_orientation_is_applied():
    im = golden("landscape")  # 320 x 200
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    got = load_image(encode(im, "JPEG", exif=exif, quality=95))
    assert got.size == (200, 320)
    plain = np.asarray(load_image(encode(im, "JPEG", quality=95))).astype(int)
    np.testing.assert_array_equal(np.asarray(got).astype(int), np.rot90(plain, k=-1))


def test_pil_and_file_sources(tmp_path):
    im = golden("tiny")
    path = tmp_path / "x.png"
    im.save(path)
    a = np.asarray(load_image(path))
    np.testing.assert_array_equal(a, np.asarray(load_image(str(path))))
    np.testing.assert_array_equal(a, np.asarray(load_image(io.BytesIO(path.read_bytes()))))
    np.testing.assert_array_equal(a, np.asarray(load_image(im.convert("RGBA"))))


# -- bad input -----------------------------------------------------------------------------------


def test_pixel_cap_from_header_before_decoding():
    data = encode(Image.new("L", (3000, 2000)), "PNG")  # 6 MP, compresses to a few KB
    assert len(data) < 100_000
    with pytest.raises(ImageTooLargeError, match="6000000 pixels"):
        load_image(data, ImageLimits(max_pixels=5_000_000))
    assert ImageLimits().max_pixels < Image.MAX_IMAGE_PIXELS


def test_decompression_bomb_header():
    """A PNG header claiming 20000 x 20000 (400 MP, beyond Pillow's own limit) with almost no data."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    with pytest.raises(ImageTooLargeError):
        load_image(bytes(data))
    with pytest.raises(ImageTooLargeError):  # even with a cap above Pillow's: its error stands
        load_image(bytes(data), ImageLimits(max_pixels=10**9))
    ihdr = struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0)  # 100 MP: Pillow only warns
    chunk = b"IHDR" + ihdr
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):  # the warning is an error
        load_image(bytes(data), ImageLimits(max_pixels=10**9))


@pytest.mark.parametrize("side", [6000, 10000, 15000, 20000])  # 36 MP (under Pillow's 89 MP), 100, 225, 400
def test_pixel_cap_error_beyond_pillows_bomb_threshold(side):
    """Over Pillow's threshold (a warning from 89 MP, an error from 179 MP) an image used to get Pillow's
    message; it gets the project's pixel-cap error, the same as an image between the two caps."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    import struct
    import zlib

    chunk = b"IHDR" + struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    pixels = side * side
    with pytest.raises(ImageTooLargeError) as e:
        load_image(bytes(data))
    assert str(e.value) == f"image is {side} x {side} = {pixels} pixels, over the cap of 32000000"
    if pixels > Image.MAX_IMAGE_PIXELS:  # a cap above Pillow's: Pillow's threshold, in the same words
        with pytest.raises(ImageTooLargeError) as e:
            load_image(bytes(data), ImageLimits(max_pixels=10**9, max_side=10**5))
        assert str(e.value).startswith(
            f"image is {side} x {side} = {pixels} pixels, over Pillow's decompression bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS} (ImageLimits.max_pixels = 1000000000 does not lift it)"
        )


def test_byte_cap(tmp_path):
    data = encode(golden("landscape"), "PNG")
    with pytest.raises(ImageTooLargeError, match="byte"):
        load_image(data, ImageLimits(max_bytes=1000))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageTooLargeError, match="byte"):
        load_image(path, ImageLimits(max_bytes=1000))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_file(fmt):
    data = encode(golden("landscape"), fmt)
    with pytest.raises(ImageError, match="truncated|corrupt|header"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data", [b"hello, I am text", b"%PDF-1.4\n%...", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n"]
)
def test_not_an_image(data):
    with pytest.raises(ImageError):
        load_image(data)


def test_empty_and_missing(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="no image file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12345)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "PCX"])
def test_formats_outside_the_allow_list(fmt):
    data = encode(golden("tiny").resize((16, 16)), fmt)
    # named from magic bytes where the format has them (TGA has none)
    match = "not allowed" if fmt == "TGA" else f"looks like {fmt}, a format not allowed"
    with pytest.raises(ImageFormatError, match=match):
        load_image(data)
    assert load_image(data, ImageLimits(formats=(fmt,))).size == (16, 16)  # allowed when asked for


def test_float_mode_refused():
    with pytest.raises(ImageError, match="unsupported pixel mode 'F'"):
        to_rgb(Image.new("F", (2, 2)))


def test_limits_are_validated():
    with pytest.raises(ConfigError):
        ImageLimits(max_pixels=0)
    with pytest.raises(ConfigError):
        ImageLimits(formats=())
    with pytest.raises(ConfigError, match="NOPE"):
        ImageLimits(formats=("NOPE",))


@pytest.mark.parametrize("mode", ["RGBa", "La", "PA"])
def test_other_alpha_modes_on_white(mode):
    base = rgba_image()
    x = np.asarray(base)
    via = {"RGBa": "RGBA", "La": "LA", "PA": "RGBA"}[mode]  # Pillow's RGBA -> La drops alpha
    im = base.convert(via).convert(mode)
    got = np.asarray(to_rgb(im)).astype(np.float64)
    straight = im.convert("LA") if mode == "La" else im  # Pillow un-premultiplies La only to LA
    straight = np.asarray(straight.convert("RGBA")).astype(np.float64)  # straight alpha
    want = on_white(straight[..., :3], straight[..., 3])
    assert got.shape == x.shape[:2] + (3,) and np.abs(got - want).max() <= 1
    assert (got[:, 0] == 255).all()  # alpha 0 column -> white


def test_ycbcr_and_big_endian_sixteen_bit():
    rgb = golden("square")
    ycc = rgb.convert("YCbCr")
    np.testing.assert_array_equal(np.asarray(to_rgb(ycc)), np.asarray(ycc.convert("RGB")))
    x = np.array([[0, 300, 65535, 40000]], dtype=">u2")
    im = Image.frombytes("I;16B", (4, 1), x.tobytes())
    np.testing.assert_array_equal(np.asarray(to_rgb(im))[0, :, 0], [0, 1, 255, 156])
