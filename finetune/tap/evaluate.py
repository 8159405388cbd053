"""Region-level quality of a TAP model on held-out annotated images: point- and box-prompt mIoU, concept top-1 and
captions, each measured through `TapPredictor` exactly as the app and the eval harness run the model.

The point prompt is the mask pixel nearest to the mask's centroid (inside the mask, so also for rings and
crescents); the box prompt is the mask's tight box. Concepts and captions are read from the box prompt, as the
official classification and captioning evaluations do. Caption metrics are left to the caller (the eval harness's
scorer), which gets predictions and references keyed by region.

Two figures put point mIoU in context: the oracle (the best of the decoder's point masks, SAM's ambiguity-aware
score: a click inside a window is as much the house's click) and the grid ceiling (each true mask passed through
the decoder's low-res output grid, upscaled as predictions are: what a decoder right about every cell of its
output could score).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer_tap.predictor import TapPredictor
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.transforms import ResizeInfo, upscale_masks

from .samples import RegionDataset


@dataclass
class RegionScores:
    point_miou: float
    box_miou: float
    concept_top1: float  # over regions with a known concept
    regions: int
    labelled: int
    majority: float  # top-1 of always answering the most frequent concept: the bar for "above chance"
    point_miou_oracle: float = 0.0  # the best of each click's point masks
    grid_ceiling: float = 0.0  # the true masks through the decoder's output grid
    captions: dict[str, str] = field(default_factory=dict)  # region key -> generated caption (box prompt)
    point_ious: dict[str, float] = field(default_factory=dict)  # region key -> point-click IoU (breakdowns)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("point_miou", "point_miou_oracle", "grid_ceiling", "box_miou",
                                              "concept_top1", "regions", "labelled", "majority")}


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel nearest to its centroid, as (x + 0.5, y + 0.5)."""
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def through_grid(mask: np.ndarray, info: ResizeInfo, cells: int) -> np.ndarray:
    """`mask` as drawn by `cells` x `cells` low-res logits that are right about every cell (its share of the cell,
    minus one half, in the padded model input), upscaled exactly as predictions are (`upscale_masks`)."""
    rh, rw = info.resized_hw
    x = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], (rh, rw), mode="bilinear",
                      align_corners=False)
    x = F.pad(x, (0, info.size - rw, 0, info.size - rh))
    return upscale_masks(F.adaptive_avg_pool2d(x, cells)[0] - 0.5, info)[0].numpy()


def evaluate_regions(predictor: TapPredictor, data: RegionDataset, labels: dict[str, str] | None = None,
                     captions: bool = True, max_images: int | None = None) -> RegionScores:
    """Score every masked region of `data` (at most `max_images` images). `labels` maps region keys to concepts."""
    labels = labels or {}
    config = predictor.model.config
    cells = config.grid_size * 4  # the decoder's low-res masks: two stride-2 transposed convs over the token grid
    point_ious, oracle_ious, ceiling, box_ious, hits, truth = [], [], [], [], [], []
    by_key: dict[str, float] = {}
    generated: dict[str, str] = {}
    for i in range(len(data) if max_images is None else min(max_images, len(data))):
        sample = data[i]
        if sample is None:
            continue
        regions = [r for r in sample.regions if r.mask is not None and r.mask.any()]
        if not regions:
            continue
        key = predictor.set_image(sample.image)
        info = ResizeInfo.for_image(*sample.image.shape[:2], size=config.image_size)
        points = [Prompt.point(*interior_point(r.mask)) for r in regions]
        boxes = [Prompt.from_box(*r.bbox) for r in regions]
        by_point = predictor.candidates(points, image=key)
        by_box = predictor.predict(boxes, image=key, top_k=1, caption=captions)
        for r, p, b in zip(regions, by_point, by_box):
            ious = [iou(m, r.mask) for m in p.masks]
            point_ious.append(ious[p.chosen])
            by_key[r.key] = ious[p.chosen]
            oracle_ious.append(max(ious[1:]))  # mask 0 answers boxes; a click routes among the others
            ceiling.append(iou(through_grid(r.mask, info, cells), r.mask))
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
                        float(np.mean(hits)) if hits else 0.0, len(point_ious), len(truth), majority,
                        float(np.mean(oracle_ious)), float(np.mean(ceiling)), generated, by_key)
