"""Zero-shot instance classification with ground-truth boxes (paper Table 1; `eval run lvis-cls` / `coco-cls`).

Every GT box of an image is a prompt (one encoder pass per image); the concept probabilities of its mask-0 semantic
token over the dataset vocabulary give, for every (box, class) with probability > 0.001, a detection scored
sqrt(prob x clip(IoU prediction, 0, 1)); per-class NMS at IoU 0.5 and the top 300 per image, then box AP with the
dataset's evaluator (LVIS: AP, APr, APc, APf)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from . import instances
from .questions import Question
from .spec import RunInputs, ScoreOptions

if TYPE_CHECKING:
    from tokenizer_tap.predictor import TapPredictor

    from .tap_answerers import InstanceAnswerer

LMMS = None
TAP_ONLY, CHOICES, IMAGES_REQUIRED = True, "", True
CONCEPTS = {"lvis": "lvis_1203", "coco": "coco_80"}  # the official vocabularies, when --concepts is not given
submission = None
load_annotations = instances.read
read_results = instances.read_results  # `score` also takes any system's COCO results JSON


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    if inputs.questions is None:
        raise FileNotFoundError("pass --questions: the LVIS v1 val (lvis_v1_val.json) or COCO instances file")
    data = instances.read(inputs.questions)
    boxes: dict[int, list[tuple[float, ...]]] = defaultdict(list)
    bad = {}
    for ann in data.get("annotations", []):  # `read` checked every field used here
        x0, y0, x1, y1 = instances.xyxy(ann["bbox"])
        if ann.get("iscrowd", 0) or x1 - x0 < 1 or y1 - y0 < 1:
            bad[f"annotation {ann['id']}"] = "crowd region" if ann.get("iscrowd", 0) else "empty box"
            continue
        boxes[ann["image_id"]].append((x0, y0, x1, y1))
    return instances.questions_per_image(data, boxes), data, bad


def tap_answerer(predictor: TapPredictor, annotations: Any, model_id: str, **_: Any) -> InstanceAnswerer:
    from .tap_answerers import InstanceAnswerer  # torch and TAP: scoring detections stays torch-free
    predictor.decoder_batch = max(predictor.decoder_batch, instances.DECODER_BATCH)
    names = predictor.model.concept_projector.names
    if not names:
        raise ValueError(f"{model_id} has no concept vocabulary (trained without priors?): pass --concepts FILE")
    return InstanceAnswerer(predictor, "classify", instances.vocabulary_categories(names, annotations), model_id)


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    results = instances.results_of(rows, annotations, "bbox")
    metrics = instances.evaluate(annotations, results.detections, "bbox", results.images if options.partial else None)
    return {"metrics": metrics, "scored": len(results.images), "regions": len(annotations.get("annotations", [])),
            **results.summary(),
            "rule": f"box AP ({instances.flavour(annotations).upper()} evaluator) of TAP's concepts on GT boxes, "
                    "score sqrt(prob x IoU), per-class NMS 0.5, top 300 per image"}


def default_concepts(annotations: Any) -> str:
    """The official vocabulary of the dataset already loaded by `load_run`."""
    return CONCEPTS[instances.flavour(annotations)]
