"""What the region-level benchmarks share (paper Tables 1 and 3): COCO / LVIS instance files, one question per image
carrying its box prompts, TAP answering all of an image's boxes after one encoder pass, and the maintained
evaluators.

Evaluators: pycocotools' COCOeval for COCO; for LVIS, faster-coco-eval's LVIS mode (`lvis_style`: the federated
rules, i.e. negative and not-exhaustive categories, 300 detections per image, AP over the r/c/f frequency groups).
The `lvis` package (0.5.3, 2020) is the reference implementation but no longer runs on numpy 2 (its accumulate step
calls `np.float`, removed in numpy 1.24); `tests/test_eval_instances.py` runs both on the same results, with that
one alias patched in for the old package, and requires the same APs.

Images: a COCO file names each image by `file_name` under `--images` (e.g. val2017/); an LVIS file by `coco_url`,
whose last two parts (`val2017/<name>.jpg`, or train2017 for the few LVIS val images from COCO train) are the path
under `--images` (the COCO root), as the official scripts look them up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenizer_tap.predictor import TapPredictor
from tokenizer_tap.prompts import Prompt

from .questions import Question

MAX_PER_IMAGE = {"coco": 100, "lvis": 300}  # the evaluators' maxDets; eval_cls keeps 300 per image for both
DECODER_BATCH = 256  # prompts per decoder call, as the official scripts
WHERE = ("LVIS v1 val: lvis_v1_val.json from https://www.lvisdataset.org/dataset (images: COCO 2017 train/val); "
         "COCO: annotations_trainval2017.zip and val2017.zip from https://cocodataset.org/#download")


def read(path: str | Path) -> dict[str, Any]:
    """A COCO or LVIS instances file; a missing one is reported with where to get it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file. {WHERE}")
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not {"images", "categories"} <= set(data):
        raise ValueError(f"{path}: not a COCO/LVIS instances file (needs images and categories)")
    return data


def flavour(data: dict[str, Any]) -> str:
    """'lvis' when the categories carry LVIS frequency groups, else 'coco'."""
    return "lvis" if data["categories"] and all("frequency" in c for c in data["categories"]) else "coco"


def image_path(image: dict[str, Any]) -> str:
    if image.get("file_name"):
        return image["file_name"]
    if image.get("coco_url"):
        return "/".join(image["coco_url"].rstrip("/").split("/")[-2:])
    raise ValueError(f"image {image.get('id')} has neither file_name nor coco_url")


def xyxy(bbox: list[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def questions_per_image(data: dict[str, Any], boxes: dict[int, list[tuple[float, ...]]]) -> list[Question]:
    """One question per image that has boxes: its id is the image id, its regions the boxes (with extras)."""
    out = []
    for image in data["images"]:
        regions = boxes.get(image["id"])
        if regions:
            out.append(Question(str(image["id"]), image_path(image), "", "image", image["id"],
                                regions=tuple(regions)))
    return out


def box_prompts(regions: tuple[tuple[float, ...], ...], width: int, height: int) -> list[Prompt]:
    """Boxes as prompts, clipped to the image (annotation and detector boxes may overhang it a little)."""
    out = []
    for r in regions:
        x0, y0, x1, y1 = np.clip(r[:4], 0, [width, height, width, height])
        out.append(Prompt.from_box(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    return out


def evaluate(data: dict[str, Any], results: list[dict[str, Any]], iou_type: str,
             image_ids: list[int] | None = None) -> dict[str, float]:
    """AP of `results` (COCO results format) against `data`, x100 as papers print them: AP, AP50, AP75 and APs/m/l
    (COCO) or APr/c/f (LVIS). `image_ids` restricts scoring to the images that were answered."""
    import contextlib
    import io
    kind = flavour(data)
    if not results:
        raise ValueError("no detections to score")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if kind == "coco":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            gt = COCO()
            gt.dataset = data
            gt.createIndex()
            run = COCOeval(gt, gt.loadRes(results), iou_type)
        else:
            from faster_coco_eval import COCO as FastCOCO
            from faster_coco_eval import COCOeval_faster
            gt = FastCOCO(data)
            run = COCOeval_faster(gt, gt.loadRes(results), iou_type, lvis_style=True, print_function=print)
            run.params.maxDets = [MAX_PER_IMAGE["lvis"]]
        if image_ids is not None:
            run.params.imgIds = sorted(image_ids)
        run.evaluate()
        run.accumulate()
        run.summarize()
    if kind == "coco":
        names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        return {n: 100 * float(v) for n, v in zip(names, run.stats[:6])}
    stats = run.stats_as_dict
    return {"AP": 100 * float(stats["AP_all"]), "AP50": 100 * float(stats["AP_50"]),
            "AP75": 100 * float(stats["AP_75"]), "APr": 100 * float(stats["APr"]),
            "APc": 100 * float(stats["APc"]), "APf": 100 * float(stats["APf"])}


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Answer rows from our answers JSONL (one row per image), or from any system's COCO results JSON (a list of
    {image_id, category_id, bbox or segmentation, score}), grouped per image the same way."""
    text = Path(path).read_text()
    if not text.lstrip().startswith("["):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    per_image: dict[int, list[dict[str, Any]]] = {}
    for det in json.loads(text):
        per_image.setdefault(int(det["image_id"]), []).append({k: v for k, v in det.items() if k != "image_id"})
    return [{"question_id": i, "text": json.dumps(dets)} for i, dets in per_image.items()]


def results_of(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The answers file's per-image JSON lists, as one COCO results list, and the answered image ids."""
    results, ids = [], []
    for row in rows:
        image_id = int(row["question_id"])
        ids.append(image_id)
        for det in json.loads(row["text"]):
            results.append({**det, "image_id": image_id})
    return results, ids


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
        from pycocotools import mask as coco_mask
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


def vocabulary_categories(names: list[str], data: dict[str, Any]) -> list[int]:
    """The dataset category id of each vocabulary entry: by name (case and "_" ignored), else by position when the
    vocabulary has exactly the dataset's categories in id order (as lvis_1203 / coco_80 do)."""
    def key(name: str) -> str:
        return name.replace("_", " ").strip().lower()
    categories = sorted(data["categories"], key=lambda c: c["id"])
    by_name = {key(c["name"]): c["id"] for c in categories}
    if all(key(n) in by_name for n in names):
        return [by_name[key(n)] for n in names]
    if len(names) == len(categories):
        return [c["id"] for c in categories]
    missing = [n for n in names if key(n) not in by_name][:5]
    raise ValueError(f"the concept vocabulary ({len(names)} names) does not match the dataset's {len(categories)} "
                     f"categories (e.g. {missing}): pass --concepts with the dataset's vocabulary")


def _xywh(r: tuple[float, ...]) -> list[float]:
    return [round(r[0], 2), round(r[1], 2), round(r[2] - r[0], 2), round(r[3] - r[1], 2)]
