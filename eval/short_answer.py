"""Held-out short-answer questions with one right answer each (`python -m finetune synthetic` and the scene world
write them): exact match after lmms-eval's exact_match normalisation, overall and per kind (colour, count, ...).

The file is a JSON list of `{"id", "image", "kind", "question", "answer"}`; it is its own annotation file, so
`eval run short-answer --questions FILE --images DIR` scores as soon as it has answered.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .normalize import normalize_exact_match
from .questions import Question
from .spec import RunInputs, ScoreOptions, predictions

LMMS = None
TAP_ONLY, CHOICES, IMAGES_REQUIRED = False, "", False
submission = None


def load_annotations(path: str | Path) -> dict[str, dict[str, str]]:
    """Question id -> {"answer", "kind"}; a record without id or answer has none (`load_run` lists it as bad)."""
    return {str(q["id"]): {"answer": str(q["answer"]), "kind": str(q.get("kind", "default"))}
            for q in _records(path) if isinstance(q, dict) and {"id", "answer"} <= set(q)}


def load_run(inputs: RunInputs) -> tuple[list[Question], dict[str, dict[str, str]], dict[str, str]]:
    if inputs.questions is None:
        raise FileNotFoundError("pass --questions FILE (a JSON list of id, image, kind, question, answer)")
    questions, bad = [], {}
    for n, q in enumerate(_records(inputs.questions)):
        if not isinstance(q, dict) or not {"id", "question", "answer"} <= set(q):
            bad[f"record {n}"] = "not a question record (needs id, question and answer)"
            continue
        questions.append(Question(str(q["id"]), q.get("image"), str(q["question"]), str(q.get("kind", "default")),
                                  q["id"]))
    return questions, load_annotations(inputs.questions), bad


def score(predictions: dict[str, str], annotations: dict[str, dict[str, str]], *,
          partial: bool = False) -> dict[str, Any]:
    """Exact-match accuracy overall and per kind; every question needs an answer unless `partial`."""
    missing = [q for q in annotations if q not in predictions]
    if missing and not partial:
        raise ValueError(f"{len(missing)} of {len(annotations)} questions have no answer (first: {missing[0]}); "
                         "score a --limit run with partial=True")
    kinds: dict[str, list[bool]] = defaultdict(list)
    for qid, ann in annotations.items():
        if qid in predictions:
            kinds[ann["kind"]].append(normalize_exact_match(predictions[qid]) == normalize_exact_match(ann["answer"]))
    hits = [ok for oks in kinds.values() for ok in oks]
    return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "scored": len(hits),
            "breakdowns": {"kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(kinds.items())}}}


def report(rows: list[dict[str, Any]], annotations: dict[str, dict[str, str]], options: ScoreOptions) -> dict[str, Any]:
    return {**score(predictions(rows), annotations, partial=options.partial), "rule": "lmms-eval exact_match"}


def _records(path: str | Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions")
    return data
