"""Running a checkpoint over questions: batched, appended to a JSONL keyed by question id (a killed run resumes
where it stopped and never recomputes or duplicates an answer), contiguous shards merged back in order."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from assistant.decoding import GenerationSettings
from assistant.engine import Assistant, BatchItem
from tokenizer_tap.errors import ImageError
from tokenizer_tap.image_io import load_image

from .answers import answered_ids, merge
from .questions import Question, shard

# `merge` and `shard` live in torch-free modules (`eval.answers`, `eval.questions`, as every answers-file reader);
# they stay importable from here for the callers that always took them from the runner.
__all__ = ["Answerer", "ChatAnswerer", "RunStats", "answered_ids", "letter_tokens", "merge", "run", "shard"]


@dataclass
class RunStats:
    answered: int = 0
    already_done: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # question id -> why it has no answer


class Answerer(Protocol):
    """What `run` drives: the chat model answering questions, or TAP captioning regions."""

    model_id: str

    def answer(self, items: list[tuple[Question, np.ndarray | None]], batch_size: int) -> list[str]: ...


@dataclass
class ChatAnswerer:
    """Greedy answers from the assistant; questions on one image share their prompt prefix within a batch."""

    bot: Assistant
    max_new_tokens: int = 128
    choices: str = ""  # e.g. "ABCD": answer with the most likely of these letters (one token), not free text
    find: bool = False  # ground each question's concepts in every instance TAP finds (off: the paper's prompts)

    @property
    def model_id(self) -> str:
        return self.bot.model_id

    def answer(self, items: list[tuple[Question, np.ndarray | None]], batch_size: int) -> list[str]:
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens)
        if self.choices:
            settings = GenerationSettings(max_new_tokens=1, allowed_tokens=letter_tokens(self.bot, self.choices))
        return self.bot.answer_batch([BatchItem(image, q.text) for q, image in items], settings,
                                     batch_size=batch_size, find=self.find)


def letter_tokens(bot: Assistant, letters: str) -> tuple[int, ...]:
    """The single tokens that spell each letter at the start of an answer, with and without a leading space."""
    tokenizer = bot.chat.tokenizer
    ids = set()
    for letter in letters:
        for text in (letter, " " + letter):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
    if not ids:
        raise ValueError(f"the tokenizer has no single tokens for {letters!r}")
    return tuple(sorted(ids))


def run(answerer: Answerer, questions: Sequence[Question], image_folder: str | Path | None, answers: str | Path, *,
        batch_size: int = 16, progress: bool = True) -> RunStats:
    """Answer every question not yet in `answers`, appending (and fsyncing) as each batch finishes."""
    path = Path(answers)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(path)
    stats = RunStats(already_done=sum(q.id in done for q in questions))
    # Questions about the same image go together: the chat model computes their shared prompt prefix (system text
    # + visual tokens) once per batch, TAP encodes the image once. Answers are keyed by id, so the file's order
    # does not matter to scoring or resume.
    todo = sorted((q for q in questions if q.id not in done), key=lambda q: q.image or "")
    images: dict[str, np.ndarray] = {}  # one decoded array per image and batch: the engine groups by object
    bar = tqdm(total=len(todo), disable=not progress, desc="answering", mininterval=5)
    with path.open("a") as out:
        for start in range(0, len(todo), batch_size):
            items = []
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
                items.append((q, image))
            texts = answerer.answer(items, batch_size) if items else []
            images.clear()
            for (q, _), text in zip(items, texts):
                out.write(json.dumps({"question_id": q.raw_id, "prompt": q.text, "text": text,
                                      "answer_id": uuid.uuid4().hex, "model_id": answerer.model_id,
                                      "metadata": {"category": q.category}}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            stats.answered += len(items)
            bar.update(len(todo[start:start + batch_size]))
    bar.close()
    return stats
