"""What every reader of TAP training data yields: images with their regions (`ImageSample`, `RegionAnn`) behind one
random-access `RegionDataset`, and `BadRecords`, the tally of records a reader skipped and why."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RegionAnn:
    key: str  # priors.mask_key(image_id, ann_id): what the concept prior and captions are looked up by
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    mask: np.ndarray | None  # (H, W) bool; None for caption-only boxes (Visual Genome)
    caption: str = ""
    category: str = ""  # concept name where the source has one (COCO categories)


@dataclass
class ImageSample:
    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    regions: list[RegionAnn]


@dataclass
class BadRecords:
    """Unusable records by reason, with the first examples of each: what `summary` prints after a run."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)
    limit: int = 1000
    _seen: set = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, where: str) -> None:
        with self._lock:
            if (reason, where) in self._seen:  # an image read again in a later epoch is one bad record
                return
            self._seen.add((reason, where))
            self.counts[reason] = self.counts.get(reason, 0) + 1
            if len(self.examples) < self.limit:
                self.examples.append((reason, where))

    def summary(self) -> str:
        if not self.counts:
            return "no bad records"
        lines = []
        for reason, n in sorted(self.counts.items()):
            shown = [w for r, w in self.examples if r == reason][:3]
            lines.append(f"{reason}: {n} (e.g. {'; '.join(shown)})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": [list(e) for e in self.examples]}


class RegionDataset:
    """Random access to images with their regions; `__getitem__` returns None for an unusable image."""

    def __init__(self, name: str, entries: list[Any], loader: Callable[[Any], ImageSample | None],
                 bad: BadRecords) -> None:
        self.name, self._entries, self._loader, self.bad = name, entries, loader, bad

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> ImageSample | None:
        return self._loader(self._entries[i])
