"""Conversation history for TAP-Chat: one SQLite file plus a content-addressed image folder.

Why it looks the way it does:
- One connection shared by the server's threads, every access serialised by one lock, every write one
  `BEGIN IMMEDIATE` transaction: a crash (or an exception) never leaves half a message, half a region or a
  conversation without its owner row. WAL keeps readers in other processes (backups, exports) unblocked.
- Every method that names a conversation also names its owner, and "not yours" is reported exactly like "does not
  exist", so one user can never probe another's conversation ids.
- Streaming answers are saved as they grow (`update_message(..., complete=False)`) so a crash keeps the partial
  text, flagged incomplete; fine-tuning exports skip such answers.
- Images are stored once per sha256 under `data_dir/<sha[:2]>/<sha>.<ext>` (written atomically) and removed when
  the last conversation that used them is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlite_utils import Database

from tokenizer_tap.region import Region

from .store_rows import (
    CONV_ID,
    DEFAULT_TITLE,
    MAX_LABEL,
    MAX_PAGE,
    MAX_PROMPT,
    MAX_QUERY,
    MAX_TEXT,
    MAX_TITLE,
    MIGRATIONS,
    ROLES,
    SHA256,
    ConversationInfo,
    ConversationRecord,
    MessageRecord,
    NotFoundError,
    StoreError,
    check_format,
    check_int,
    check_label,
    check_owner,
    check_text,
    check_title,
    message_from_row,
    region_from_row,
    region_row,
    select_rows,
    to_json,
)

# The row types, limits and errors live in store_rows; callers keep importing them from here.
__all__ = ["DEFAULT_TITLE", "MAX_LABEL", "MAX_PAGE", "MAX_PROMPT", "MAX_QUERY", "MAX_TEXT", "MAX_TITLE", "MIGRATIONS",
           "ROLES", "ChatStore", "ConversationInfo", "ConversationRecord", "MessageRecord", "NotFoundError",
           "StoreError"]

BUSY_TIMEOUT_MS = 10_000  # other processes (a backup, an export script) may hold the write lock briefly
_WORD = re.compile(r"\w+")  # never contains a double quote, so a word can be quoted as an FTS5 string as is
_CONVERSATION_COLUMNS = """c.id, c.owner, c.title, c.created, c.updated,
    (SELECT COUNT(*) FROM messages m WHERE m.conversation = c.id) AS message_count"""


class ChatStore:
    """Thread-safe conversation store; see the module docstring for the guarantees."""

    def __init__(self, db_path: str | Path, data_dir: str | Path | None = None) -> None:
        self.db_path = Path(db_path)
        self.data_dir = Path(data_dir) if data_dir is not None else self.db_path.parent / "images"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._last_time = datetime.min.replace(tzinfo=timezone.utc)
        self._closed = False
        self._conn = sqlite3.connect(self.db_path, check_same_thread=False)
        try:
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._db = Database(self._conn)
            self._migrate()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise StoreError(f"cannot open {self.db_path}: {e}") from e
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> ChatStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # conversations

    def create_conversation(self, owner: str, title: str = DEFAULT_TITLE) -> str:
        owner, title = check_owner(owner), check_title(title)
        conv_id = uuid.uuid4().hex
        with self._write() as conn:
            now = self._now()
            conn.execute("INSERT OR IGNORE INTO owners (id, created) VALUES (?, ?)", (owner, now))
            conn.execute("INSERT INTO conversations (id, owner, title, created, updated) VALUES (?, ?, ?, ?, ?)",
                         (conv_id, owner, title, now, now))
        return conv_id

    def list_conversations(self, owner: str, limit: int = 50, offset: int = 0) -> list[ConversationInfo]:
        """The owner's conversations, most recently active first."""
        owner = check_owner(owner)
        limit, offset = check_int(limit, "limit", 1, MAX_PAGE), check_int(offset, "offset", 0, None)
        with self._read() as conn:
            rows = select_rows(conn, f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE c.owner = ? "
                               "ORDER BY c.updated DESC, c.rowid DESC LIMIT ? OFFSET ?", (owner, limit, offset))
        return [ConversationInfo(**row) for row in rows]

    def get_conversation(self, owner: str, conv_id: str) -> ConversationRecord:
        owner = check_owner(owner)
        with self._read() as conn:
            return self._load(conn, owner, conv_id)

    def rename(self, owner: str, conv_id: str, title: str) -> None:
        """Change the title; not counted as activity, so the list order stays put."""
        owner, title = check_owner(owner), check_title(title)
        with self._write() as conn:
            self._conversation(conn, owner, conv_id)
            conn.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id))

    def delete(self, owner: str, conv_id: str) -> None:
        """Delete with its messages and regions, then the image files nothing references any more."""
        owner = check_owner(owner)
        with self._lock:  # held until the files are gone, so add_image cannot re-add one mid-way
            with self._write() as conn:
                self._conversation(conn, owner, conv_id)
                used = {sha for (sha,) in conn.execute(
                    "SELECT image_sha FROM messages WHERE conversation = ? AND image_sha IS NOT NULL "
                    "UNION SELECT image_sha FROM regions WHERE conversation = ?", (conv_id, conv_id))}
                conn.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))
                orphans = self._drop_unused_images(conn, used)
            for path in orphans:  # after the commit: a rollback must never lose a file
                path.unlink(missing_ok=True)

    # images

    def add_image(self, owner: str, data: bytes, *, width: int, height: int, format: str) -> str:
        """Store the encoded image once per content hash and return the sha256 (idempotent)."""
        check_owner(owner)
        if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
            raise StoreError("image data must be non-empty bytes")
        data = bytes(data)
        width, height = check_int(width, "width", 1, None), check_int(height, "height", 1, None)
        fmt = check_format(format)
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            with self._read() as conn:
                row = conn.execute("SELECT path FROM images WHERE sha256 = ?", (sha,)).fetchone()
            if row is not None:
                if not (self.data_dir / row[0]).exists():  # someone removed the file: heal it
                    _write_atomically(self.data_dir / row[0], data)
                return sha
            rel = f"{sha[:2]}/{sha}.{'jpg' if fmt == 'jpeg' else fmt}"
            _write_atomically(self.data_dir / rel, data)  # file first: a row never points at nothing
            with self._write() as conn:
                conn.execute("INSERT INTO images (sha256, path, width, height, bytes, format, created) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (sha, rel, width, height, len(data), fmt, self._now()))
        return sha

    def image_path(self, sha: str) -> Path:
        """Where the image file is; a sha is only known to someone who has the image, so no owner is needed."""
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise NotFoundError("image not found")
        with self._read() as conn:
            row = conn.execute("SELECT path FROM images WHERE sha256 = ?", (sha,)).fetchone()
        if row is None:
            raise NotFoundError("image not found")
        return self.data_dir / row[0]

    # regions

    def add_region(self, owner: str, conv_id: str, region: Region, *, image_sha: str) -> int:
        """Record a region and return its number: max + 1 over all, removed ones included, so never reused."""
        owner = check_owner(owner)
        row = region_row(image_sha, region)
        with self._write() as conn:
            self._conversation(conn, owner, conv_id)
            self._require_image(conn, image_sha)
            (number,) = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM regions WHERE conversation = ?",
                                     (conv_id,)).fetchone()
            now = self._now()
            conn.execute("INSERT INTO regions (conversation, number, image_sha, prompt, mask, box, concept, prob, iou, "
                         "caption, removed, created) VALUES (:conversation, :number, :image_sha, :prompt, :mask, "
                         ":box, :concept, :prob, :iou, :caption, 0, :created)",
                         {**row, "conversation": conv_id, "number": number, "created": now})
            self._touch(conn, conv_id, now)
        return number

    def update_region(self, owner: str, conv_id: str, region: Region, *, image_sha: str) -> None:
        """Replace region `region.number`'s prompt and result in place (refined with another point)."""
        owner = check_owner(owner)
        number = check_int(region.number, "region number", 1, None)
        row = region_row(image_sha, region)
        with self._write() as conn:
            self._conversation(conn, owner, conv_id)
            self._require_image(conn, image_sha)
            cur = conn.execute("UPDATE regions SET image_sha = :image_sha, prompt = :prompt, mask = :mask, box = :box, "
                               "concept = :concept, prob = :prob, iou = :iou, caption = :caption "
                               "WHERE conversation = :conversation AND number = :number AND removed = 0",
                               {**row, "conversation": conv_id, "number": number})
            if cur.rowcount == 0:
                raise NotFoundError("region not found")
            self._touch(conn, conv_id, self._now())

    def remove_region(self, owner: str, conv_id: str, number: int) -> None:
        """Soft delete: old messages still name the region and its number must stay taken."""
        owner = check_owner(owner)
        number = check_int(number, "region number", 1, None)
        with self._write() as conn:
            self._conversation(conn, owner, conv_id)
            cur = conn.execute("UPDATE regions SET removed = 1 WHERE conversation = ? AND number = ?",
                               (conv_id, number))
            if cur.rowcount == 0:
                raise NotFoundError("region not found")
            self._touch(conn, conv_id, self._now())

    # messages

    def append_message(self, owner: str, conv_id: str, role: str, text: str, *, prompt: str | None = None,
                       image_sha: str | None = None, regions: Iterable[int] = (), model: str | None = None,
                       settings: dict[str, Any] | None = None, complete: bool = True) -> int:
        """Add a turn at the end of the conversation and return the message id."""
        owner = check_owner(owner)
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}")
        text = check_text(text, "text", MAX_TEXT)
        if prompt is not None:
            prompt = check_text(prompt, "prompt", MAX_PROMPT)
        if isinstance(regions, (str, bytes)):
            raise StoreError("regions must be a list of region numbers")
        numbers = [check_int(n, "region number", 1, None) for n in regions]
        if settings is not None and not isinstance(settings, dict):
            raise StoreError("settings must be a dict")
        settings_json = to_json(settings or {}, "settings")
        model = check_label(model, "model")
        if not isinstance(complete, bool):
            raise StoreError("complete must be a bool")
        with self._write() as conn:
            self._conversation(conn, owner, conv_id)
            if image_sha is not None:
                self._require_image(conn, image_sha)
            known = {n for (n,) in conn.execute("SELECT number FROM regions WHERE conversation = ?", (conv_id,))}
            if unknown := sorted(set(numbers) - known):
                raise StoreError(f"unknown region number(s): {', '.join(map(str, unknown))}")
            (idx,) = conn.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM messages WHERE conversation = ?",
                                  (conv_id,)).fetchone()
            now = self._now()
            cur = conn.execute(
                "INSERT INTO messages (conversation, idx, role, text, prompt, image_sha, regions, model, settings, "
                "complete, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conv_id, idx, role, text, prompt, image_sha, json.dumps(numbers), model, settings_json,
                 int(complete), now, now))
            self._touch(conn, conv_id, now)
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_message(self, owner: str, message_id: int, text: str, *, complete: bool,
                       note: str | None = None) -> None:
        """Replace a message's text (and note): periodic saves while an answer streams, then the final one."""
        owner = check_owner(owner)
        text = check_text(text, "text", MAX_TEXT)
        note = check_label(note, "note")
        if not isinstance(complete, bool):
            raise StoreError("complete must be a bool")
        if not isinstance(message_id, int) or isinstance(message_id, bool):
            raise NotFoundError("message not found")
        with self._write() as conn:
            row = conn.execute("SELECT m.conversation FROM messages m JOIN conversations c ON c.id = m.conversation "
                               "WHERE m.id = ? AND c.owner = ?", (message_id, owner)).fetchone()
            if row is None:
                raise NotFoundError("message not found")
            now = self._now()
            conn.execute("UPDATE messages SET text = ?, complete = ?, note = ?, updated = ? WHERE id = ?",
                         (text, int(complete), note, now, message_id))
            self._touch(conn, row[0], now)

    def truncate(self, owner: str, conv_id: str, keep: int) -> int:
        """Drop the messages from position `keep` on (undo, regenerate); returns how many went."""
        owner = check_owner(owner)
        keep = check_int(keep, "keep", 0, None)
        with self._write() as conn:
            self._conversation(conn, owner, conv_id)
            removed = conn.execute("DELETE FROM messages WHERE conversation = ? AND idx >= ?",
                                   (conv_id, keep)).rowcount
            if removed:
                self._touch(conn, conv_id, self._now())
        return removed

    # search and export

    def search(self, owner: str, query: str, limit: int = 20) -> list[ConversationInfo]:
        """The owner's conversations whose messages contain all the words, or whose title contains the query.

        The query is plain words: FTS5 syntax (quotes, `*`, `-`, NEAR, parentheses) has no effect and never raises.
        """
        owner = check_owner(owner)
        query = check_text(query, "query", MAX_QUERY)
        limit = check_int(limit, "limit", 1, MAX_PAGE)
        phrase = query.strip()
        if not phrase:
            return []
        like = "%" + phrase.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where, params = "c.title LIKE ? ESCAPE '\\'", [like]
        if words := _WORD.findall(phrase):
            where += (" OR c.id IN (SELECT m.conversation FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                      "WHERE messages_fts MATCH ?)")
            params.append(" ".join(f'"{w}"' for w in words))
        with self._read() as conn:
            rows = select_rows(conn, f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE c.owner = ? "
                               f"AND ({where}) ORDER BY c.updated DESC, c.rowid DESC LIMIT ?", (owner, *params, limit))
        return [ConversationInfo(**row) for row in rows]

    def export_llava(self, owner: str, conv_id: str) -> list[dict[str, Any]]:
        """Fine-tuning records (LLaVA/Bunny JSON; see `ConversationRecord.llava`), images as paths under `data_dir`."""
        owner = check_owner(owner)
        with self._read() as conn:
            record = self._load(conn, owner, conv_id)
            paths = dict(conn.execute("SELECT i.sha256, i.path FROM images i JOIN messages m ON m.image_sha = i.sha256 "
                                      "WHERE m.conversation = ?", (conv_id,)).fetchall())
        return record.llava(paths)

    # internals

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot, even while another process writes."""
        with self._lock:
            self._check_open()
            self._conn.execute("BEGIN")
            with self._conn:
                yield self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed whole or rolled back whole. IMMEDIATE takes the write lock up front, so the
        MAX()+1 numbering reads cannot race with another process."""
        with self._lock:
            self._check_open()
            self._conn.execute("BEGIN IMMEDIATE")
            with self._conn:
                yield self._conn

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the chat store is closed")

    def _migrate(self) -> None:
        with self._write() as conn:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.db_path} has schema version {version} but this TAP-Chat only knows up to "
                                 f"{len(MIGRATIONS)}; upgrade TAP-Chat to open it")
            for number in range(version + 1, len(MIGRATIONS) + 1):
                try:
                    MIGRATIONS[number - 1](self._db)
                except Exception as e:
                    raise StoreError(f"migrating {self.db_path} to schema version {number} failed: {e}") from e
                conn.execute(f"PRAGMA user_version = {number}")

    def _now(self) -> str:
        """UTC ISO-8601 with microseconds, strictly increasing within this store so `updated` orders activity."""
        now = datetime.now(timezone.utc)
        if now <= self._last_time:
            now = self._last_time + timedelta(microseconds=1)
        self._last_time = now
        return now.isoformat(timespec="microseconds")

    def _conversation(self, conn: sqlite3.Connection, owner: str, conv_id: str) -> sqlite3.Row:
        if isinstance(conv_id, str) and CONV_ID.fullmatch(conv_id):
            rows = select_rows(conn, f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c "
                                     "WHERE c.id = ? AND c.owner = ?", (conv_id, owner))
            if rows:
                return rows[0]
        raise NotFoundError("conversation not found")

    def _touch(self, conn: sqlite3.Connection, conv_id: str, now: str) -> None:
        conn.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conv_id))

    def _require_image(self, conn: sqlite3.Connection, sha: Any) -> None:
        if not isinstance(sha, str) or conn.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone() is None:
            raise StoreError("image not found: add it with add_image first")

    def _drop_unused_images(self, conn: sqlite3.Connection, shas: Iterable[str]) -> list[Path]:
        paths = []
        for sha in shas:
            row = conn.execute(
                "SELECT path FROM images WHERE sha256 = ? AND NOT EXISTS (SELECT 1 FROM messages WHERE image_sha = ?) "
                "AND NOT EXISTS (SELECT 1 FROM regions WHERE image_sha = ?)", (sha, sha, sha)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM images WHERE sha256 = ?", (sha,))
                paths.append(self.data_dir / row[0])
        return paths

    def _load(self, conn: sqlite3.Connection, owner: str, conv_id: str) -> ConversationRecord:
        info = ConversationInfo(**self._conversation(conn, owner, conv_id))
        messages = [message_from_row(r) for r in select_rows(
            conn, "SELECT * FROM messages WHERE conversation = ? ORDER BY idx", (conv_id,))]
        regions = [region_from_row(r) for r in select_rows(
            conn, "SELECT * FROM regions WHERE conversation = ? ORDER BY number", (conv_id,))]
        return ConversationRecord(info, messages, regions)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename: readers and crashes only ever see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
