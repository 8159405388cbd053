"""What every benchmark module is handed: the run's inputs and the scoring options, one shape for all of them.

A benchmark module (registered by name in `eval/benchmarks.py`) exposes:
- `load_run(inputs) -> (questions, annotations or None, bad records)`: from local files (`--questions`);
- `load_annotations(path)`: the scorer's annotations (`--annotations`);
- `report(rows, annotations, options) -> dict`: accuracy, scored, breakdowns (or caption metrics), rule; and
  optionally `skipped` (record -> why, answers it could not score) and `notes`;
- `from_lmms(rows, image_dir, source, inputs) -> Loaded` with `LMMS = (dataset id, config, split)`, or `LMMS = None`;
- `submission(answers, output, annotations=None, all_questions=None) -> str`, or `submission = None`;
- optionally `read_results(path, bad) -> rows` where `score` accepts other files than the answers JSONL (records
  it cannot use go to `bad`, as `answers.read_answers` does), and
  `default_concepts(annotations)`, the concept vocabulary a TAP-only benchmark uses when none is given, and
  `load_choices(path)`, the per-question answer sets `--choices` names (gqa: validity and plausibility);
- `TAP_ONLY` (the tokenizer is evaluated, no chat model) with `tap_answerer(predictor, annotations, model_id,
  max_new_tokens)`, `CHOICES` (letters for `--likelihood`, "" for none) and `IMAGES_REQUIRED` (needs `--images`
  even for local files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunInputs:
    questions: Path | None = None
    images: Path | None = None
    annotations: Path | None = None
    split: str | None = None
    video_frames: bool = False  # seed: also the video questions (middle frames)
    ocr: bool = False  # textvqa from parquet: the OCR token line in the prompt
    detections: Path | None = None  # coco-seg / lvis-seg: a detector's boxes (COCO results JSON)


@dataclass(frozen=True)
class ScoreOptions:
    lenient: bool = False  # seed: first letter; gqa: lmms-eval exact_match
    strict: bool = False  # mmbench: the exact letter
    partial: bool = False  # score the questions asked, not the whole benchmark (--limit, shards)
    spice: bool = False  # captions: also SPICE
    raw: bool = False  # vqav2: score predictions as given, without the EvalAI/m4c processor
    asked: frozenset[str] | None = None  # with `partial`: the question ids that were asked
    choices: Any = None  # what the benchmark's `load_choices` read from `--choices` (gqa: validity, plausibility)


def predictions(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Question id -> answer text; the first answer of a question counts (a resumed file may repeat one)."""
    out: dict[str, str] = {}
    for row in rows:
        out.setdefault(str(row["question_id"]), str(row["text"]))
    return out
