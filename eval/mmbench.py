"""MMBench (dev, EN/CN "legacy" TSVs): prompts with circular option rotation, and the local circular accuracy.

A question with k options is asked k times, its options rotated by one each time (the answer letter moves with
them); it counts as correct only if every rotation is answered correctly, which is MMBench's circular evaluation.
Images come base64-encoded inside the TSV and are written once to an image folder.
"""

from __future__ import annotations

import base64
import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .answers import load_answers
from .lmms import Loaded, image_bytes
from .questions import Question
from .spec import RunInputs, ScoreOptions, predictions

LETTERS = "ABCD"
LMMS = ("lmms-lab/MMBench", "en", "dev")
TAP_ONLY, CHOICES, IMAGES_REQUIRED = False, "ABCDE", True  # images live in the TSV: written to --images
SUFFIX = {"en": "\nAnswer with the option's letter from the given choices directly.", "cn": "\n请直接回答选项字母。"}


def load(path: str | Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _options(row: dict[str, str]) -> list[str]:
    return [row[k] for k in LETTERS if row.get(k) not in (None, "", "nan", "NaN")]


def questions(rows: list[dict[str, str]], image_dir: str | Path, *, language: str = "en",
              circular: bool = True) -> list[Question]:
    """One question per rotation (`<index>-<r>`); images decoded into `image_dir` as `<index>.png`."""
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for row in rows:
        index = row["index"]
        image = image_dir / f"{index}.png"
        if row.get("image") and not image.exists():
            image.write_bytes(base64.b64decode(row["image"]))
        options = _options(row)
        hint = row.get("hint") or ""
        head = (f"{hint}\n" if hint and hint.lower() != "nan" else "") + row["question"]
        for r in range(len(options) if circular else 1):
            rotated = options[r:] + options[:r]
            text = head + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(rotated)) + SUFFIX[language]
            out.append(Question(f"{index}-{r}", image.name if row.get("image") else None, text,
                                row.get("category", "default"), f"{index}-{r}"))
    return out


def rotated_answer(row: dict[str, str], rotation: int) -> str:
    options = _options(row)
    original = LETTERS.index(row["answer"].strip())
    return LETTERS[(original - rotation) % len(options)]


def score(predictions: dict[str, str], rows: list[dict[str, str]], *, lenient: bool = True) -> dict[str, Any]:
    """Circular accuracy overall and per category (a question with a missing rotation counts as wrong)."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    single = []
    for row in rows:
        oks = []
        for r in range(len(_options(row))):
            pred = predictions.get(f"{row['index']}-{r}", "").strip()
            pred = pred[:1].upper() if lenient else pred
            oks.append(pred == rotated_answer(row, r))
        single.append(oks[0])
        by_category[row.get("category", "default")].append(all(oks))
        by_category["overall"].append(all(oks))
    return {"circular": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in by_category.items()},
            "first_rotation_accuracy": sum(single) / max(1, len(single))}


load_annotations = load


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    if inputs.questions is None:
        raise FileNotFoundError("mmbench: pass --questions MMBench_DEV_EN.tsv or --hf SOURCE (lmms-lab parquet)")
    rows = load(inputs.questions)
    language = "cn" if "_CN" in inputs.questions.name.upper() else "en"
    return questions(rows, inputs.images, language=language), rows, {}


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    if options.partial and options.asked is not None:  # score the questions asked, not the whole TSV
        annotations = [row for row in annotations if f"{row['index']}-0" in options.asked]
    raw = score(predictions(rows), annotations, lenient=not options.strict)
    overall = raw["circular"].pop("overall", {"accuracy": 0.0, "n": 0})
    return {"accuracy": overall["accuracy"], "scored": overall["n"], "breakdowns": {"category": raw["circular"]},
            "first_rotation_accuracy": raw["first_rotation_accuracy"], "rule": "circular"}


def from_lmms(rows: list[dict], image_dir: Path, source: str | Path, inputs: RunInputs) -> Loaded:
    """To the legacy TSV's rows (base64 image), then the TSV path: circular questions, same scorer."""
    tsv = []
    for r in rows:
        row = {k: ("" if v is None else str(v)) for k, v in r.items() if k != "image"}
        data = image_bytes(r.get("image"))
        row["image"] = base64.b64encode(data).decode() if data else ""
        tsv.append(row)
    return Loaded(questions(tsv, image_dir), tsv, {})


def submission(answers: Path, output: Path, annotations: Path | None = None,
               all_questions: Path | None = None) -> str:
    """The OpenCompass upload: the TSV's rows without image/hint/category/source/comment/l2-category, plus
    `prediction` (the unrotated question's answer); .xlsx as Bunny writes it, or .tsv."""
    import pandas as pd  # heavy, and needed only to write the upload
    if annotations is None:
        raise ValueError("mmbench --submission needs --annotations: the benchmark's TSV")
    predicted = load_answers(answers)
    drop = {"image", "hint", "category", "source", "comment", "l2-category"}
    rows = [{**{k: v for k, v in row.items() if k.lower() not in drop},
             "prediction": predicted.get(f"{row['index']}-0", "")} for row in load(annotations)]
    frame = pd.DataFrame(rows)
    if output.suffix == ".xlsx":
        frame.to_excel(output, index=False, engine="openpyxl")
    else:
        frame.to_csv(output, sep="\t", index=False)
    return f"{len(rows)} rows -> {output} (upload to the OpenCompass MMBench server)"
