"""One entry point for every scorer: answers (Bunny/LLaVA `{"question_id", "text"}` lines) + annotations -> a report
dict of one shape (accuracy, scored, breakdowns by group and category; caption metrics for region captioning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import captioning, gqa, mmbench, seed, textvqa, vqa

CHOICE = ("gqa", "vqav2", "textvqa", "seed", "mmbench")
CAPTIONS = ("vg", "refcocog")
BENCHMARKS = CHOICE + CAPTIONS


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_annotations(benchmark: str, path: str | Path) -> Any:
    """The scorer's annotations from the Bunny/official files (lmms-lab loaders return them directly)."""
    if benchmark == "gqa":
        return gqa.load_annotations(path)
    if benchmark == "vqav2":
        return vqa.load_annotations(path)
    if benchmark == "textvqa":
        return Path(path)  # matched to prompts by (image id, question): see textvqa.score
    if benchmark == "seed":
        return seed.load(path)
    if benchmark == "mmbench":
        return mmbench.load(path)
    if benchmark in CAPTIONS:
        return captioning.load(path)[1]
    raise ValueError(f"unknown benchmark {benchmark}")


def score(benchmark: str, rows: list[dict[str, Any]], annotations: Any, *, lenient: bool = False,
          strict: bool = False, partial: bool = False, spice: bool = False) -> dict[str, Any]:
    """Score answer rows; `lenient` is SEED's first-letter rule or GQA's lmms-eval exact_match, `strict` MMBench's
    exact letter, `partial` lets a GQA --limit run be scored on the answered questions."""
    predictions: dict[str, str] = {}
    for row in rows:
        predictions.setdefault(str(row["question_id"]), str(row["text"]))
    report: dict[str, Any] = {"benchmark": benchmark}
    if benchmark == "gqa":
        report.update(gqa.score(predictions, annotations, partial=partial, lenient=lenient),
                      rule="lmms-eval exact_match" if lenient else "official")
    elif benchmark == "vqav2" or (benchmark == "textvqa" and isinstance(annotations, dict)):
        report.update(vqa.score(predictions, annotations))
    elif benchmark == "textvqa":
        report.update(textvqa.score(rows, annotations), breakdowns={})
    elif benchmark == "seed":
        raw = seed.score(predictions, annotations, lenient=lenient)
        total = raw.pop("total", {"accuracy": 0.0, "n": 0})
        kinds = {k: raw.pop(k) for k in ("image", "video") if k in raw}
        report.update(accuracy=total["accuracy"], scored=total["n"],
                      breakdowns={"dimension": raw, "data type": kinds}, rule="first letter" if lenient else "exact")
    elif benchmark == "mmbench":
        raw = mmbench.score(predictions, annotations, lenient=not strict)
        overall = raw["circular"].pop("overall", {"accuracy": 0.0, "n": 0})
        report.update(accuracy=overall["accuracy"], scored=overall["n"], breakdowns={"category": raw["circular"]},
                      first_rotation_accuracy=raw["first_rotation_accuracy"], rule="circular")
    elif benchmark in CAPTIONS:
        report.update(captioning.score(predictions, annotations, spice=spice))
    else:
        raise ValueError(f"unknown benchmark {benchmark}")
    return report
