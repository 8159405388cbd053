"""SA-1B masks to teacher embeddings (V_C, the paper's §3.1): each mask's segment crop, embedded in batches by the
teacher while worker threads cut the next images' crops.

The segment crop (`segment_crop`): the square centred on the mask's tight box, with side = the box's longer side
plus `CROP_MARGIN` on each side, so a long thin mask is never cut the way CLIP's own centre crop would cut it;
pixels outside the mask (or outside the image) get the teacher's mean colour, which normalises to zero and so
carries no signal; then a bicubic resize to the teacher's input size and its mean/std normalisation. The box comes
from the mask itself, not the annotation, so the crop and the mask always agree.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .clip_teacher import ClipTeacher, resize_square
from .samples import RegionDataset

#: Context around a segment, as a fraction of its box's longer side, on each side.
CROP_MARGIN = 0.1


def segment_crop(image: np.ndarray, mask: np.ndarray, fill: np.ndarray,
                 margin: float = CROP_MARGIN) -> np.ndarray | None:
    """The square (side, side, 3) uint8 crop around `mask` with everything outside it set to `fill`; None if the
    mask is empty. See the module docstring for why it is square and filled."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(1, int(np.ceil(max(y1 - y0, x1 - x0) * (1 + 2 * margin))))
    top, left = (y0 + y1 - side) // 2, (x0 + x1 - side) // 2
    crop = np.empty((side, side, 3), np.uint8)
    crop[:] = fill
    h, w = mask.shape
    iy0, iy1, ix0, ix1 = max(top, 0), min(top + side, h), max(left, 0), min(left + side, w)
    inside = mask[iy0:iy1, ix0:ix1]
    crop[iy0 - top:iy1 - top, ix0 - left:ix1 - left][inside] = image[iy0:iy1, ix0:ix1][inside]
    return crop


@dataclass
class ShardStats:
    """What a pass over images saw: printed per shard and summed over the run."""

    images: int = 0
    masks: int = 0
    empty_masks: int = 0  # nothing to embed (an empty or missing mask): skipped
    unreadable_images: int = 0  # the dataset returned None (its BadRecords says why)

    def add(self, other: ShardStats) -> None:
        for f in ("images", "masks", "empty_masks", "unreadable_images"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class _Crops:
    keys: list[str] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    stats: ShardStats = field(default_factory=ShardStats)


def _image_crops(dataset: RegionDataset, index: int, size: int, fill: np.ndarray) -> _Crops:
    """One image's segment crops, already at the teacher's size (so the worker threads do the resizing)."""
    out = _Crops()
    sample = dataset[index]
    if sample is None:
        out.stats.unreadable_images = 1
        return out
    out.stats.images = 1
    for region in sample.regions:
        crop = None if region.mask is None else segment_crop(sample.image, region.mask, fill)
        if crop is None:
            out.stats.empty_masks += 1
            continue
        out.keys.append(region.key)
        out.crops.append(resize_square(crop, size))
    return out


def _prefetch(fn: Callable[[int], Any], items: Iterable[int], workers: int) -> Iterator[Any]:
    """`map(fn, items)` in order, `workers` threads ahead (bounded, so crops never pile up in memory)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def embed_shard(teacher: ClipTeacher, dataset: RegionDataset, indices: Iterable[int], batch_size: int = 64,
                workers: int = 0, progress: Callable[[ShardStats], None] | None = None,
                ) -> tuple[list[str], torch.Tensor, ShardStats]:
    """The mask keys, (N, D) fp16 embeddings and counts of the images `indices` of `dataset`."""
    keys: list[str] = []
    chunks: list[torch.Tensor] = []
    stats = ShardStats()
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        chunks.append(teacher.encode_images(pending).half())
        keys.extend(pending_keys)
        stats.masks += len(pending)
        pending.clear()
        pending_keys.clear()

    def crops_of(i: int) -> _Crops:
        return _image_crops(dataset, i, teacher.image_size, teacher.fill)

    for item in _prefetch(crops_of, indices, workers):
        stats.add(item.stats)
        for key, crop in zip(item.keys, item.crops):
            pending_keys.append(key)
            pending.append(crop)
            if len(pending) >= batch_size:
                flush()
        if progress is not None:
            progress(stats)
    if pending:
        flush()
    return keys, torch.cat(chunks) if chunks else torch.zeros(0, teacher.dim, dtype=torch.float16), stats
