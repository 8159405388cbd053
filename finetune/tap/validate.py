"""The checks every reader of TAP training data applies to a raw record: an image that loads, a mask that decodes at
its image's size and is not empty, a box that is finite and overlaps the image, an id that can key a dict. A failed
check is counted in the reader's `BadRecords` with where the record came from, and the record is skipped."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tokenizer_tap.errors import ImageError
from tokenizer_tap.image_io import load_image

from .coco_rle import MaskSizeError, decode_rle, polygons_to_mask
from .samples import BadRecords, RegionAnn


def xyxy(bbox: Any) -> tuple[float, float, float, float]:
    """A COCO xywh box as x1, y1, x2, y2; ValueError (or TypeError) when it is not four finite numbers."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError("not finite")
    return x, y, x + w, y + h


def is_id(value: Any) -> bool:
    """Whether a JSON id can key a dict (a list or an object cannot)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def read_image(source: Any, where: str, bad: BadRecords) -> np.ndarray | None:
    """The image as (H, W, 3) uint8 RGB; None (and counted) when it is missing or corrupt."""
    try:
        return load_image(source)
    except ImageError as exc:
        bad.add("missing or corrupt image", f"{where}: {exc}"[:300])
        return None


def checked_region(key: str, bbox: Any, mask: np.ndarray | None, image_hw: tuple[int, int], where: str,
                   bad: BadRecords, caption: str = "", category: str = "") -> RegionAnn | None:
    """Validate one region against its image (its mask is already at the image's size); None (and counted) when
    unusable."""
    h, w = image_hw
    if bbox is None:
        bad.add("missing box", where)
        return None
    try:
        x1, y1, x2, y2 = xyxy(bbox)
    except (TypeError, ValueError):
        bad.add("malformed box", f"{where}: {bbox!r}"[:300])
        return None
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
        bad.add("box outside the image", where)
        return None
    if mask is not None and not mask.any():
        bad.add("empty mask", where)
        return None
    return RegionAnn(key, (cx1, cy1, cx2, cy2), mask, caption, category)


def decode_segmentation(seg: Any, hw: tuple[int, int], where: str, bad: BadRecords) -> np.ndarray | None:
    """An annotation's mask at its image's size (an RLE's declared size is checked first); None (and counted) when
    unusable."""
    if isinstance(seg, dict):
        try:
            return decode_rle(seg, hw)
        except MaskSizeError as exc:
            bad.add("mask size differs from the image", f"{where}: {exc}")
        except (ValueError, TypeError, OverflowError) as exc:
            bad.add("broken RLE", f"{where}: {exc}"[:300])
        return None
    if isinstance(seg, list):
        try:
            return polygons_to_mask(seg, *hw)
        except (ValueError, TypeError, OverflowError) as exc:
            bad.add("broken polygon", f"{where}: {exc}"[:300])
        return None
    bad.add("missing mask", f"{where}: no segmentation")
    return None
