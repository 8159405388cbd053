"""The conversation store: schema, owner isolation, search, LLaVA export, concurrency, crash safety, mask RLE."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from assistant import store
from assistant.store import ChatStore, NotFoundError, StoreError
from tokenizer_tap import rle
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.region import Region

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\nfake image one"
JPEG = b"\xff\xd8\xff\xe0fake image two"


@pytest.fixture
def chat(tmp_path: Path) -> Iterator[ChatStore]:
    with ChatStore(tmp_path / "chat.db") as s:
        yield s


def _region(chat: ChatStore, owner: str, conv: str, sha: str, mask: np.ndarray | None = None, **kw) -> int:
    """Store a region (a 2x2 square on a 5x4 image unless `mask`); `kw` overrides its fields."""
    if mask is None:
        mask = np.zeros((4, 5), bool)
        mask[1:3, 2:4] = True
    region = Region.from_mask(mask, [("dog", 0.9)], "a dog", iou=0.8, prompt=Prompt.point(10, 20))
    for name, value in kw.items():
        setattr(region, name, value)
    return chat.add_region(owner, conv, region, image_sha=sha)


def _rows(chat: ChatStore, sql: str, *params) -> list[tuple]:
    """Look at the file through a second connection, as another process would."""
    with closing(sqlite3.connect(chat.db_path)) as conn:
        return conn.execute(sql, params).fetchall()


# schema


def test_schema_is_created_at_the_current_version(tmp_path: Path) -> None:
    ChatStore(tmp_path / "chat.db").close()
    conn = sqlite3.connect(tmp_path / "chat.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store.MIGRATIONS) == 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"owners", "conversations", "images", "messages", "regions", "messages_fts"} <= tables
    cascades = {(r[2], r[3], r[6]) for r in conn.execute("PRAGMA foreign_key_list(messages)")}
    assert ("conversations", "conversation", "CASCADE") in cascades and ("images", "image_sha", "NO ACTION") in cascades
    unique = {tuple(c[2] for c in conn.execute(f"PRAGMA index_info('{r[1]}')"))
              for table in ("messages", "regions") for r in conn.execute(f"PRAGMA index_list({table})") if r[2]}
    assert {("conversation", "idx"), ("conversation", "number")} <= unique
    conn.close()
    with ChatStore(tmp_path / "chat.db") as again:  # reopening an up-to-date database migrates nothing
        assert again.list_conversations("alice") == []
    assert (tmp_path / "images").is_dir()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    ChatStore(tmp_path / "chat.db").close()
    with sqlite3.connect(tmp_path / "chat.db") as conn:
        conn.execute("PRAGMA user_version = 7")
    with pytest.raises(StoreError, match="schema version 7.*upgrade TAP-Chat"):
        ChatStore(tmp_path / "chat.db")


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "chat.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        ChatStore(tmp_path / "chat.db")


def test_failed_migration_leaves_the_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ChatStore(tmp_path / "chat.db").close()

    def broken(db) -> None:
        db["half_done"].create({"id": int}, pk="id")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, broken])
    with pytest.raises(StoreError, match="schema version 3 failed: disk on fire"):
        ChatStore(tmp_path / "chat.db")
    conn = sqlite3.connect(tmp_path / "chat.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    conn.close()


def test_a_version_1_database_gains_the_note_column_and_keeps_its_rows(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:  # a database as the first release wrote it
        m.setattr(store, "MIGRATIONS", store.MIGRATIONS[:1])
        with ChatStore(tmp_path / "chat.db") as old:
            conv = old.create_conversation("alice", "Old chat")
            old.append_message("alice", conv, "user", "What is the walrus doing?")
            mid = old.append_message("alice", conv, "assistant", "It is sleeping.")
    with sqlite3.connect(tmp_path / "chat.db") as conn:
        assert "note" not in {r[1] for r in conn.execute("PRAGMA table_info(messages)")}
    with ChatStore(tmp_path / "chat.db") as chat:
        record = chat.get_conversation("alice", conv)
        assert [(m.text, m.note) for m in record.messages] == [("What is the walrus doing?", None),
                                                               ("It is sleeping.", None)]
        assert record.info.title == "Old chat" and [i.id for i in chat.search("alice", "walrus")] == [conv]
        chat.update_message("alice", mid, "It is sleeping.", complete=True, note="TAP sees a seal here (<region1>)")
        assert chat.get_conversation("alice", conv).messages[1].note == "TAP sees a seal here (<region1>)"
        assert chat.get_conversation("alice", conv).turns()[0].note == "TAP sees a seal here (<region1>)"
        assert [i.id for i in chat.search("alice", "sleeping")] == [conv]  # the search index still follows
    with sqlite3.connect(tmp_path / "chat.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store.MIGRATIONS)


# conversations


def test_create_list_get_rename(chat: ChatStore) -> None:
    a = chat.create_conversation("alice")
    b = chat.create_conversation("alice", "  Holiday\n photos  ")
    c = chat.create_conversation("alice", "x" * 500)
    assert [i.id for i in chat.list_conversations("alice")] == [c, b, a]
    chat.append_message("alice", a, "user", "hello")  # activity moves a conversation to the top
    infos = chat.list_conversations("alice")
    assert [i.id for i in infos] == [a, c, b]
    assert [i.message_count for i in infos] == [1, 0, 0]
    assert [i.title for i in infos] == ["New chat", "x" * 200, "Holiday photos"]
    assert [i.id for i in chat.list_conversations("alice", limit=2, offset=1)] == [c, b]
    chat.rename("alice", b, " Beach ")
    assert [i.id for i in chat.list_conversations("alice")] == [a, c, b]  # renaming is not activity
    info = chat.get_conversation("alice", b).info
    assert (info.title, info.owner, info.message_count) == ("Beach", "alice", 0)
    assert datetime.fromisoformat(info.created).tzinfo == timezone.utc
    assert len(a) == 32 and int(a, 16) >= 0
    for bad in ("", "   \n", None, 3):
        with pytest.raises(StoreError):
            chat.rename("alice", b, bad)
    with pytest.raises(StoreError):
        chat.list_conversations("alice", limit=0)


def test_updated_orders_activity_even_when_the_clock_stands_still(chat: ChatStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None) -> datetime:
            return datetime(2030, 1, 1, tzinfo=timezone.utc)

    monkeypatch.setattr(store, "datetime", Frozen)
    a = chat.create_conversation("alice")
    b = chat.create_conversation("alice")
    chat.append_message("alice", a, "user", "newest activity")
    infos = chat.list_conversations("alice")
    assert [i.id for i in infos] == [a, b]
    assert infos[0].updated == "2030-01-01T00:00:00.000002+00:00" > infos[1].updated


def test_delete_cascades_and_removes_unused_image_files(chat: ChatStore) -> None:
    shared = chat.add_image("alice", PNG, width=4, height=3, format="PNG")
    own = chat.add_image("alice", JPEG, width=4, height=3, format="jpeg")
    a = chat.create_conversation("alice")
    chat.append_message("alice", a, "user", "zebra question", image_sha=shared)
    _region(chat, "alice", a, own)
    b = chat.create_conversation("bob")
    chat.append_message("bob", b, "user", "about the same picture", image_sha=shared)
    pending = chat.add_image("carol", b"uploaded, not yet used", width=1, height=1, format="webp")
    shared_path, own_path, pending_path = map(chat.image_path, (shared, own, pending))

    chat.delete("alice", a)
    with pytest.raises(NotFoundError):
        chat.get_conversation("alice", a)
    assert _rows(chat, "SELECT COUNT(*) FROM messages WHERE conversation = ?", a) == [(0,)]
    assert _rows(chat, "SELECT COUNT(*) FROM regions WHERE conversation = ?", a) == [(0,)]
    assert chat.search("alice", "zebra") == []
    assert not own_path.exists() and shared_path.exists() and pending_path.exists()
    with pytest.raises(NotFoundError):
        chat.image_path(own)

    chat.delete("bob", b)
    assert not shared_path.exists() and pending_path.exists()
    assert _rows(chat, "SELECT sha256 FROM images") == [(pending,)]
    assert _rows(chat, "PRAGMA foreign_key_check") == []


# images


def test_images_are_stored_once_per_sha(chat: ChatStore) -> None:
    sha = chat.add_image("alice", PNG, width=640, height=480, format="PNG")
    assert chat.add_image("bob", bytearray(PNG), width=640, height=480, format="png") == sha
    path = chat.image_path(sha)
    assert path == chat.data_dir / sha[:2] / f"{sha}.png" and path.read_bytes() == PNG
    assert _rows(chat, "SELECT path, width, height, bytes, format FROM images") == [
        (f"{sha[:2]}/{sha}.png", 640, 480, len(PNG), "png")]
    assert [p.name for p in chat.data_dir.rglob("*") if p.is_file()] == [f"{sha}.png"]  # no temp files left
    jpg = chat.add_image("alice", JPEG, width=1, height=1, format="JPEG")
    assert chat.image_path(jpg).suffix == ".jpg" and jpg != sha
    path.unlink()  # a lost file is written again on the next upload
    chat.add_image("alice", PNG, width=640, height=480, format="png")
    assert path.read_bytes() == PNG
    for kwargs in ({"data": b""}, {"format": "../png"}, {"width": 0}, {"height": True}):
        with pytest.raises(StoreError):
            chat.add_image("alice", **({"data": PNG, "width": 1, "height": 1, "format": "png"} | kwargs))
    with pytest.raises(NotFoundError):
        chat.image_path("0" * 64)


# regions


def test_region_numbers_are_stable_and_never_reused(chat: ChatStore) -> None:
    sha = chat.add_image("alice", PNG, width=5, height=4, format="png")
    conv = chat.create_conversation("alice")
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    assert [_region(chat, "alice", conv, sha, mask=mask) for _ in range(3)] == [1, 2, 3]
    chat.remove_region("alice", conv, 2)
    assert _region(chat, "alice", conv, sha) == 4
    chat.remove_region("alice", conv, 4)  # removing the highest number must not free it
    assert _region(chat, "alice", conv, sha, encoded=rle.encode(mask), concepts=[]) == 5
    regions = chat.get_conversation("alice", conv).regions
    assert [(r.number, r.removed) for r in regions] == [(1, False), (2, True), (3, False), (4, True), (5, False)]
    first = regions[0]
    assert first.encoded is not None and first._mask is None  # read back encoded: decoded only when drawn
    assert (first.box, first.size, first.area, first.image) == ((1, 1, 4, 3), (5, 4), 6 / 20, sha)
    assert np.array_equal(first.mask, mask)
    assert (first.prompt, first.concept, first.concept_prob, first.iou, first.caption) == (
        Prompt.point(10, 20), "dog", 0.9, 0.8, "a dog")
    assert (regions[4].concept, regions[4].concept_prob) == ("", 0.0)
    with pytest.raises(NotFoundError, match="region not found"):
        chat.remove_region("alice", conv, 9)
    bad = ({"encoded": {"size": [4, 5], "counts": [3]}}, {"box": (1, 2, 3)}, {"concepts": [("dog", float("nan"))]},
           {"prompt": None}, {"concepts": [(5, 0.5)]})
    for kwargs in bad:
        with pytest.raises(StoreError):
            _region(chat, "alice", conv, sha, **kwargs)
    with pytest.raises(StoreError):
        _region(chat, "alice", conv, "0" * 64)
    assert _region(chat, "alice", conv, sha, box=np.array([0, 1, 2, 3]),
                   concepts=[("dog", np.float32(0.5))]) == 6  # failed adds did not take a number; numpy is fine
    last = chat.get_conversation("alice", conv).regions[-1]
    assert (last.box, last.concept_prob) == ((0, 1, 2, 3), 0.5)


# messages


def test_messages_keep_their_order_and_fields(chat: ChatStore) -> None:
    sha = chat.add_image("alice", PNG, width=5, height=4, format="png")
    conv = chat.create_conversation("alice")
    number = _region(chat, "alice", conv, sha)
    first = chat.append_message("alice", conv, "user", "What is <region1>?", prompt="<region1>: dog\nWhat is it?",
                                image_sha=sha, regions=[number])
    chat.append_message("alice", conv, "assistant", "A dog.", model="tap-chat-v1", settings={"temperature": 0.2})
    for i in range(5):
        chat.append_message("alice", conv, "user" if i % 2 else "assistant", f"turn {i}")
    msgs = chat.get_conversation("alice", conv).messages
    assert [m.idx for m in msgs] == list(range(7))
    assert [m.text for m in msgs[2:]] == [f"turn {i}" for i in range(5)]
    assert msgs[0].id == first
    assert (msgs[0].prompt, msgs[0].image_sha, msgs[0].regions, msgs[0].settings) == (
        "<region1>: dog\nWhat is it?", sha, [1], {})
    assert (msgs[1].role, msgs[1].model, msgs[1].settings, msgs[1].prompt, msgs[1].complete) == (
        "assistant", "tap-chat-v1", {"temperature": 0.2}, None, True)
    assert [m.updated for m in msgs] == sorted({m.updated for m in msgs})  # strictly increasing

    assert chat.truncate("alice", conv, 3) == 4
    chat.append_message("alice", conv, "assistant", "regenerated")
    msgs = chat.get_conversation("alice", conv).messages
    assert [(m.idx, m.text) for m in msgs[2:]] == [(2, "turn 0"), (3, "regenerated")]
    assert chat.truncate("alice", conv, 0) == 4 and chat.get_conversation("alice", conv).messages == []

    chat.append_message("alice", conv, "user", "x" * store.MAX_TEXT)
    bad = ({"role": "system"}, {"text": "x" * (store.MAX_TEXT + 1)}, {"text": None}, {"regions": [7]},
           {"image_sha": "f" * 64}, {"settings": {"f": object()}}, {"complete": 1}, {"regions": "1"})
    for kwargs in bad:
        args = {"role": "user", "text": "hi"} | kwargs
        with pytest.raises(StoreError):
            chat.append_message("alice", conv, args.pop("role"), args.pop("text"), **args)
    assert chat.get_conversation("alice", conv).info.message_count == 1


def test_update_message_while_streaming(chat: ChatStore) -> None:
    conv = chat.create_conversation("alice")
    chat.append_message("alice", conv, "user", "Tell me a story")
    mid = chat.append_message("alice", conv, "assistant", "", complete=False)
    seen = []
    for partial in ("Once", "Once upon", "Once upon a time"):
        chat.update_message("alice", mid, partial, complete=False)
        msg = chat.get_conversation("alice", conv).messages[1]
        assert (msg.text, msg.complete) == (partial, False)
        seen.append(msg.updated)
    chat.update_message("alice", mid, "Once upon a time, the end.", complete=True)
    record = chat.get_conversation("alice", conv)
    msg = record.messages[1]
    assert (msg.text, msg.complete, msg.idx) == ("Once upon a time, the end.", True, 1)
    assert seen == sorted(seen) and msg.updated > seen[-1] > msg.created
    assert record.info.updated == msg.updated
    assert [i.id for i in chat.search("alice", "the end")] == [conv]
    with pytest.raises(NotFoundError, match="message not found"):
        chat.update_message("alice", 999, "x", complete=True)
    with pytest.raises(StoreError):
        chat.update_message("alice", mid, "x" * (store.MAX_TEXT + 1), complete=True)


# owner isolation


def test_other_owners_get_not_found_everywhere(chat: ChatStore) -> None:
    sha = chat.add_image("alice", PNG, width=5, height=4, format="png")
    conv = chat.create_conversation("alice", "secret plans")
    _region(chat, "alice", conv, sha)
    mid = chat.append_message("alice", conv, "user", "the secret is purple", image_sha=sha)
    chat.append_message("alice", conv, "assistant", "noted")
    before = chat.get_conversation("alice", conv)
    chat.create_conversation("bob", "bob's chat")
    attempts = {
        "get": lambda o, c: chat.get_conversation(o, c),
        "rename": lambda o, c: chat.rename(o, c, "mine now"),
        "delete": lambda o, c: chat.delete(o, c),
        "add_region": lambda o, c: _region(chat, o, c, sha),
        "remove_region": lambda o, c: chat.remove_region(o, c, 1),
        "append": lambda o, c: chat.append_message(o, c, "user", "hi"),
        "truncate": lambda o, c: chat.truncate(o, c, 0),
        "export": lambda o, c: chat.export_llava(o, c),
    }
    for name, attempt in attempts.items():
        for other, conv_id in (("bob", conv), ("Alice", conv), ("alice", "0" * 32), ("alice", "nope"),
                               ("alice", None)):
            with pytest.raises(NotFoundError, match="^conversation not found$"):
                attempt(other, conv_id)
                pytest.fail(f"{name} by {other} succeeded")
    with pytest.raises(NotFoundError, match="^message not found$"):
        chat.update_message("bob", mid, "hacked", complete=True)
    assert chat.get_conversation("alice", conv) == before
    assert [i.title for i in chat.list_conversations("bob")] == ["bob's chat"]
    assert chat.search("bob", "secret") == [] and chat.search("bob", "purple") == []
    assert [i.id for i in chat.search("alice", "purple")] == [conv]
    for bad_owner in ("", "  ", None, 42, "x" * (store.MAX_LABEL + 1)):
        with pytest.raises(StoreError) as err:
            chat.get_conversation(bad_owner, conv)
        assert not isinstance(err.value, NotFoundError)
        with pytest.raises(StoreError):
            chat.create_conversation(bad_owner)


# search


NASTY = ['"', "*", "NEAR(", "-", ")", "(", '"unbalanced', "dog*", "-dog", "NEAR(dog cat)", "dog OR", "AND", "NOT",
         "^dog", "dog:cat", "text:dog", "{dog}", "[", "'", "%", "_", "\\", "\x00", "🐶", "a" * 150]


def test_search_finds_words_and_titles(chat: ChatStore) -> None:
    a = chat.create_conversation("alice", "Garden birds")
    chat.append_message("alice", a, "user", "Is that a robin near the feeder?")
    b = chat.create_conversation("alice", "Kitchen")
    chat.append_message("alice", b, "user", "The dog-bowl is empty; 100% sure (really).")
    chat.append_message("alice", b, "assistant", "Yes, the dog's bowl looks empty.")
    assert [i.id for i in chat.search("alice", "robin")] == [a]
    assert [i.id for i in chat.search("alice", "ROBIN feeder")] == [a]  # all words, any case, any order
    assert chat.search("alice", "robin empty") == []
    assert [i.id for i in chat.search("alice", "garden")] == [a]  # title only
    assert [i.id for i in chat.search("alice", "den bir")] == [a]  # title substring
    assert [i.id for i in chat.search("alice", "dog")] == [b]  # one hit per conversation
    assert [i.id for i in chat.search("alice", "dog-bowl")] == [b]
    assert [i.id for i in chat.search("alice", '"dog" -bowl')] == [b]  # `-` is not NOT
    assert [i.id for i in chat.search("alice", "100%")] == [b]
    assert [i.id for i in chat.search("alice", "near")] == [a]
    assert [i.id for i in chat.search("alice", "the")] == [b, a]  # most recently active first
    assert chat.search("alice", "   ") == []
    assert chat.search("alice", "x" * store.MAX_QUERY) == []
    with pytest.raises(StoreError):
        chat.search("alice", "x" * (store.MAX_QUERY + 1))
    chat.truncate("alice", a, 0)
    assert chat.search("alice", "robin") == []  # the index follows deletes


@pytest.mark.parametrize("query", NASTY)
def test_search_never_raises_on_fts_syntax(chat: ChatStore, query: str) -> None:
    conv = chat.create_conversation("alice", "Pets")
    chat.append_message("alice", conv, "user", "dog cat near (NEAR) AND OR NOT * - text")
    assert isinstance(chat.search("alice", query), list)
    chat.rename("alice", conv, f"title {query}")
    assert conv in [i.id for i in chat.search("alice", query)]


# export


def test_export_llava_golden(chat: ChatStore) -> None:
    dog = chat.add_image("alice", PNG, width=5, height=4, format="png")
    cat = chat.add_image("alice", JPEG, width=5, height=4, format="jpeg")
    conv = chat.create_conversation("alice")
    turns = [
        ("user", "Describe the image.", None, dog, True),
        ("assistant", "A dog on grass.", None, None, True),
        ("user", "What is <region1>?", "<region1>: dog (0.91)\nWhat is <region1>?", dog, True),
        ("assistant", "A brown dog.", None, None, True),
        ("user", "And the sky?", None, dog, True),
        ("assistant", "Blu", None, None, False),  # interrupted answer: pair skipped
        ("user", "<image>\nNow this one.", None, cat, True),
        ("assistant", "A cat.", None, None, True),
        ("user", "Unanswered, then asked again", None, cat, True),
        ("user", "What is 2+2?", None, None, True),
        ("assistant", "4", None, None, True),
        ("user", "And 3+3?", "Question: 3+3?", None, True),
        ("assistant", "6", None, None, True),
        ("user", "Trailing question", None, None, True),
    ]
    for role, text, prompt, image, complete in turns:
        chat.append_message("alice", conv, role, text, prompt=prompt, image_sha=image, complete=complete)
    assert chat.export_llava("alice", conv) == [
        {"id": f"{conv}-0", "image": f"{dog[:2]}/{dog}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": "A dog on grass."},
            {"from": "human", "value": "<region1>: dog (0.91)\nWhat is <region1>?"},
            {"from": "gpt", "value": "A brown dog."}]},
        {"id": f"{conv}-1", "image": f"{cat[:2]}/{cat}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nNow this one."},
            {"from": "gpt", "value": "A cat."}]},
        {"id": f"{conv}-2", "conversations": [
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "Question: 3+3?"},
            {"from": "gpt", "value": "6"}]},
    ]
    for record in chat.export_llava("alice", conv):
        if "image" in record:
            assert (chat.data_dir / record["image"]).is_file()
    json.dumps(chat.export_llava("alice", conv))
    assert chat.export_llava("alice", chat.create_conversation("alice")) == []


# concurrency and durability


def test_concurrent_appends_are_exact(chat: ChatStore) -> None:
    own = [chat.create_conversation(f"user{t}") for t in range(16)]
    shared = chat.create_conversation("team")
    per_thread, errors = 40, []
    start = threading.Barrier(16 + 8 + 1)
    done = threading.Event()

    def run(fn, *args) -> None:
        try:
            start.wait()
            fn(*args)
        except BaseException as e:  # collected: an exception in a thread would otherwise vanish
            errors.append(e)

    def write_own(t: int) -> None:
        for i in range(per_thread):
            chat.append_message(f"user{t}", own[t], "user" if i % 2 == 0 else "assistant", f"t{t} m{i}")

    def write_shared(t: int) -> None:
        for i in range(per_thread):
            chat.append_message("team", shared, "user", f"w{t} m{i}")

    def read() -> None:
        while not done.is_set():
            chat.list_conversations("team")
            chat.search("user3", "m1")
            chat.get_conversation("team", shared)

    threads = [threading.Thread(target=run, args=(write_own, t)) for t in range(16)]
    threads += [threading.Thread(target=run, args=(write_shared, t)) for t in range(8)]
    reader = threading.Thread(target=run, args=(read,))
    for th in [*threads, reader]:
        th.start()
    for th in threads:
        th.join(60)
    done.set()
    reader.join(60)
    assert errors == []
    for t, conv in enumerate(own):
        msgs = chat.get_conversation(f"user{t}", conv).messages
        assert [(m.idx, m.text) for m in msgs] == [(i, f"t{t} m{i}") for i in range(per_thread)]
    msgs = chat.get_conversation("team", shared).messages
    assert [m.idx for m in msgs] == list(range(8 * per_thread))
    assert sorted(m.text for m in msgs) == sorted(f"w{t} m{i}" for t in range(8) for i in range(per_thread))
    for t in range(8):  # each writer's messages landed in the order it sent them
        assert [m.text for m in msgs if m.text.startswith(f"w{t} ")] == [f"w{t} m{i}" for i in range(per_thread)]
    assert _rows(chat, "SELECT COUNT(*) FROM messages") == [(24 * per_thread,)]


def test_exception_inside_a_write_leaves_no_partial_rows(chat: ChatStore, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = chat.add_image("alice", PNG, width=5, height=4, format="png")
    conv = chat.create_conversation("alice")
    chat.append_message("alice", conv, "user", "kept")
    before = chat.get_conversation("alice", conv)

    def boom(*args) -> None:  # fails after the row was inserted, before the commit
        raise RuntimeError("boom")

    monkeypatch.setattr(chat, "_touch", boom)
    with pytest.raises(RuntimeError):
        chat.append_message("alice", conv, "assistant", "lost walrus")
    with pytest.raises(RuntimeError):
        _region(chat, "alice", conv, sha)
    monkeypatch.undo()
    assert chat.get_conversation("alice", conv) == before
    assert chat.search("alice", "walrus") == []
    assert _rows(chat, "SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH 'walrus'") == [(0,)]
    chat.append_message("alice", conv, "assistant", "next")  # the store is still usable, numbering contiguous
    assert [m.idx for m in chat.get_conversation("alice", conv).messages] == [0, 1]
    assert _region(chat, "alice", conv, sha) == 1


CRASHING_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[2])
    from assistant.store import ChatStore

    chat = ChatStore(sys.argv[1])
    conv = chat.create_conversation("alice", "crash test")
    chat.append_message("alice", conv, "user", "first question")
    chat.append_message("alice", conv, "assistant", "first answer")
    chat.append_message("alice", conv, "user", "second question")
    mid = chat.append_message("alice", conv, "assistant", "", complete=False)
    chat.update_message("alice", mid, "a partial", complete=False)
    chat.update_message("alice", mid, "a partial answer", complete=False)
    print(conv, mid, flush=True)
    chat._touch = lambda *args: os._exit(3)  # die inside the next write transaction, before its commit
    chat.append_message("alice", conv, "user", "never committed")
""")


