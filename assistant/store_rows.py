"""What a row of the chat store is: its limits, the records it reads back as, the schema that holds it, and the
checks and conversions between Python values and columns.

Kept apart from `store.ChatStore` (connection, locking, transactions) so that a change to what a message or region
holds touches this module only, and so that every input is validated before a transaction is opened.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlite_utils import Database
from sqlite_utils.db import ForeignKey

from tokenizer_tap import rle
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.region import Region

from .template import Turn

DEFAULT_TITLE = "New chat"
MAX_TITLE = 200
MAX_TEXT = 100_000
MAX_PROMPT = 200_000  # the user's text plus one line per referenced region
MAX_LABEL = 2_000  # owner ids, model names, concepts, captions
MAX_PAGE = 500
MAX_QUERY = 1_000
ROLES = ("user", "assistant")

#: A conversation id as `create_conversation` makes it (uuid4 hex); anything else is "not found" without a query.
CONV_ID = re.compile(r"[0-9a-f]{32}")
#: An image id (sha256 hex); anything else is "not found" without a query.
SHA256 = re.compile(r"[0-9a-f]{64}")
_FORMAT = re.compile(r"[a-z0-9]{1,10}")  # becomes a file extension: no dots or slashes


class StoreError(Exception):
    """A request the store refuses: invalid input, a too-new database, a failed migration."""


class NotFoundError(StoreError):
    """Missing, or owned by someone else (deliberately indistinguishable)."""


@dataclass(frozen=True)
class ConversationInfo:
    """One line of the conversation list (what the sidebar shows)."""

    id: str
    owner: str
    title: str
    created: str
    updated: str
    message_count: int


@dataclass(frozen=True)
class MessageRecord:
    """One turn; `prompt` keeps what the model actually saw so exports match training."""

    id: int
    idx: int
    role: str
    text: str
    prompt: str | None  # user turns: the exact text the model saw, region lines included
    image_sha: str | None
    regions: list[int]
    model: str | None
    settings: dict[str, Any]
    complete: bool
    created: str
    updated: str
    note: str | None = None  # assistant answers: where the answer disagrees with TAP (the answer check)


@dataclass(frozen=True)
class ConversationRecord:
    """Everything needed to redraw a conversation."""

    info: ConversationInfo
    messages: list[MessageRecord]  # the log as written: a LangChain history may hold lone messages
    regions: list[Region]  # `image` is the stored sha; masks stay encoded until drawn

    def turns(self) -> list[Turn]:
        """The log read as turns: each user message with the assistant message right after it (if any)."""
        turns: list[Turn] = []
        pending: Turn | None = None
        for m in self.messages:
            if m.role == "user":
                pending = Turn(m.prompt or m.text, "", m.text, m.image_sha, list(m.regions), complete=False)
                turns.append(pending)
            elif pending is not None:
                pending.answer, pending.complete, pending.message_id = m.text, m.complete, m.id
                pending.note = m.note or ""
                pending = None
        return turns

    def llava(self, image_paths: dict[str, str]) -> list[dict[str, Any]]:
        """Fine-tuning records (LLaVA/Bunny JSON), one per run of user turns about the same image.

        A user turn is kept with the assistant message right after it, and only when that answer is complete.
        `image` is `image_paths[sha]` (the store passes paths relative to its `data_dir`); text-only runs have no
        `image` key.
        """
        messages = self.messages
        records: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        image: str | None = None
        for i, msg in enumerate(messages):
            if msg.role != "user":
                continue
            if msg.image_sha != image:  # an image switch starts a new record even if this pair is skipped
                image, current = msg.image_sha, None
            answer = messages[i + 1] if i + 1 < len(messages) else None
            if answer is None or answer.role != "assistant" or not answer.complete:
                continue
            value = msg.prompt if msg.prompt is not None else msg.text
            if current is None:
                current = {"id": f"{self.info.id}-{len(records)}"}
                if image is not None:
                    current["image"] = image_paths[image]
                    if "<image>" not in value:
                        value = "<image>\n" + value
                current["conversations"] = []
                records.append(current)
            current["conversations"] += [{"from": "human", "value": value}, {"from": "gpt", "value": answer.text}]
        return records


def _v1_initial(db: Database) -> None:
    """Version 1: the whole schema."""
    db["owners"].create({"id": str, "created": str}, pk="id", not_null=["created"])
    db["conversations"].create(
        {"id": str, "owner": str, "title": str, "created": str, "updated": str}, pk="id",
        foreign_keys=[("owner", "owners", "id")], not_null=["owner", "title", "created", "updated"],
        defaults={"title": DEFAULT_TITLE})
    db["conversations"].create_index(["owner", "updated"])
    db["images"].create(
        {"sha256": str, "path": str, "width": int, "height": int, "bytes": int, "format": str, "created": str},
        pk="sha256", not_null=["path", "width", "height", "bytes", "format", "created"])
    db["messages"].create(
        {"id": int, "conversation": str, "idx": int, "role": str, "text": str, "prompt": str, "image_sha": str,
         "regions": str, "model": str, "settings": str, "complete": int, "created": str, "updated": str}, pk="id",
        foreign_keys=[ForeignKey("messages", "conversation", "conversations", "id", on_delete="CASCADE"),
                      ("image_sha", "images", "sha256")],
        not_null=["conversation", "idx", "role", "text", "regions", "settings", "complete", "created", "updated"],
        defaults={"text": "", "regions": "[]", "settings": "{}", "complete": 1})
    db["messages"].create_index(["conversation", "idx"], unique=True)
    db["messages"].create_index(["image_sha"])  # image clean-up asks "does anything still use this sha?"
    db["regions"].create(
        {"id": int, "conversation": str, "number": int, "image_sha": str, "prompt": str, "mask": str, "box": str,
         "concept": str, "prob": float, "iou": float, "caption": str, "removed": int, "created": str}, pk="id",
        foreign_keys=[ForeignKey("regions", "conversation", "conversations", "id", on_delete="CASCADE"),
                      ("image_sha", "images", "sha256")],
        not_null=["conversation", "number", "image_sha", "prompt", "removed", "created"],
        defaults={"prompt": "{}", "removed": 0})
    db["regions"].create_index(["conversation", "number"], unique=True)
    db["regions"].create_index(["image_sha"])
    db["messages"].enable_fts(["text"], create_triggers=True)


def _v2_message_note(db: Database) -> None:
    """Version 2: an answer's note from the answer check (NULL: none), added in place to existing rows."""
    db["messages"].add_column("note", str)


