"""Running a checkpoint over questions: batched, appended to a JSONL keyed by question id (a killed run resumes
where it stopped and never recomputes or duplicates an answer), contiguous shards merged back in order."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from assistant.engine import Assistant, BatchItem
from assistant.generation import GenerationSettings
from tokenizer_tap.errors import ImageError
from tokenizer_tap.image_io import load_image

from .questions import Question


@dataclass
class RunStats:
    answered: int = 0
    already_done: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # question id -> why it has no answer


def shard(questions: Sequence[Question], num_shards: int, index: int) -> list[Question]:
    """Contiguous piece `index` of `num_shards` (ceil-sized, as Bunny's get_chunk), so merging keeps the order."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard {index} is not in 0..{num_shards - 1}")
    size = math.ceil(len(questions) / num_shards)
    return list(questions[index * size:(index + 1) * size])


def answered_ids(path: Path) -> set[str]:
    """Ids already answered in `path`; a line torn by a kill is cut off so appending continues cleanly."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    return {str(json.loads(line)["question_id"]) for line in data.decode().splitlines() if line.strip()}


def load_answers(path: str | Path) -> dict[str, str]:
    """question id -> answer text from a Bunny/LLaVA answers file (`{"question_id", "text"}` per line)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(str(row["question_id"]), str(row["text"]))
    return out


def run(bot: Assistant, questions: Sequence[Question], image_folder: str | Path | None, answers: str | Path, *,
        batch_size: int = 16, max_new_tokens: int = 128, progress: bool = True) -> RunStats:
    """Answer every question not yet in `answers` (greedy), appending as each batch finishes."""
    path = Path(answers)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(path)
    stats = RunStats(already_done=sum(q.id in done for q in questions))
    # Questions about the same image go together: their shared prompt prefix (system text + visual tokens) is
    # computed once per batch. Answers are keyed by id, so the file's order does not matter to scoring or resume.
    todo = sorted((q for q in questions if q.id not in done), key=lambda q: q.image or "")
    images: dict[str, object] = {}  # one decoded array per image and batch: the engine groups by object
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    bar = tqdm(total=len(todo), disable=not progress, desc="answering", mininterval=5)
    with path.open("a") as out:
        for start in range(0, len(todo), batch_size):
            batch, items = [], []
            for q in todo[start:start + batch_size]:
                image = None
                if q.image is not None:
                    try:
                        if q.image not in images:
                            images[q.image] = load_image(Path(image_folder or ".") / q.image)
                        image = images[q.image]
                    except ImageError as exc:
                        stats.bad[q.id] = str(exc)
                        continue
                batch.append(q)
                items.append(BatchItem(image, q.text))
            texts = bot.answer_batch(items, settings, batch_size=batch_size) if items else []
            images.clear()
            for q, text in zip(batch, texts):
                out.write(json.dumps({"question_id": q.raw_id, "prompt": q.text, "text": text,
                                      "answer_id": uuid.uuid4().hex, "model_id": bot.model_id,
                                      "metadata": {"category": q.category}}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            stats.answered += len(batch)
            bar.update(len(todo[start:start + batch_size]))
    bar.close()
    return stats


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