def test_killed_writer_keeps_committed_messages_and_partial_answer(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(db), str(ROOT)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    conv, mid = proc.stdout.split()
    assert (tmp_path / "chat.db-wal").exists()  # the process never closed the database
    with ChatStore(db) as chat:
        msgs = chat.get_conversation("alice", conv).messages
        assert [(m.role, m.text, m.complete) for m in msgs] == [
            ("user", "first question", True), ("assistant", "first answer", True),
            ("user", "second question", True), ("assistant", "a partial answer", False)]
        assert msgs[-1].id == int(mid)
        assert chat.search("alice", "never committed") == []
        assert chat.export_llava("alice", conv)[0]["conversations"] == [
            {"from": "human", "value": "first question"}, {"from": "gpt", "value": "first answer"}]
        chat.update_message("alice", int(mid), "a partial answer, finished", complete=True)
        assert _rows(chat, "PRAGMA integrity_check") == [("ok",)]
        assert _rows(chat, "INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')") == []


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    chat = ChatStore(tmp_path / "chat.db")
    chat.close()
    chat.close()
    with pytest.raises(StoreError, match="closed"):
        chat.create_conversation("alice")


# rle


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 5), (64, 48), (129, 257)])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_rle_round_trip(shape: tuple[int, int], density: float) -> None:
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = rng.random(shape) < density
    encoded = rle.encode(mask)
    assert encoded["size"] == list(shape) and sum(encoded["counts"]) == mask.size
    assert (encoded["counts"][0] == 0) == bool(mask.flat[0])
    assert all(c > 0 for c in encoded["counts"][1:])  # canonical: no empty runs after the first
    assert all(type(c) is int for c in encoded["counts"])
    decoded = rle.decode(json.loads(json.dumps(encoded)))
    assert decoded.dtype == bool and np.array_equal(decoded, mask)
    assert np.array_equal(rle.decode(rle.encode(mask.T)), mask.T)  # non-contiguous view, row-major runs


