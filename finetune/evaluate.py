"""Exact-match accuracy of a checkpoint on held-out short-answer questions (the learning proof), through the eval
harness: its runner answers (batched, as `eval run`), its `short-answer` benchmark scores."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assistant.engine import Assistant
from assistant.loading import LoadOptions, load
from eval import short_answer
from eval.questions import Question
from eval.runner import ChatAnswerer, run
from eval.scoring import read_answers
from eval.spec import RunInputs, predictions


@dataclass
class BlankImages:
    """The same answerer shown black images: what a model that ignores the pixels would score."""

    inner: ChatAnswerer

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def answer(self, items: list[tuple[Question, np.ndarray | None]], batch_size: int) -> list[str]:
        return self.inner.answer([(q, None if im is None else np.zeros_like(im)) for q, im in items], batch_size)


def accuracy(checkpoint: str | Path, questions: str | Path, *, blank_images: bool = False,
             max_new_tokens: int = 6, find: bool = False) -> dict[str, float]:
    """Overall and per-kind exact match, loading the checkpoint exactly as the assistant and the app do; `find`
    grounds each question's concepts in every instance TAP finds."""
    bot = load(Assistant, LoadOptions(chat_checkpoint=checkpoint, device="cpu", dtype="float32")).assistant
    asked, annotations, bad = short_answer.load_run(RunInputs(questions=Path(questions)))
    if bad:
        raise ValueError(f"{questions}: {len(bad)} bad records, e.g. {next(iter(bad.items()))}")
    answerer = ChatAnswerer(bot, max_new_tokens=max_new_tokens, find=find)
    with tempfile.TemporaryDirectory() as tmp:
        answers = Path(tmp) / "answers.jsonl"
        run(BlankImages(answerer) if blank_images else answerer, asked, Path(questions).parent, answers,
            batch_size=32, progress=False)
        report = short_answer.score(predictions(read_answers(answers)), annotations)
    return {"overall": report["accuracy"], **{k: v["accuracy"] for k, v in report["breakdowns"]["kind"].items()}}
