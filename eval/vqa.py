"""VQAv2 val (and TextVQA from parquet) scored locally: VQA soft accuracy over the 10 reference answers, overall and
by answer type (yes/no, number, other), from the official `v2_mscoco_val2014_annotations.json` or lmms-lab rows."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .normalize import vqa_accuracy


def load_annotations(path: str | Path) -> dict[str, dict[str, Any]]:
    """question id -> {"answers": [10 strings], "answer_type"} from the official annotation file."""
    data = json.loads(Path(path).read_text())
    return {str(a["question_id"]): {"answers": [x["answer"] for x in a["answers"]],
                                    "answer_type": a.get("answer_type", "all")} for a in data["annotations"]}


def score(predictions: dict[str, str], annotations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    by_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for qid, ann in annotations.items():
        if qid in predictions:
            s = vqa_accuracy(predictions[qid], ann["answers"])
            scores.append(s)
            by_type[ann["answer_type"]].append(s)
    return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "scored": len(scores),
            "coverage": len(scores) / max(1, len(annotations)),
            "breakdowns": {"answer type": {k: {"accuracy": sum(v) / len(v), "n": len(v)}
                                           for k, v in sorted(by_type.items())}}}
