"""TextVQA val scoring: each prompt is matched to the official annotation by (image id, lowercased question; the OCR
and answer-format lines are dropped), then VQA soft accuracy over the 10 reference answers, both sides normalised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import vqa
from .lmms import Loaded, vqa_questions
from .normalize import m4c_accuracy
from .questions import Question, load_bunny
from .spec import RunInputs, ScoreOptions, predictions

LMMS = ("lmms-lab/textvqa", None, "validation")
TAP_ONLY, CHOICES, IMAGES_REQUIRED = False, "", False
submission = None


def question_of(prompt: str) -> str:
    return prompt.split("\n")[0].strip().lower()


def score(answers: list[dict[str, Any]], annotations: str | Path) -> dict[str, Any]:
    """`answers`: rows with `question_id` (the image id), `prompt` and `text`."""
    references = index(annotations)
    scores, unmatched = [], 0
    for row in answers:
        refs = references.get((str(row["question_id"]), question_of(row.get("prompt", ""))))  # no prompt: unmatched
        if refs is None:
            unmatched += 1
            continue
        scores.append(m4c_accuracy(row["text"], refs))
    return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "scored": len(scores), "unmatched": unmatched}


def load_annotations(path: str | Path) -> Path:
    """The official val JSON stays a path: prompts are matched to it by (image id, question), see `score`. Read
    once here all the same, so that a file `score` could not use is refused before any question is answered."""
    index(path)
    return Path(path)


def index(path: str | Path) -> dict[tuple[str, str], list[str]]:
    """(image id, lowercased question) -> the reference answers."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    return {(a["image_id"], a["question"].strip().lower()): a["answers"] for a in data}


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    return load_bunny(inputs, load_annotations)


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    if isinstance(annotations, dict):  # from parquet: question id -> answers, the VQAv2 shape
        # raw=True: m4c_accuracy runs the processor itself, on both sides
        result = vqa.score(predictions(rows), annotations, raw=True, accuracy=m4c_accuracy)
    else:
        result = {**score(rows, annotations), "breakdowns": {}}
    return {**result, "rule": "m4c TextVQA accuracy (the processor on predictions and answers), as Bunny"}


def from_lmms(rows: list[dict], image_dir: Path, source: str | Path, inputs: RunInputs) -> Loaded:
    return vqa_questions(rows, image_dir, textvqa=True, ocr=inputs.ocr)
