"""Exact-match accuracy of a checkpoint on held-out short-answer questions (the learning proof)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from assistant.engine import Assistant, BatchItem
from assistant.generation import GenerationSettings
from tokenizer_tap.image_io import load_image

from .synthetic import normalise


def accuracy(checkpoint: str | Path, questions: str | Path, *, blank_images: bool = False,
             max_new_tokens: int = 6) -> dict[str, float]:
    """Overall and per-kind exact match, loading the checkpoint exactly as the assistant and the app do."""
    bot = Assistant.from_pretrained(checkpoint, device="cpu", dtype="float32")
    items = json.loads(Path(questions).read_text())
    folder = Path(questions).parent
    images = [load_image(folder / q["image"]) for q in items]
    if blank_images:
        images = [np.zeros_like(im) for im in images]
    answers = bot.answer_batch([BatchItem(im, q["question"]) for im, q in zip(images, items)],
                               GenerationSettings(max_new_tokens=max_new_tokens), batch_size=32)
    hits: dict[str, list[bool]] = defaultdict(list)
    for q, a in zip(items, answers):
        ok = normalise(a) == normalise(q["answer"])
        hits[q.get("kind", "all")].append(ok)
        hits["overall"].append(ok)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
