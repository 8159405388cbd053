"""What the region-level benchmarks share (paper Tables 1 and 3): COCO / LVIS instance files, one question per image
carrying its box prompts, and the maintained evaluators. TAP answering all of an image's boxes after one encoder pass
is `tap_answerers.InstanceAnswerer`.

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

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .answers import read_answers
from .questions import Question, reading

MAX_PER_IMAGE = {"coco": 100, "lvis": 300}  # the evaluators' maxDets; eval_cls keeps 300 per image for both
DECODER_BATCH = 256  # prompts per decoder call, as the official scripts
WHERE = ("LVIS v1 val: lvis_v1_val.json from https://www.lvisdataset.org/dataset (images: COCO 2017 train/val); "
         "COCO: annotations_trainval2017.zip and val2017.zip from https://cocodataset.org/#download")


def read(path: str | Path, segments: bool = False) -> dict[str, Any]:
    """A COCO or LVIS instances file; a missing one is reported with where to get it. A ground-truth annotation
    the evaluators cannot read refuses the file (skipping it would change what AP measures); `segments`: the
    masks are scored too, so every annotation needs its segmentation."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file. {WHERE}")
    with reading(path, "COCO/LVIS instances file"):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not {"images", "categories"} <= set(data):
        raise ValueError(f"{path}: not a COCO/LVIS instances file (needs images and categories)")
    problems = ground_truth_problems(data, segments)
    if problems:
        raise ValueError(f"{path}: {len(problems)} malformed records, which the evaluator cannot score against: "
                         + "; ".join(problems[:3]))
    return data


def ground_truth_problems(data: dict[str, Any], segments: bool) -> list[str]:
    """What the evaluators would trip over: images without id or size, categories without id or name, annotations
    missing a field they read or naming an unknown image or category."""
    problems: list[str] = []
    lvis = flavour(data) == "lvis"
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict) or any(as_id(image.get(k)) is None for k in ("id", "width", "height")):
            problems.append(f"image {n}: needs integer id, width and height")
    for n, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or as_id(category.get("id")) is None or "name" not in category:
            problems.append(f"category {n}: needs an integer id and a name")
    if problems:
        return problems
    images = {image["id"] for image in data["images"]}
    categories = {category["id"] for category in data["categories"]}
    needed = ("id", "image_id", "category_id", "bbox", *(() if lvis else ("area", "iscrowd")),
              *(("segmentation",) if segments else ()))
    for n, ann in enumerate(data.get("annotations", [])):
        where = f"annotation {ann.get('id', n) if isinstance(ann, dict) else n}"
        if not isinstance(ann, dict):
            problems.append(f"{where}: not an object")
        elif missing := [k for k in needed if k not in ann]:
            problems.append(f"{where}: no {' or '.join(missing)}")
        elif ann["image_id"] not in images:
            problems.append(f"{where}: image {ann['image_id']!r} is not in images")
        elif ann["category_id"] not in categories:
            problems.append(f"{where}: category {ann['category_id']!r} is not in categories")
        elif _box(ann["bbox"]) is None:
            problems.append(f"{where}: bbox {ann['bbox']!r} is not [x, y, width, height]")
    return problems


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


def evaluate(data: dict[str, Any], results: list[dict[str, Any]], iou_type: str,
             image_ids: list[int] | None = None) -> dict[str, float]:
    """AP of `results` (COCO results format) against `data`, x100 as papers print them: AP, AP50, AP75 and APs/m/l
    (COCO) or APr/c/f (LVIS). `image_ids` restricts scoring to the images that were answered."""
    kind = flavour(data)
    if not results:
        raise ValueError("no detections to score")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if kind == "coco":  # each evaluator loads only for its own dataset
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


def read_results(path: str | Path, bad: dict[str, str]) -> list[dict[str, Any]]:
    """Answer rows from our answers JSONL (one row per image), or from any system's COCO results JSON (a list of
    {image_id, category_id, bbox or segmentation, score}), grouped per image the same way. Records without a usable
    image id go to `bad`; the detections themselves are checked by `results_of`."""
    with reading(path, "results file"):
        text = Path(path).read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:  # JSON lines, or not JSON at all
        whole = None
    if isinstance(whole, dict) and "question_id" not in whole:
        raise ValueError(f"{path}: a JSON object, not a COCO results list [{{image_id, category_id, bbox or "
                         "segmentation, score}, ...] nor answers JSONL")
    if not isinstance(whole, list):
        return read_answers(path, bad)
    per_image: dict[int, list[dict[str, Any]]] = {}
    for n, det in enumerate(whole):
        image_id = as_id(det.get("image_id")) if isinstance(det, dict) else None
        if image_id is None:
            bad[f"detection {n}"] = "no integer image_id" if isinstance(det, dict) else "not a detection object"
            continue
        per_image.setdefault(image_id, []).append({k: v for k, v in det.items() if k != "image_id"})
    return [{"question_id": i, "text": json.dumps(dets)} for i, dets in per_image.items()]


