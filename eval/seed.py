"""SEED-Bench-1: prompts from the official `SEED-Bench.json` and its scorer.

Official rule: correct only if the stripped output equals the answer letter; reported per dimension (12), in total,
and for image-only (dimensions 1-9) and video-only questions. `lenient` takes the output's first letter instead,
as lmms-eval does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .questions import Question

SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def questions(bench: dict[str, Any], *, video_frames: bool = False) -> list[Question]:
    """Image questions as prompts (`SEED-Bench-image/<data_id>`); video ones too when their middle frames exist
    as `SEED-Bench-video-image/<question_type_id>_<question_id>.png` (`video_frames`)."""
    names = {v: k for k, v in bench["question_type"].items()}
    out = []
    for q in bench["questions"]:
        if q["data_type"] == "image":
            image = f"SEED-Bench-image/{q['data_id']}"
        elif video_frames:
            image = f"SEED-Bench-video-image/{q['question_type_id']}_{q['question_id']}.png"
        else:
            continue
        options = "".join(f"\n{letter}. {q['choice_' + letter.lower()]}" for letter in "ABCD")
        out.append(Question(str(q["question_id"]), image, q["question"] + options + SUFFIX,
                            names.get(q["question_type_id"], str(q["question_type_id"])), q["question_id"]))
    return out


def score(predictions: dict[str, str], bench: dict[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    names = {v: k for k, v in bench["question_type"].items()}
    groups: dict[str, list[bool]] = defaultdict(list)
    for q in bench["questions"]:
        qid = str(q["question_id"])
        if qid not in predictions:
            continue
        pred = predictions[qid].strip()
        if lenient:
            pred = pred[:1].upper()
        ok = pred == q["answer"]
        groups[names.get(q["question_type_id"], str(q["question_type_id"]))].append(ok)
        groups["total"].append(ok)
        groups["image" if q["data_type"] == "image" else "video"].append(ok)
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in groups.items()}
