"""GQA testdev-balanced scoring, as the official script: exact match of the GQA-normalised prediction with
`answer` over balanced questions, with the binary/open split and breakdowns by structural type, semantic type,
reasoning steps and question length."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .lmms import SHORT, Loaded, read_rows, write_image
from .normalize import normalize_exact_match, normalize_gqa
from .questions import Question, load_bunny, read_json_or_tar
from .spec import RunInputs, ScoreOptions, predictions

BINARY = {"verify", "logical", "choose", "compare"}
LMMS = ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev")
GQA_IMAGES = "testdev_balanced_images"  # the lmms-lab config holding the images
TAP_ONLY, CHOICES, IMAGES_REQUIRED = False, "", False
submission = None


def load_annotations(path: str | Path) -> dict[str, dict[str, Any]]:
    """The official `testdev_balanced_questions.json` (or the .tar.gz holding it)."""
    return json.loads(read_json_or_tar(path, "questions.json"))


def score(predictions: dict[str, str], annotations: dict[str, dict[str, Any]], *,
          partial: bool = False, lenient: bool = False) -> dict[str, Any]:
    """Accuracy and breakdowns. Like the official script every balanced question needs a prediction, unless
    `partial` (a --limit run), which scores the answered ones and reports the coverage. `lenient` is lmms-eval's
    exact_match (punctuation anywhere ignored) instead of the official rule."""
    balanced = {q: a for q, a in annotations.items() if a.get("isBalanced", True)}
    missing = [q for q in balanced if q not in predictions]
    if missing and not partial:
        raise ValueError(f"{len(missing)} of {len(balanced)} balanced questions have no prediction "
                         f"(first: {missing[0]}); score a --limit run with partial=True")
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    hits = []
    for qid, ann in balanced.items():
        if qid not in predictions:
            continue
        ok = (normalize_exact_match(predictions[qid]) == normalize_exact_match(ann["answer"]) if lenient
              else normalize_gqa(predictions[qid]) == ann["answer"])
        hits.append(ok)
        types = ann.get("types", {})
        structural = types.get("structural", "unknown")
        groups["binary/open"]["binary" if structural in BINARY else "open"].append(ok)
        groups["structural"][structural].append(ok)
        groups["semantic"][types.get("semantic", "unknown")].append(ok)
        groups["steps"][str(len(ann.get("semantic", [])))].append(ok)
        groups["length"][str(len(ann["question"].split()))].append(ok)
    return {"accuracy": _mean(hits), "scored": len(hits), "balanced": len(balanced),
            "coverage": len(hits) / max(1, len(balanced)),
            "breakdowns": {g: {k: {"accuracy": _mean(v), "n": len(v)} for k, v in sorted(d.items(), key=_order)}
                           for g, d in groups.items()}}


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _order(item: tuple[str, Any]) -> tuple[int, Any]:
    key = item[0]
    return (0, int(key)) if key.isdigit() else (1, key)


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    return load_bunny(inputs, load_annotations)


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    return {**score(predictions(rows), annotations, partial=options.partial, lenient=options.lenient),
            "rule": "lmms-eval exact_match" if options.lenient else "official"}


def from_lmms(rows: list[dict], image_dir: Path, source: str | Path, inputs: RunInputs) -> Loaded:
    """Questions from the instructions config, images from the images config (written once)."""
    wanted = {r["imageId"] for r in rows}
    written = {}
    for r in read_rows(source, GQA_IMAGES, "testdev"):
        if r["id"] in wanted:
            written[r["id"]] = write_image(image_dir, f"{r['id']}.jpg", r["image"])
    questions, annotations, bad = [], {}, {}
    for r in rows:
        qid = str(r["id"])
        annotations[qid] = {k: r.get(k) for k in ("answer", "question", "types", "semantic", "isBalanced")}
        annotations[qid]["semantic"] = annotations[qid]["semantic"] or []
        annotations[qid]["types"] = annotations[qid]["types"] or {}
        if written.get(r["imageId"]) is None:
            bad[qid] = f"image {r['imageId']} not in {GQA_IMAGES}"
            continue
        questions.append(Question(qid, written[r["imageId"]], r["question"] + SHORT, "default", r["id"]))
    return Loaded(questions, annotations, bad)