@dataclass
class Results:
    """Detections the evaluator can read (COCO results format), the images answered, and what was set aside on the
    way, for the report: unreadable or unknown records, and (LVIS) detections beyond an image's best 300."""

    detections: list[dict[str, Any]]
    images: list[int]
    skipped: dict[str, str]
    dropped: int = 0

    def summary(self) -> dict[str, Any]:
        notes = [f"{self.dropped} detections beyond the best {MAX_PER_IMAGE['lvis']} of their image dropped, as the "
                 "official LVIS evaluator does"] if self.dropped else []
        return {"skipped": self.skipped, "dropped": self.dropped, "notes": notes}


@dataclass(frozen=True)
class Known:
    """An instances file's images, (height, width) by id, and category ids: what each detection is checked against."""

    sizes: dict[int, tuple[int, int]]
    categories: frozenset[int]

    @classmethod
    def of(cls, data: dict[str, Any]) -> Known:
        return cls({image["id"]: (int(image["height"]), int(image["width"])) for image in data["images"]},
                   frozenset(c["id"] for c in data["categories"]))

    def problem(self, det: Any, image_id: Any, key: str) -> str | None:
        """Why a detection on `image_id` cannot be scored (`key`: "bbox" or "segmentation", what is scored); None
        when it can."""
        if not isinstance(det, dict):
            return "not a detection object"
        if as_id(image_id) is None:
            return "no integer image_id"
        size = self.sizes.get(as_id(image_id))
        if size is None:
            return f"image {image_id!r} is not in the annotations file"
        if as_id(det.get("category_id")) not in self.categories:
            return f"category {det.get('category_id')!r} is not in the annotations file"
        if not isinstance(det.get("score"), int | float) or not np.isfinite(det["score"]):
            return "no numeric score"
        if key == "bbox":
            return None if _box(det.get("bbox")) is not None else "no bbox [x, y, width, height]"
        segmentation = det.get("segmentation")
        if isinstance(segmentation, dict) and "counts" in segmentation:
            if [as_id(v) for v in segmentation.get("size") or []] != list(size):
                return f"mask size {segmentation.get('size')!r} is not the image's [height, width] {list(size)}"
            return None
        if isinstance(segmentation, list) and segmentation and all(
                isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
            return None
        return "no segmentation (an RLE {size, counts} or polygons)"


def results_of(rows: list[dict[str, Any]], data: dict[str, Any], key: str) -> Results:
    """The answer rows' per-image JSON lists as one COCO results list, each detection checked against `data`
    (`key`: "bbox" or "segmentation", what is scored). LVIS keeps the best 300 per image by score, as its evaluator
    (max_dets=300); the COCO evaluator applies its own per-class maxDets."""
    known = Known.of(data)
    out = Results([], [], {})
    for row in rows:
        image_id = as_id(row["question_id"])
        if image_id not in known.sizes:
            out.skipped[f"image {row['question_id']}"] = "not in the annotations file"
            continue
        try:
            detections = json.loads(row["text"])
        except json.JSONDecodeError:
            detections = None
        if not isinstance(detections, list):
            out.skipped[f"image {image_id}"] = "the answer is not a JSON list of detections"
            continue
        kept = []
        for j, det in enumerate(detections):
            why = known.problem(det, image_id, key)
            if why:
                out.skipped[f"image {image_id} detection {j}"] = why
            else:
                kept.append({**det, "image_id": image_id})
        if flavour(data) == "lvis" and len(kept) > MAX_PER_IMAGE["lvis"]:
            kept.sort(key=lambda d: d["score"], reverse=True)  # stable, as lvis-api's sorted(..., reverse=True)
            out.dropped += len(kept) - MAX_PER_IMAGE["lvis"]
            del kept[MAX_PER_IMAGE["lvis"]:]
        out.images.append(image_id)
        out.detections += kept
    if not out.detections:
        first = next(iter(out.skipped.items()), None)
        raise ValueError("no detections left to score" + (f": {len(out.skipped)} records skipped, first "
                                                          f"{first[0]}: {first[1]}" if first else ""))
    return out


def as_id(value: Any) -> int | None:
    """An id as an int: ints, integral floats and digit strings (JSON writers differ); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _box(value: Any) -> tuple[float, float, float, float] | None:
    """[x, y, w, h] as four finite floats with w, h >= 0; None when it is not one."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        return None
    return None if value[2] < 0 or value[3] < 0 else tuple(float(v) for v in value)


def vocabulary_categories(names: list[str], data: dict[str, Any]) -> list[int]:
    """The dataset category id of each vocabulary entry, by name (case, "_" and "-" ignored, as the released
    vocabularies spell LVIS names). A name that is not one of the dataset's categories refuses the vocabulary, with
    the first mismatches: mapping by position instead would score one concept as another whenever the orders
    differ."""
    def key(name: str) -> str:
        return " ".join(name.replace("_", " ").replace("-", " ").lower().split())
    by_name = {key(c["name"]): c["id"] for c in data["categories"]}
    mismatches = [f"{i}: {n!r}" for i, n in enumerate(names) if key(n) not in by_name]
    if mismatches:
        known = ", ".join(repr(c["name"]) for c in sorted(data["categories"], key=lambda c: c["id"])[:3])
        raise ValueError(f"the concept vocabulary does not match the dataset's categories: {len(mismatches)} of "
                         f"{len(names)} names are not category names (entries {'; '.join(mismatches[:5])}; the "
                         f"categories are e.g. {known}): pass --concepts with the dataset's vocabulary")
    return [by_name[key(n)] for n in names]
