"""Run-length encoding of binary masks, so a region's mask can be stored as small JSON in the chat history.

Format: `{"size": [h, w], "counts": [n0, n1, ...]}` with the runs taken over the row-major (C order) flattened
mask, alternating False/True and always starting with a run of False (0 when the first pixel is True). Counts are
plain Python ints so the dict goes straight through `json.dumps`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_SIDE = 20_000  # larger than any photo we chat about; stops a corrupt size from allocating gigabytes
MAX_PIXELS = 100_000_000


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode a 2-D boolean mask (vectorised: a few milliseconds for a 2000x2000 mask)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError("mask must be a 2-D numpy array")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be boolean, not {mask.dtype}")
    h, w = mask.shape
    _check_size(h, w)
    flat = mask.ravel()  # C order even for non-contiguous views
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], starts, [flat.size])))
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [int(h), int(w)], "counts": counts.tolist()}


def validate(rle: Any) -> tuple[int, int, np.ndarray]:
    """Check an RLE dict (it may come from an old or hand-edited database) and return (h, w, counts)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    size, counts = rle["size"], rle["counts"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size):
        raise ValueError("RLE size must be [height, width] integers")
    h, w = int(size[0]), int(size[1])
    _check_size(h, w)
    if not isinstance(counts, (list, tuple)) or not counts:
        raise ValueError("RLE counts must be a non-empty list of integers")
    if len(counts) > h * w + 1:
        raise ValueError("RLE has more runs than pixels")
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError("RLE counts must be a list of integers")
    # bounding every run by h*w first keeps the sum below int64 overflow
    if arr.min() < 0 or arr.max() > h * w:
        raise ValueError("RLE counts must be between 0 and the number of pixels")
    if int(arr.sum()) != h * w:
        raise ValueError(f"RLE counts add up to {int(arr.sum())}, expected {h * w} pixels")
    return h, w, arr.astype(np.int64)


def decode(rle: Any) -> np.ndarray:
    """Decode an RLE dict back to an (h, w) boolean mask; ValueError if it is malformed."""
    h, w, counts = validate(rle)
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_size(h: int, w: int) -> None:
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE) or h * w > MAX_PIXELS:
        raise ValueError(f"mask size {h}x{w} is out of range (each side 1..{MAX_SIDE}, at most {MAX_PIXELS} pixels)")