# Applied in order; the database's PRAGMA user_version counts how many have run. Only ever append.
MIGRATIONS: list[Callable[[Database], None]] = [_v1_initial, _v2_message_note]


# rows out of the database


def select_rows(conn: sqlite3.Connection, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
    """Rows by column name without changing the shared connection's row factory (sqlite-utils relies on it)."""
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    return cur.execute(sql, tuple(params)).fetchall()


def message_from_row(row: sqlite3.Row) -> MessageRecord:
    """A stored message, its JSON columns decoded; the store's reads build every record through here."""
    return MessageRecord(id=row["id"], idx=row["idx"], role=row["role"], text=row["text"], prompt=row["prompt"],
                         image_sha=row["image_sha"], regions=json.loads(row["regions"]), model=row["model"],
                         settings=json.loads(row["settings"]), complete=bool(row["complete"]),
                         created=row["created"], updated=row["updated"], note=row["note"])


def region_from_row(row: sqlite3.Row) -> Region:
    """A stored region, its mask still encoded; box, area and size come from the row and the RLE header."""
    encoded, box = _loads(row["mask"]), _loads(row["box"])
    size, area = (0, 0), 0.0
    if encoded is not None:
        h, w, counts = rle.validate(encoded)
        size, area = (w, h), float(counts[1::2].sum()) / (h * w)
    return Region([(row["concept"] or "", row["prob"] or 0.0)], row["caption"] or "", row["iou"] or 0.0,
                  None if box is None else tuple(int(v) for v in box), area, size,
                  Prompt.from_dict(json.loads(row["prompt"])), number=row["number"], image=row["image_sha"],
                  removed=bool(row["removed"]), encoded=encoded)


# values into the database: each check raises StoreError, so bad input never opens a transaction


def region_row(image_sha: str, region: Region) -> dict[str, Any]:
    """A validated regions row (mask as RLE JSON), shared by adding and refining a region."""
    if not isinstance(region, Region):
        raise StoreError("a region must be a Region")
    if region.prompt is None:
        raise StoreError("a stored region needs the prompt that made it")
    mask = region.encoded
    if mask is not None:
        _checked(rle.validate, mask)
    elif region.has_mask:
        mask = _checked(rle.encode, region.mask)
    return {"image_sha": image_sha, "prompt": to_json(region.prompt.to_dict(), "prompt"),
            "mask": None if mask is None else to_json(mask, "mask"),
            "box": _box(region.box), "concept": check_label(region.concept, "concept"),
            "prob": _score(region.concept_prob, "prob"), "iou": _score(region.iou, "iou"),
            "caption": check_label(region.caption, "caption")}


def check_owner(owner: Any) -> str:
    """The owner id every public method takes first: a non-empty label."""
    if not isinstance(owner, str) or not owner.strip():
        raise StoreError("owner must be a non-empty string")
    if len(owner) > MAX_LABEL:
        raise StoreError(f"owner is longer than {MAX_LABEL} characters")
    return owner


def check_title(title: Any) -> str:
    """A title as the sidebar shows it: one line, whitespace collapsed, cut to MAX_TITLE."""
    if not isinstance(title, str):
        raise StoreError("title must be a string")
    title = " ".join(title.split())[:MAX_TITLE].rstrip()
    if not title:
        raise StoreError("title must not be empty")
    return title


def check_text(value: Any, name: str, limit: int) -> str:
    """A string of at most `limit` characters, so one request cannot grow the database without bound."""
    if not isinstance(value, str):
        raise StoreError(f"{name} must be a string")
    if len(value) > limit:
        raise StoreError(f"{name} is longer than {limit:,} characters")
    return value


def check_label(value: Any, name: str) -> str | None:
    """An optional short string (model name, concept, caption)."""
    return None if value is None else check_text(value, name, MAX_LABEL)


def check_int(value: Any, name: str, low: int, high: int | None) -> int:
    """A plain int in range; numpy integers (TAP's outputs) pass, bools do not."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise StoreError(f"{name} must be an integer")
    if value < low or (high is not None and value > high):
        raise StoreError(f"{name} must be at least {low}" + (f" and at most {high}" if high is not None else ""))
    return int(value)


def check_format(value: Any) -> str:
    """An image format, lower-cased; it becomes the file's extension, so it must be a short plain name."""
    if not isinstance(value, str) or not _FORMAT.fullmatch(value.lower()):
        raise StoreError("image format must be a short name such as 'png' or 'jpeg'")
    return value.lower()


def to_json(value: Any, name: str) -> str:
    """Compact JSON for a TEXT column; NaN and unknown types are refused rather than stored unreadable."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), default=_plain)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{name} must be JSON-serialisable: {e}") from e


def _score(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not math.isfinite(value):
        raise StoreError(f"{name} must be a finite number")
    return float(value)


def _box(box: Iterable[float] | None) -> str | None:
    if box is None:
        return None
    if isinstance(box, (str, bytes)) or not isinstance(box, Iterable) or len(values := list(box)) != 4:
        raise StoreError("box must be [x1, y1, x2, y2]")
    exact = [isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values]  # pixels stay ints
    return json.dumps([int(v) if is_int else _score(v, "box coordinate") for v, is_int in zip(values, exact)])


def _plain(value: Any) -> Any:
    """Numpy values (TAP's outputs) become plain lists and numbers; anything else is refused."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _checked(fn: Callable[[Any], Any], mask: Any) -> Any:
    """Run an RLE helper, reporting its ValueError as a StoreError like every other bad input."""
    try:
        return fn(mask)
    except ValueError as e:
        raise StoreError(f"mask: {e}") from e
