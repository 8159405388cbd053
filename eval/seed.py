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

from .lmms import Loaded, write_image
from .questions import Question
from .spec import RunInputs, ScoreOptions, predictions

SUFFIX = "\nAnswer with the option's letter from the given choices directly."
LMMS = ("lmms-lab/SEED-Bench", None, "test")
TAP_ONLY, CHOICES, IMAGES_REQUIRED = False, "ABCD", False
submission = None
# SEED-Bench-1's dimensions by question_type_id (the parquet carries only the ids).
DIMENSIONS = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
              5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
              9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction",
              12: "Procedure Understanding"}


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


load_annotations = load


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    if inputs.questions is None:
        raise FileNotFoundError("seed: pass --questions SEED-Bench.json or --hf SOURCE (lmms-lab parquet)")
    bench = load(inputs.questions)
    return questions(bench, video_frames=inputs.video_frames), bench, {}


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    raw = score(predictions(rows), annotations, lenient=options.lenient)
    total = raw.pop("total", {"accuracy": 0.0, "n": 0})
    kinds = {k: raw.pop(k) for k in ("image", "video") if k in raw}
    return {"accuracy": total["accuracy"], "scored": total["n"],
            "breakdowns": {"dimension": raw, "data type": kinds},
            "rule": "first letter" if options.lenient else "exact"}


def from_lmms(rows: list[dict], image_dir: Path, source: str | Path, inputs: RunInputs) -> Loaded:
    """To the official SEED-Bench.json shape, with images where `questions` looks for them."""
    bench: dict[str, Any] = {"question_type": {v: k for k, v in DIMENSIONS.items()}, "questions": []}
    bad = {}
    for r in rows:
        q = {k: r[k] for k in ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer",
                               "data_type", "data_id", "question_type_id")}
        q["question_type_id"] = int(q["question_type_id"])
        name = (f"SEED-Bench-image/{q['data_id']}" if q["data_type"] == "image"
                else f"SEED-Bench-video-image/{q['question_type_id']}_{q['question_id']}.png")
        if write_image(image_dir, name, r.get("image")) is None:
            bad[str(q["question_id"])] = "no image in the row"
            continue
        bench["questions"].append(q)
    return Loaded(questions(bench, video_frames=True), bench, bad)
