"""TextVQA val scoring: each prompt is matched to the official annotation by (image id, lowercased question; the OCR
and answer-format lines are dropped), then VQA soft accuracy over the 10 reference answers, both sides normalised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .normalize import vqa_accuracy


def question_of(prompt: str) -> str:
    return prompt.split("\n")[0].strip().lower()


def score(answers: list[dict[str, Any]], annotations: str | Path) -> dict[str, Any]:
    """`answers`: rows with `question_id` (the image id), `prompt` and `text`."""
    data = json.loads(Path(annotations).read_text())["data"]
    index = {(a["image_id"], a["question"].strip().lower()): a["answers"] for a in data}
    scores, unmatched = [], 0
    for row in answers:
        refs = index.get((str(row["question_id"]), question_of(row["prompt"])))
        if refs is None:
            unmatched += 1
            continue
        scores.append(vqa_accuracy(row["text"], refs))
    return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "scored": len(scores), "unmatched": unmatched}
