"""Benchmark questions in the Bunny/LLaVA layout: JSON lines `{"question_id", "image", "text", "category"}` (the
answer-format suffix already in `text`), plain or inside a .tar.gz, and an image folder."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Question:
    id: str  # as text, for keys; `raw_id` keeps the file's type (VQAv2 submissions need ints)
    image: str | None
    text: str
    category: str = "default"
    raw_id: str | int = ""
    box: tuple[float, float, float, float] | None = None  # region captioning: the prompt box, x0 y0 x1 y1 pixels
    # instance benchmarks: every box prompt of the image, x0 y0 x1 y1 (+ the detector's category id and score)
    regions: tuple[tuple[float, ...], ...] = ()


def read_json_or_tar(path: str | Path, member_suffix: str) -> bytes:
    """A file's bytes, or those of the first tar member ending with `member_suffix` when `path` is a .tar.gz."""
    path = Path(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(member_suffix):
                    return tar.extractfile(member).read()
        raise FileNotFoundError(f"{path} holds no *{member_suffix} file")
    return path.read_bytes()


def load_questions(path: str | Path) -> tuple[list[Question], dict[str, str]]:
    """The questions, and the bad records (line number or id -> reason) that were skipped."""
    text = read_json_or_tar(path, ".jsonl").decode("utf-8")
    questions, bad = [], {}
    for n, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, prompt = str(row["question_id"]), row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            bad[f"line {n}"] = f"not a question record ({type(exc).__name__})"
            continue
        if not isinstance(prompt, str) or not prompt.strip():
            bad[qid] = "empty question"
            continue
        questions.append(Question(qid, row.get("image"), prompt, str(row.get("category", "default")),
                                  row["question_id"]))
    return questions, bad


def load_bunny(inputs, load_annotations) -> tuple[list[Question], object, dict[str, str]]:
    """A Bunny-layout run: the question JSONL, and the scorer's annotations when `--annotations` is given."""
    if inputs.questions is None:
        raise FileNotFoundError("pass --questions FILE (Bunny/official layout) or --hf SOURCE (lmms-lab parquet)")
    questions, bad = load_questions(inputs.questions)
    return questions, (load_annotations(inputs.annotations) if inputs.annotations else None), bad
