"""VQAv2 val scored locally as the official evaluator does (`normalize.vqa_accuracy`), overall and by answer type
(yes/no, number, other), from the official `v2_mscoco_val2014_annotations.json` or lmms-lab rows.

By default the predictions first go through the EvalAI/m4c answer processor, the step LLaVA and Bunny run before
uploading (so local numbers match the published pipeline); `--raw` scores them as given."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .answers import load_answers
from .lmms import Loaded, vqa_questions
from .normalize import normalize_vqa, vqa_accuracy
from .questions import Question, load_bunny, load_questions
from .spec import RunInputs, ScoreOptions, predictions

LMMS = ("lmms-lab/VQAv2", None, "validation")
TAP_ONLY, CHOICES, IMAGES_REQUIRED = False, "", False


def load_annotations(path: str | Path) -> dict[str, dict[str, Any]]:
    """question id -> {"answers": [10 strings], "answer_type"} from the official annotation file."""
    data = json.loads(Path(path).read_text())
    return {str(a["question_id"]): {"answers": [x["answer"] for x in a["answers"]],
                                    "answer_type": a.get("answer_type", "all")} for a in data["annotations"]}


PROCESSED = "official vqaEval; predictions first through the EvalAI/m4c answer processor (as LLaVA/Bunny upload)"
RAW = "official vqaEval on the predictions as given (--raw)"


def score(predictions: dict[str, str], annotations: dict[str, dict[str, Any]], *, raw: bool = False,
          accuracy: Callable[[str, list[str]], float] = vqa_accuracy) -> dict[str, Any]:
    """Mean accuracy over the annotated questions that have a prediction, and by answer type."""
    by_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for qid, ann in annotations.items():
        if qid in predictions:
            s = accuracy(predictions[qid] if raw else normalize_vqa(predictions[qid]), ann["answers"])
            scores.append(s)
            by_type[ann["answer_type"]].append(s)
    return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "scored": len(scores),
            "coverage": len(scores) / max(1, len(annotations)),
            "breakdowns": {"answer type": {k: {"accuracy": sum(v) / len(v), "n": len(v)}
                                           for k, v in sorted(by_type.items())}}}


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    return load_bunny(inputs, load_annotations)


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    return {**score(predictions(rows), annotations, raw=options.raw), "rule": RAW if options.raw else PROCESSED}


def from_lmms(rows: list[dict], image_dir: Path, source: str | Path, inputs: RunInputs) -> Loaded:
    return vqa_questions(rows, image_dir, textvqa=False, ocr=inputs.ocr)


def submission(answers: Path, output: Path, annotations: Path | None = None,
               all_questions: Path | None = None) -> str:
    """EvalAI's format: every test question (unanswered ones get ""), answers normalised."""
    predicted = load_answers(answers)
    ids = [q.raw_id for q in load_questions(all_questions)[0]] if all_questions else list(predicted)
    rows = [{"question_id": int(q), "answer": normalize_vqa(predicted.get(str(q), ""))} for q in ids]
    output.write_text(json.dumps(rows))
    return f"{len(rows)} answers -> {output} (upload to EvalAI, VQA challenge, test-dev phase)"
