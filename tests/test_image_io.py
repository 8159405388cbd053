"""Every kind of bad or unusual image a user can hand us: handled, or refused with a plain ImageError."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tokenizer_tap import ImageError, load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb shape)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def test_rgb_file_roundtrip(tmp_path, photo):
    path = tmp_path / "p.png"
    Image.fromarray(photo).save(path)
    assert np.array_equal(load_image(path), photo)
    assert np.array_equal(load_image(str(path)), photo)


@pytest.mark.parametrize("data,match", [
    (b"", "not an image"),
    (b"hello, I am a text file\n", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt|not an image"),
])
def test_non_images(data, match):
    with pytest.raises(ImageError, match=match):
        load_image(data)


def test_truncated_jpeg(photo):
    data = _encode(Image.fromarray(photo), "JPEG")
    with pytest.raises(ImageError, match="corrupt, truncated"):
        load_image(data[: len(data) // 2])


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(ImageError, match="too large"):
        load_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageError, match="too large"):
        load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=50)


def test_zero_size():
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 5, 3), np.uint8))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "1"])
def test_modes_become_rgb(mode, photo):
    img = Image.fromarray(photo).convert(mode) if mode != "I;16" else \
        Image.fromarray(photo[..., 0].astype(np.uint16) * 257)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = load_image(_encode(img, fmt))
    assert out.shape == (300, 400, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit data is scaled, not clipped
        assert np.abs(out[..., 0].astype(int) - photo[..., 0]).max() <= 1
    if mode == "L":  # gray replicated to three equal channels, close to the luma of the photo
        assert (out[..., 0] == out[..., 2]).all()
        luma = photo.astype(float) @ [0.299, 0.587, 0.114]
        assert np.abs(out[..., 0] - luma).max() <= 1.5
    if mode in ("CMYK", "RGBA", "P"):  # colours survive (PIL's "P" conversion quantises to the web palette)
        assert np.abs(out.astype(int) - photo).mean() < (30 if mode == "P" else 1)


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[0, 0] = (255, 0, 0, 255)
    out = load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def test_exif_rotation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(Image.fromarray(photo), "JPEG", exif=exif.tobytes())
    out = load_image(data)
    assert out.shape == (400, 300, 3)


@pytest.mark.parametrize("arr", [
    np.random.default_rng(0).random((5, 6)),
    np.random.default_rng(0).random((5, 6, 3)).astype(np.float32),
    np.full((5, 6, 4), 65535, np.uint16),
    np.ones((5, 6), bool),
])
def test_arrays(arr):
    out = load_image(arr)
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    if arr.dtype.kind == "f":  # floats in [0, 1] are scaled to 0..255
        expected = arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
        assert np.abs(out.astype(float) - expected * 255).max() <= 0.5
    else:  # full-scale 16-bit and True are white
        assert (out == 255).all()


def test_other_inputs():
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12345)
    with pytest.raises(ImageError, match="no such file"):
        load_image("x" * 5000)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    png = _encode(Image.fromarray(noise), "PNG")
    lazy = Image.open(io.BytesIO(png[: len(png) // 2]))  # header read, pixels not yet decoded
    with pytest.raises(ImageError, match="corrupt"):
        load_image(lazy)


@pytest.mark.parametrize("arr,match", [
    (np.zeros((2, 2, 2), np.uint8), "expected an"),
    (np.full((2, 2, 3), np.nan), "NaN"),
    (np.zeros((2, 2, 3), np.complex64), "dtype"),
])
def test_bad_arrays(arr, match):
    with pytest.raises(ImageError, match=match):
        load_image(arr)
