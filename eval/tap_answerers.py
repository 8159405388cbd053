"""The answerers that run TAP itself (the runner drives them as it drives `ChatAnswerer`): region captions, and
instance classification and segmentation on an image's boxes. They are the only part of the TAP benchmarks that
needs torch and the model; the benchmark modules build them in `tap_answerer`, so that loading a benchmark to score
its answers stays torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenizer_tap.predictor import TapPredictor
from tokenizer_tap.prompts import Prompt

from .questions import Question


@dataclass
class RegionCaptioner:
    """TAP's caption for each region's box; the image is encoded once for all its regions in a batch."""

    predictor: TapPredictor
    max_new_tokens: int | None = None
    model_id: str = "tap"

    def answer(self, items: list[tuple[Question, np.ndarray | None]], batch_size: int) -> list[str]:
        out: list[str] = []
        start = 0
        while start < len(items):
            image = items[start][1]
            end = start
            while end < len(items) and items[end][1] is image:
                end += 1
            key = self.predictor.set_image(image)
            h, w = image.shape[:2]  # annotation boxes may overhang the image by a pixel or two
            prompts = [Prompt.from_box(*np.clip(q.box, 0, [w - 1, h - 1, w - 1, h - 1])) for q, _ in items[start:end]]
            regions = self.predictor.predict(prompts, image=key, top_k=1, max_new_tokens=self.max_new_tokens)
            out += [r.caption for r in regions]
            start = end
        return out


@dataclass
class InstanceAnswerer:
    """TAP on every box of an image after one encoder pass: `classify` gives the per-class detections of the
    official `eval_cls`, `segment` the mask-0 RLEs of `eval_seg` (category and score from the detector)."""

    predictor: TapPredictor
    task: str  # "classify" or "segment"
    category_ids: list[int] | None = None  # classify: the dataset category of each vocabulary entry
    model_id: str = "tap"
    min_prob: float = 0.001
    nms_iou: float = 0.5
    per_image: int = 300

    def answer(self, items: list[tuple[Question, np.ndarray | None]], batch_size: int) -> list[str]:
        out = []
        for q, image in items:
            key = self.predictor.set_image(image)
            h, w = image.shape[:2]
            prompts = box_prompts(q.regions, w, h)
            detections = (self._classify(q, prompts, key) if self.task == "classify"
                          else self._segment(q, prompts, key))
            out.append(json.dumps(detections, separators=(",", ":")))
        return out

    def _classify(self, q: Question, prompts: list[Prompt], key: str) -> list[dict[str, Any]]:
        iou, probs = self.predictor.classify(prompts, image=key)
        scores = np.sqrt(probs * np.clip(iou, 0, 1)[:, None])
        boxes = torch.tensor([r[:4] for r in q.regions], dtype=torch.float32)
        kept: list[tuple[float, int, int]] = []  # (score, box index, vocabulary index)
        for k in np.flatnonzero((probs > self.min_prob).any(0)):
            rows = np.flatnonzero(probs[:, k] > self.min_prob)
            for i in nms(boxes[rows], torch.from_numpy(scores[rows, k]), self.nms_iou):
                kept.append((float(scores[rows[i], k]), int(rows[i]), int(k)))
        kept.sort(reverse=True)
        return [{"category_id": self.category_ids[k], "bbox": _xywh(q.regions[i]), "score": round(s, 6)}
                for s, i, k in kept[:self.per_image]]

    def _segment(self, q: Question, prompts: list[Prompt], key: str) -> list[dict[str, Any]]:
        from pycocotools import mask as coco_mask  # segmentation only
        regions = self.predictor.predict(prompts, image=key, top_k=1, caption=False)
        out = []
        for r, region in zip(q.regions, regions):
            rle = coco_mask.encode(np.asfortranarray(region.mask.astype(np.uint8)))
            out.append({"category_id": int(r[4]), "score": float(r[5]),
                        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}})
        return out


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression (xyxy boxes): indices kept, best first."""
    order = torch.argsort(scores, descending=True)
    keep: list[int] = []
    x0, y0, x1, y1 = boxes.unbind(1)
    areas = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    while order.numel():
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x1[rest], x1[i]) - torch.maximum(x0[rest], x0[i])).clamp(min=0)
        h = (torch.minimum(y1[rest], y1[i]) - torch.maximum(y0[rest], y0[i])).clamp(min=0)
        inter = w * h
        order = rest[inter / (areas[rest] + areas[i] - inter).clamp(min=1e-9) <= iou]
    return keep


def box_prompts(regions: tuple[tuple[float, ...], ...], width: int, height: int) -> list[Prompt]:
    """Boxes as prompts, clipped to the image (annotation and detector boxes may overhang it a little)."""
    out = []
    for r in regions:
        x0, y0, x1, y1 = np.clip(r[:4], 0, [width, height, width, height])
        out.append(Prompt.from_box(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    return out


def _xywh(r: tuple[float, ...]) -> list[float]:
    return [round(r[0], 2), round(r[1], 2), round(r[2] - r[0], 2), round(r[3] - r[1], 2)]
