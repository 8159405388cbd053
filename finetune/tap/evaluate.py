"""Region-level quality of a TAP model on held-out annotated images: point- and box-prompt mIoU, concept top-1 and
captions, each measured through `TapPredictor` exactly as the app and the eval harness run the model.

The point prompt is the mask pixel nearest to the mask's centroid (inside the mask, so also for rings and
crescents); the box prompt is the mask's tight box. Concepts and captions are read from the box prompt, as the
official classification and captioning evaluations do. Caption metrics are left to the caller (the eval harness's
scorer), which gets predictions and references keyed by region.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tokenizer_tap.predictor import TapPredictor
from tokenizer_tap.prompts import Prompt

from .records import RegionDataset


@dataclass
class RegionScores:
    point_miou: float
    box_miou: float
    concept_top1: float  # over regions with a known concept
    regions: int
    labelled: int
    majority: float  # top-1 of always answering the most frequent concept: the bar for "above chance"
    captions: dict[str, str] = field(default_factory=dict)  # region key -> generated caption (box prompt)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("point_miou", "box_miou", "concept_top1", "regions", "labelled",
                                              "majority")}


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel nearest to its centroid, as (x + 0.5, y + 0.5)."""
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def evaluate_regions(predictor: TapPredictor, data: RegionDataset, labels: dict[str, str] | None = None,
                     captions: bool = True, max_images: int | None = None) -> RegionScores:
    """Score every masked region of `data` (at most `max_images` images). `labels` maps region keys to concepts."""
    labels = labels or {}
    point_ious, box_ious, hits, truth = [], [], [], []
    generated: dict[str, str] = {}
    for i in range(len(data) if max_images is None else min(max_images, len(data))):
        sample = data[i]
        if sample is None:
            continue
        regions = [r for r in sample.regions if r.mask is not None and r.mask.any()]
        if not regions:
            continue
        key = predictor.set_image(sample.image)
        points = [Prompt.point(*interior_point(r.mask)) for r in regions]
        boxes = [Prompt.from_box(*r.bbox) for r in regions]
        by_point = predictor.predict(points, image=key, top_k=1, caption=False)
        by_box = predictor.predict(boxes, image=key, top_k=1, caption=captions)
        for r, p, b in zip(regions, by_point, by_box):
            point_ious.append(iou(p.mask, r.mask))
            box_ious.append(iou(b.mask, r.mask))
            if captions:
                generated[r.key] = b.caption
            if r.key in labels:
                truth.append(labels[r.key])
                hits.append(b.concept == labels[r.key])
    if not point_ious:
        raise ValueError(f"{getattr(data, 'name', 'the data')}: no region with a mask to evaluate")
    majority = Counter(truth).most_common(1)[0][1] / len(truth) if truth else 0.0
    return RegionScores(float(np.mean(point_ious)), float(np.mean(box_ious)),
                        float(np.mean(hits)) if hits else 0.0, len(point_ious), len(truth), majority, generated)
