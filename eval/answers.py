"""Answers files (Bunny/LLaVA JSONL, one `{"question_id", "text", ...}` per line): reading them for scoring, for
resuming and for submissions, and merging shards. Plain files and the standard library only: scoring an answers
file never loads torch or the model (the runner, which writes them, does)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .questions import reading


def read_answers(path: str | Path, bad: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Answer rows. A malformed line (not JSON, no `question_id` or `text`) is recorded in `bad` ("line N" -> why)
    and skipped, so the good answers around it are still scored; without `bad` it is refused, naming the line."""
    with reading(path, "answers file"):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            why = f"not JSON ({exc.msg})"
        else:
            if isinstance(row, dict) and "question_id" in row and isinstance(row.get("text"), str):
                rows.append(row)
                continue
            why = "not an answer record (needs question_id and text)"
        if bad is None:
            raise ValueError(f"{path}: line {n}: {why}")
        bad[f"line {n}"] = why
    return rows


def answered_ids(path: Path) -> set[str]:
    """Ids already answered in `path`; a line torn by a kill is cut off so appending continues cleanly."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    return {qid for qid, _ in answer_rows(path, data.decode("utf-8", "replace"))}


def load_answers(path: str | Path) -> dict[str, str]:
    """question id -> answer text from a Bunny/LLaVA answers file (`{"question_id", "text"}` per line)."""
    out: dict[str, str] = {}
    for qid, text in answer_rows(Path(path), Path(path).read_text(encoding="utf-8", errors="replace")):
        out.setdefault(qid, text)
    return out


def answer_rows(path: Path, text: str) -> list[tuple[str, str]]:
    """(question id, answer) of each line; a line that is not an answer record is refused naming the file and
    the line, and the file is left as it is (it may be another run's answers, or not an answers file at all)."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((str(row["question_id"]), str(row["text"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: line {number} is not an answer record ({type(exc).__name__}: {exc}); it "
                             "is left as it is: point --answers at another file, or mend this one") from None
    return rows


def merge(parts: Iterable[str | Path], output: str | Path) -> int:
    """Concatenate shard answer files in the given order, keeping the first answer per question id."""
    seen: set[str] = set()
    n = 0
    with Path(output).open("w") as out:
        for part in parts:
            for line in Path(part).read_text().splitlines():
                if not line.strip():
                    continue
                qid = str(json.loads(line)["question_id"])
                if qid not in seen:
                    seen.add(qid)
                    out.write(line + "\n")
                    n += 1
    return n
