"""Training samples: LLaVA/Bunny records validated, rendered with the assistant's template, and label-masked.

Masks are right by construction: each conversation is tokenized piece by piece (the user side of a turn up to
`ASSISTANT:`, then ` answer` + `<|endoftext|>`), so trained tokens are exactly the answers and their EOS, and the
pieces joined are the string `assistant.template.render` produces (tested). Samples too long for the context lose
whole turns from the end; a sample whose first turn cannot fit is dropped. Both are counted and reported by id,
never zeroed silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from assistant.model import IMAGE_TOKEN
from assistant.template import ASSISTANT, IMAGE_PLACEHOLDER, SYSTEM, USER, render_pretrain

IGNORE = -100
ROLES = ("human", "gpt")


class DataError(ValueError):
    """A record that cannot be used, with the reason."""


@dataclass(frozen=True)
class Record:
    id: str
    image: str | None
    turns: tuple[tuple[str, str], ...]  # (human, gpt); `<image>` already moved to the front of its turn


@dataclass(frozen=True)
class Encoded:
    id: str
    ids: list[int]
    labels: list[int]
    image: str | None
    positions: int  # length once the image placeholder is expanded
    truncated: bool = False  # lost turns from the end to fit the context


@dataclass
class Report:
    """What a pass over the data found (printed by `python -m finetune check`, logged by `train`)."""

    records: int = 0
    usable: int = 0
    text_only: int = 0
    turns: int = 0
    malformed: dict[str, str] = field(default_factory=dict)  # id -> reason
    images_missing: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    dropped_too_long: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def summary(self, max_length: int) -> str:
        pct = np.percentile(self.lengths, [50, 90, 99, 100]).astype(int).tolist() if self.lengths else [0] * 4
        lines = [f"records: {self.records}", f"usable samples: {self.usable} ({self.text_only} text-only)",
                 f"turns: {self.turns}",
                 f"positions (image expanded) p50/p90/p99/max: {pct[0]}/{pct[1]}/{pct[2]}/{pct[3]} "
                 f"(budget {max_length})",
                 f"truncated to fit (lost final turns): {len(self.truncated)}",
                 f"dropped, first turn over the budget: {len(self.dropped_too_long)}",
                 f"images missing: {len(self.images_missing)}", f"malformed records: {len(self.malformed)}"]
        for rid, reason in list(self.malformed.items())[:10]:
            lines.append(f"  malformed {rid}: {reason}")
        for name, ids in [("missing image", self.images_missing), ("dropped", self.dropped_too_long)]:
            if ids:
                lines.append(f"  {name}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
        return "\n".join(lines)


def load_records(path: str | Path) -> list[Any]:
    """A JSON array (LLaVA, Bunny, the app's export) or JSON lines."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def parse_record(raw: Any, index: int) -> Record:
    """Validate one record. Bunny's rules: a leading gpt turn is dropped, roles alternate, one image at most, and
    `<image>` moves to the start of its turn followed by a newline (added to the first turn if only `image` says so)."""
    if not isinstance(raw, dict):
        raise DataError("a record must be an object")
    rid = str(raw.get("id", f"#{index}"))
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError("conversations must be a non-empty list")
    if any(not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str) for t in conv):
        raise DataError('each turn needs "from" (human or gpt) and a string "value"')
    if conv[0]["from"] == "gpt":
        conv = conv[1:]
    if len(conv) < 2 or len(conv) % 2:
        raise DataError("turns must come in human/gpt pairs")
    if any(t["from"] != ROLES[i % 2] for i, t in enumerate(conv)):
        raise DataError("roles must alternate human, gpt")
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError("image must be a relative path")
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    if placeholders > 1:
        raise DataError("one image per sample: several <image> placeholders")
    if any(IMAGE_PLACEHOLDER in t["value"] for t in conv[1::2]):
        raise DataError("<image> in an answer")
    if placeholders and image is None:
        raise DataError("<image> placeholder without an image")
    turns = []
    for k in range(0, len(conv), 2):
        question, answer = conv[k]["value"], conv[k + 1]["value"].strip()
        if not answer:
            raise DataError("an empty answer")
        if IMAGE_PLACEHOLDER in question or (image is not None and not placeholders and k == 0):
            question = f"{IMAGE_PLACEHOLDER}\n{question.replace(IMAGE_PLACEHOLDER, '').strip()}"
        turns.append((question.strip(), answer))
    return Record(rid, image, tuple(turns))


def encode(record: Record, tokenize: Callable[[str], list[int]], eos_id: int, *, stage: str, num_visual: int,
           max_length: int) -> Encoded | None:
    """Token ids and labels (IGNORE where nothing is trained); None when not even the first turn fits."""
    extra = num_visual - 1 if record.image is not None else 0
    if stage == "pretrain":
        if record.image is None:
            raise DataError("caption pre-training needs an image")
        caption = record.turns[0][1]
        text = tokenize(render_pretrain(caption)[len(IMAGE_PLACEHOLDER):])  # caption + "\n": all trained
        ids, labels = [IMAGE_TOKEN, *text], [IGNORE, *text]
        if len(ids) + extra > max_length:
            return None
        return Encoded(record.id, ids, labels, record.image, len(ids) + extra)
    ids: list[int] = []
    labels: list[int] = []
    kept = 0
    for i, (question, answer) in enumerate(record.turns):
        user = tokenize((f"{SYSTEM} " if i == 0 else "") + f"{USER}: {question} {ASSISTANT}:")
        reply = tokenize(f" {answer}") + [eos_id]
        if len(ids) + len(user) + len(reply) + extra > max_length:
            break
        ids += user + reply
        labels += [IGNORE] * len(user) + reply
        kept += 1
    if kept == 0:
        return None
    return Encoded(record.id, ids, labels, record.image, len(ids) + extra, truncated=kept < len(record.turns))


def prepare(raws: Iterable[Any], tokenize: Callable[[str], list[int]], eos_id: int, *, stage: str, num_visual: int,
            max_length: int, image_folder: str | Path | None) -> tuple[list[Encoded], Report]:
    """Every usable sample, encoded, and the report of what was skipped and why."""
    report, samples = Report(), []
    folder = Path(image_folder) if image_folder else None
    for index, raw in enumerate(raws):
        report.records += 1
        rid = str(raw.get("id", f"#{index}")) if isinstance(raw, dict) else f"#{index}"
        try:
            record = parse_record(raw, index)
            if stage == "pretrain" and record.image is None:
                raise DataError("caption pre-training needs an image")
        except DataError as exc:
            report.malformed[rid] = str(exc)
            continue
        if record.image is not None and (folder is None or not (folder / record.image).is_file()):
            report.images_missing.append(rid)
            continue
        enc = encode(record, tokenize, eos_id, stage=stage, num_visual=num_visual, max_length=max_length)
        if enc is None:
            report.dropped_too_long.append(rid)
            continue
        if enc.truncated:
            report.truncated.append(rid)
        report.usable += 1
        report.text_only += record.image is None
        report.turns += len(record.turns)
        report.lengths.append(enc.positions)
        samples.append(enc)
    return samples, report
