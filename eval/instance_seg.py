"""Zero-shot instance segmentation from a detector's boxes (paper Table 3; `eval run coco-seg` / `lvis-seg`).

The input is any COCO-results detections file (`--detections`; the paper uses ViTDet-H boxes, as SAM did): each box
is a prompt, mask 0 is brought to the original size and encoded as RLE, and score and category come from the
detector. Mask AP with AP S/M/L (COCO, 100 per image) or APr/c/f (LVIS, 300 per image)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import instances
from .questions import Question, reading
from .spec import RunInputs, ScoreOptions

if TYPE_CHECKING:
    from tokenizer_tap.predictor import TapPredictor

    from .tap_answerers import InstanceAnswerer

LMMS = None
TAP_ONLY, CHOICES, IMAGES_REQUIRED = True, "", True
submission = None
read_results = instances.read_results  # `score` also takes any system's COCO results JSON


def load_annotations(path: str | Path) -> dict[str, Any]:
    """The instances file, every annotation with its mask (mask AP is scored)."""
    return instances.read(path, segments=True)


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    if inputs.questions is None or inputs.detections is None:
        raise FileNotFoundError("pass --questions (the COCO/LVIS instances file, for images and scoring) and "
                                "--detections (a COCO-results JSON of boxes, e.g. ViTDet-H's)")
    data = load_annotations(inputs.questions)
    if not Path(inputs.detections).is_file():
        raise FileNotFoundError(f"{inputs.detections}: no such file. The paper's ViTDet-H boxes "
                                "(coco_instances_val2017_vitdet_h_cascade.json, lvis_val_v1_vitdet_h_cascade.json) "
                                "were made with detectron2 and are not shipped; any detector's COCO results JSON works")
    with reading(inputs.detections, "detections file (COCO results JSON)"):
        detections = json.loads(Path(inputs.detections).read_text(encoding="utf-8"))
    if not isinstance(detections, list):
        raise ValueError(f"{inputs.detections}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
    kind = instances.flavour(data)
    boxes: dict[int, list[tuple[float, ...]]] = defaultdict(list)
    bad = {}
    known = instances.Known.of(data)
    for n, det in enumerate(detections):
        image_id = instances.as_id(det.get("image_id")) if isinstance(det, dict) else None
        why = known.problem(det, image_id, "bbox")
        if why is None and min(det["bbox"][2:]) < 1:
            why = "empty box"
        if why:
            bad[f"detection {n}"] = why
            continue
        x0, y0, x1, y1 = instances.xyxy(det["bbox"])
        boxes[image_id].append((x0, y0, x1, y1, int(det["category_id"]), float(det["score"])))
    for rows in boxes.values():  # the evaluator reads only the best maxDets per image
        rows.sort(key=lambda r: -r[5])
        del rows[instances.MAX_PER_IMAGE[kind]:]
    return instances.questions_per_image(data, boxes), data, bad


def tap_answerer(predictor: TapPredictor, annotations: Any, model_id: str, **_: Any) -> InstanceAnswerer:
    from .tap_answerers import InstanceAnswerer  # torch and TAP: scoring detections stays torch-free
    predictor.decoder_batch = max(predictor.decoder_batch, instances.DECODER_BATCH)
    return InstanceAnswerer(predictor, "segment", model_id=model_id)


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    results = instances.results_of(rows, annotations, "segmentation")
    metrics = instances.evaluate(annotations, results.detections, "segm", results.images if options.partial else None)
    return {"metrics": metrics, "scored": len(results.images), "regions": len(results.detections),
            **results.summary(),
            "rule": f"mask AP ({instances.flavour(annotations).upper()} evaluator) of TAP's mask 0 on the detector's "
                    "boxes, with the detector's scores and categories"}