def test_rle_known_values() -> None:
    assert rle.encode(np.zeros((2, 3), bool)) == {"size": [2, 3], "counts": [6]}
    assert rle.encode(np.ones((2, 3), bool)) == {"size": [2, 3], "counts": [0, 6]}
    assert rle.encode(np.array([[False, True], [True, True]])) == {"size": [2, 2], "counts": [1, 3]}
    assert rle.encode(np.array([[True, False], [False, True]])) == {"size": [2, 2], "counts": [0, 1, 2, 1]}
    assert not rle.decode({"size": [2, 3], "counts": [6]}).any()
    assert rle.decode({"size": [2, 3], "counts": [0, 6]}).all()


def test_rle_is_fast_on_large_masks() -> None:
    mask = np.random.default_rng(0).random((2000, 2000)) < 0.5
    t0 = time.perf_counter()
    encoded = rle.encode(mask)
    assert time.perf_counter() - t0 < 0.5
    assert np.array_equal(rle.decode(encoded), mask)


@pytest.mark.parametrize("bad", [
    None, [2, 2], {"size": [2, 2]}, {"counts": [4]}, {"size": [2], "counts": [2]}, {"size": [0, 2], "counts": [0]},
    {"size": [-2, 2], "counts": [4]}, {"size": [2.0, 2], "counts": [4]}, {"size": [True, 4], "counts": [4]},
    {"size": "2x2", "counts": [4]}, {"size": [100_000, 100_000], "counts": [10**10]},
    {"size": [2, 2], "counts": []}, {"size": [2, 2], "counts": [3]}, {"size": [2, 2], "counts": [2, 3]},
    {"size": [2, 2], "counts": [5, -1]}, {"size": [2, 2], "counts": [2.0, 2.0]}, {"size": [2, 2], "counts": ["4"]},
    {"size": [2, 2], "counts": "4"}, {"size": [2, 2], "counts": [[2], [2]]}, {"size": [2, 2], "counts": None},
    {"size": [2, 2], "counts": [2**63 - 1, 2**63 - 1, 6]}, {"size": [2, 2], "counts": [2**64, 4]},
    {"size": [1, 1], "counts": [1, 0, 0, 0]},
])
def test_rle_rejects_corrupt_input(bad) -> None:
    with pytest.raises(ValueError):
        rle.decode(bad)


@pytest.mark.parametrize("mask", [np.zeros((2, 2), np.uint8), np.zeros(4, bool), np.zeros((2, 2, 2), bool),
                                  np.zeros((0, 3), bool), [[True]]])
def test_rle_encode_rejects_non_masks(mask) -> None:
    with pytest.raises(ValueError):
        rle.encode(mask)
