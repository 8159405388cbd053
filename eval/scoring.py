"""One entry point for every scorer: answers (Bunny/LLaVA `{"question_id", "text"}` lines) + annotations -> a report
dict of one shape (accuracy, scored, breakdowns by group and category; caption metrics for region captioning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .benchmarks import BENCHMARKS, get
from .spec import ScoreOptions

__all__ = ["BENCHMARKS", "load_annotations", "read_answers", "score"]


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_annotations(benchmark: str, path: str | Path) -> Any:
    """The scorer's annotations from the Bunny/official files (lmms-lab loaders return them directly)."""
    return get(benchmark).load_annotations(path)


def score(benchmark: str, rows: list[dict[str, Any]], annotations: Any, *, lenient: bool = False,
          strict: bool = False, partial: bool = False, spice: bool = False, raw: bool = False,
          asked: frozenset[str] | None = None) -> dict[str, Any]:
    """Score answer rows; `lenient` is SEED's first-letter rule or GQA's lmms-eval exact_match, `strict` MMBench's
    exact letter, `partial` lets a --limit run be scored on the questions asked (`asked`) or answered."""
    options = ScoreOptions(lenient=lenient, strict=strict, partial=partial, spice=spice, raw=raw, asked=asked)
    return {"benchmark": benchmark, **get(benchmark).report(rows, annotations, options)}
