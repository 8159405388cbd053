"""One entry point for every scorer: answers (Bunny/LLaVA `{"question_id", "text"}` lines) + annotations -> a report
dict of one shape (accuracy, scored, breakdowns by group and category; caption metrics for region captioning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .answers import read_answers
from .benchmarks import BENCHMARKS, get
from .questions import reading
from .spec import ScoreOptions

__all__ = ["BENCHMARKS", "load_annotations", "read_answers", "score"]


def load_annotations(benchmark: str, path: str | Path) -> Any:
    """The scorer's annotations from the Bunny/official files (lmms-lab loaders return them directly)."""
    with reading(path, f"{benchmark} annotations file"):
        return get(benchmark).load_annotations(path)


def score(benchmark: str, rows: list[dict[str, Any]], annotations: Any, *, lenient: bool = False,
          strict: bool = False, partial: bool = False, spice: bool = False, raw: bool = False,
          asked: frozenset[str] | None = None, choices: str | Path | None = None) -> dict[str, Any]:
    """Score answer rows; `lenient` is SEED's first-letter rule or GQA's lmms-eval exact_match, `strict` MMBench's
    exact letter, `partial` lets a --limit run be scored on the questions asked (`asked`) or answered, `choices`
    is a file of per-question answer sets for the benchmarks with `load_choices`."""
    module, loaded = get(benchmark), None
    if choices is not None:
        if not hasattr(module, "load_choices"):
            raise ValueError(f"--choices is for {', '.join(n for n in BENCHMARKS if hasattr(get(n), 'load_choices'))}")
        with reading(choices, f"{benchmark} choices file"):
            loaded = module.load_choices(choices)
    options = ScoreOptions(lenient=lenient, strict=strict, partial=partial, spice=spice, raw=raw, asked=asked,
                           choices=loaded)
    return {"benchmark": benchmark, **module.report(rows, annotations, options)}
