"""Turning whatever a user hands us (path, bytes, PIL image, array) into an RGB uint8 array, or a plain error.

Handles the formats real photos come in: EXIF rotation, grayscale, palette, RGBA (composited on white), CMYK and
16-bit images; refuses corrupt, empty and absurdly large images before decoding them.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

#: Default ceiling on decoded pixels (about 8k x 8k); larger images are refused before decoding.
MAX_PIXELS = 64_000_000



@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An upload decoded once: its pixels with the bytes and format it came in, so that validating, encoding,
    storing (as uploaded) and drawing it never decode the file again."""

    rgb: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied
    data: bytes | None  # the file as uploaded; None when it came as pixels
    format: str  # "jpeg", "png" ... ("" for pixels)


ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray | DecodedImage


def decode_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """`load_image`, keeping the file's bytes and format beside the pixels (decoded once, whatever uses them).

    Raises:
        ImageError: unreadable, truncated, non-image, zero-size or over `max_pixels`.
    """
    if isinstance(source, DecodedImage):
        _check_size(source.rgb.shape[1::-1], max_pixels, "image")
        return source
    if isinstance(source, np.ndarray):
        return DecodedImage(_from_array(source, max_pixels), None, "")
    data: bytes | None = None
    if isinstance(source, Image.Image):
        name = "image"
    elif isinstance(source, (bytes, bytearray)):
        name, data = "image data", bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        try:
            exists = Path(name).is_file()
        except (OSError, ValueError):  # over-long or NUL-containing paths
            exists = False
        if not exists:
            raise ImageError(f"{name[:200]}: no such file")
    else:
        raise ImageError(f"expected a path, bytes, a PIL image or a numpy array, got {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked from the header before decoding, so PIL's warning is redundant.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return DecodedImage(_from_pil(source, max_pixels, name), None, "")
            if data is None:
                data = Path(name).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                _check_size(img.size, max_pixels, name)
                img.load()
                return DecodedImage(_from_pil(img, max_pixels, name), data, (img.format or "png").lower())
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image is too large to decode safely") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can read (JPEG, PNG, WebP, TIFF, BMP, GIF ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: the image is corrupt, truncated or in an unsupported mode ({exc})") from None


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array with EXIF orientation applied.

    Raises:
        ImageError: unreadable, truncated, non-image, zero-size or over `max_pixels`.
    """
    return decode_image(source, max_pixels).rgb


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: the image is empty ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} pixels is too large (limit {max_pixels:,} pixels); downscale it first")


def _from_pil(img: Image.Image, max_pixels: int, name: str = "image") -> np.ndarray:
    _check_size(img.size, max_pixels, name)
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        return _from_array(np.asarray(img), max_pixels, full_scale=65535)
    if img.mode in ("I", "F"):
        return _from_array(np.asarray(img), max_pixels)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa"):
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img.convert("RGBA"))
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _from_array(arr: np.ndarray, max_pixels: int, full_scale: int | None = None) -> np.ndarray:
    """Array to RGB uint8; integer data above 255 is taken as 16-bit unless `full_scale` says otherwise."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")
    _check_size((arr.shape[1], arr.shape[0]), max_pixels, "array")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer):
        top = full_scale or (65535 if arr.max(initial=0) > 255 else 255)
        arr = (np.clip(arr.astype(np.float64), 0, top) * (255 / top) + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("the image array contains NaN or infinite values")
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = (np.clip(arr * scale, 0, 255) + 0.5).astype(np.uint8)
    else:
        raise ImageError(f"unsupported image array dtype {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[..., 3:].astype(np.float32) / 255
        arr = (arr[..., :3] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)
