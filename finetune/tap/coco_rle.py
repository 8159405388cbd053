"""COCO run-length encoding of masks (pycocotools' own, bit for bit) and polygon rasterising: how SA-1B and COCO
store a mask (the chat history's own format is `tokenizer_tap/rle.py`). An RLE is checked before it is decoded,
since a broken or oversized one must be a counted bad record rather than a crash or a huge allocation."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils


class MaskSizeError(ValueError):
    """An RLE declares another size than its image; raised before decoding, since the size may be huge."""


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an (H, W) boolean mask (pycocotools), with `counts` as text so it goes into JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _runs_total(counts: Any) -> int:
    """The pixels an RLE's runs cover. pycocotools refuses runs past the end of the mask but leaves the pixels after
    runs that stop short uninitialised, so the total is checked before it decodes."""
    if isinstance(counts, list):
        runs = [int(c) for c in counts]
        if runs != counts:
            raise ValueError("RLE counts must be whole numbers")
    elif isinstance(counts, str):
        runs = []
        pos = 0
        while pos < len(counts):
            x, shift, more = 0, 0, True
            while more:
                if pos >= len(counts):
                    raise ValueError("RLE string ends inside a number")
                c = ord(counts[pos]) - 48
                if not 0 <= c < 64:
                    raise ValueError(f"RLE string has an invalid character {counts[pos]!r}")
                x |= (c & 0x1F) << shift
                more = bool(c & 0x20)
                pos += 1
                shift += 5
                if not more and c & 0x10:
                    x |= -1 << shift
            runs.append(x + runs[-2] if len(runs) > 2 else x)
    else:
        raise ValueError("RLE counts must be a string or a list of numbers")
    if any(r < 0 for r in runs):
        raise ValueError("RLE has a negative run")
    return sum(runs)


def decode_rle(rle: dict[str, Any], image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """An (H, W) boolean mask from COCO RLE (compressed string or uncompressed list of counts), decoded by
    pycocotools; ValueError if broken. With `image_hw`, a declared size that differs raises MaskSizeError before
    anything is allocated."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE needs 'size' [h, w] and 'counts'") from None
    if image_hw is not None and (h, w) != tuple(image_hw):
        raise MaskSizeError(f"the RLE declares {h}x{w} pixels, the image has {image_hw[0]}x{image_hw[1]}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    total = _runs_total(counts)
    if h <= 0 or w <= 0 or total != h * w:
        raise ValueError(f"RLE runs add up to {total} pixels, not {h}x{w}")
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        compressed = {"size": [h, w], "counts": counts.encode("ascii")}
    return mask_utils.decode(compressed).astype(bool)


def polygons_to_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """An (h, w) boolean mask of COCO polygons ([x1, y1, x2, y2, ...]); one of fewer than 3 points draws nothing."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 6:
            draw.polygon([(float(x), float(y)) for x, y in zip(poly[0::2], poly[1::2])], fill=1)
    return np.asarray(canvas, dtype=bool)
