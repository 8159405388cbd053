"""The image-prefix warm-up (assistant/warmup.py) on tiny random models: a question about an image set earlier
prefills only its own tokens, answers exactly as without the warm-up, and nothing stale ever replaces a better
KV entry."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import assistant.warmup as warmup
from app.config import AppConfig
from app.service import ChatService
from assistant.decoding import GenerationSettings, Token
from assistant.engine import Assistant
from assistant.remote import ServerLLM
from assistant.store import ChatStore
from assistant.template import Turn, render
from tokenizer_tap.prompts import Prompt

SHORT = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def cold() -> Assistant:
    """The same models without the warm-up: the answers to match."""
    return Assistant.tiny("tapchat", warm_image_prefix=False)


@pytest.fixture
def bot() -> Assistant:
    return Assistant.tiny("tapchat")


@pytest.fixture
def other(photo: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(photo[::-1])


def start_length(bot: Assistant) -> int:
    """Positions of the warm start: system text, `USER: ` and the image tokens."""
    return bot.chat.prompt_length(bot.warmup.prefix_ids())


def greedy_ids(bot: Assistant, conv, question: str) -> list[int]:
    """The answer's token ids through the engine's own path (`prepare`, then the decode loop)."""
    request = bot.prepare(conv, render([Turn(question)]), True, SHORT, threading.Event())
    return [e.token for e in bot.decode([request]) if isinstance(e, Token)]


def record_prefills(bot: Assistant, monkeypatch, delay: float = 0.0) -> dict[str, list[int]]:
    """Positions each forward of the chat model computes, by thread kind ("warm-up" or "asker"); `delay` slows the
    warm-up's chunks down, so what happens meanwhile can be watched."""
    seen: dict[str, list[int]] = {"warm-up": [], "asker": []}
    real = bot.chat.forward_embeds

    def forward(embeds, *args):
        warm = threading.current_thread().name.startswith("warmup-")
        seen["warm-up" if warm else "asker"].append(embeds.shape[1])
        if warm:
            time.sleep(delay)
        return real(embeds, *args)

    monkeypatch.setattr(bot.chat, "forward_embeds", forward)
    return seen


def join_warm_ups() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("warmup-"):
            thread.join()


def test_first_question_prefills_only_its_own_tokens_and_answers_as_without(bot, cold, photo, monkeypatch):
    ids = bot.warmup.prefix_ids()
    conv, plain = bot.start(image=photo), cold.start(image=photo)
    for chat in (conv, plain):
        chat.add_region(Prompt.point(200, 150))
    bot.warmup.wait(conv)  # the user was still typing
    assert len(bot.kv) == 1 and len(cold.kv) == 0
    seen = record_prefills(bot, monkeypatch)
    reply, expected = conv.ask("What is <region1> doing?", SHORT), plain.ask("What is <region1> doing?", SHORT)
    assert reply.text == expected.text and reply.new_tokens == expected.new_tokens
    assert reply.reused_tokens == start_length(bot) and expected.reused_tokens == 0
    prompt = conv.turns[0].prompt  # the template's own first turn: the grounding line comes after the image
    assert prompt.startswith("<region1>: ") and bot.chat.tokenize(render([Turn(prompt)]))[:len(ids)] == ids
    assert seen["asker"][0] == reply.prompt_tokens - start_length(bot)  # the question's own positions only
    assert seen["warm-up"] == []
    follow, again = conv.ask("And then?", SHORT), plain.ask("And then?", SHORT)
    assert follow.text == again.text and follow.reused_tokens >= reply.prompt_tokens
    # greedy ids, compared directly, on a fresh conversation of each
    conv, plain = bot.start(image=photo), cold.start(image=photo)
    assert greedy_ids(bot, conv, "Describe the picture.") == greedy_ids(cold, plain, "Describe the picture.")


def test_a_question_mid_warm_up_waits_for_it_and_a_click_is_served_between_chunks(bot, photo, monkeypatch):
    monkeypatch.setattr(warmup, "CHUNK", 64)
    chunks = -(-start_length(bot) // 64)
    seen = record_prefills(bot, monkeypatch, delay=0.1)
    conv = bot.start(image=photo)
    while not seen["warm-up"]:
        time.sleep(0.01)
    bot.add_region(conv, Prompt.point(200, 150))  # a click while the warm-up runs
    assert len(seen["warm-up"]) < chunks  # it got the model after a chunk, not after the whole start
    reply = conv.ask("What is <region1>?", SHORT)  # arrives mid-warm-up: waits rather than starting over
    assert seen["warm-up"] == [64] * (chunks - 1) + [start_length(bot) - 64 * (chunks - 1)]
    assert reply.reused_tokens == start_length(bot)
    assert seen["asker"][0] == reply.prompt_tokens - start_length(bot)


def test_a_replaced_image_or_deleted_chat_never_stores_its_warm_up(bot, cold, photo, other, monkeypatch):
    monkeypatch.setattr(warmup, "CHUNK", 64)
    seen = record_prefills(bot, monkeypatch, delay=0.05)
    conv = bot.start(image=photo)
    while not seen["warm-up"]:
        time.sleep(0.01)
    bot.set_image(conv, other)  # the first warm-up stops at its next chunk; the new image's starts
    bot.warmup.wait(conv)
    join_warm_ups()
    assert len(seen["warm-up"]) < 2 * -(-start_length(bot) // 64)
    plain = cold.start(image=other)
    reply, expected = conv.ask("What is this?", SHORT), plain.ask("What is this?", SHORT)
    assert reply.reused_tokens == start_length(bot) and reply.text == expected.text
    gone = bot.start(image=photo)
    bot.forget(gone)  # deleted while warming
    join_warm_ups()
    assert len(bot.kv) == 1  # only `conv`'s


def test_an_answered_turn_is_never_replaced_by_a_warm_start(bot, photo):
    conv = bot.start(image=photo)
    first = conv.ask("What is this?", SHORT)
    bot.set_image(conv, photo)  # the same image again: its entry already holds the start
    bot.warmup.wait(conv)
    join_warm_ups()
    assert conv.ask("Tell me more.", SHORT).reused_tokens >= first.prompt_tokens


def test_an_answer_ending_after_its_image_was_replaced_keeps_the_new_warm_start(bot, cold, photo, other,
                                                                               slow_tokens):
    slow_tokens(0.05)
    conv = bot.start(image=photo)
    stream = conv.stream("Go on and on.", GenerationSettings(max_new_tokens=30))
    pieces = iter(stream)
    next(pieces)  # answering about the first image ...
    bot.set_image(conv, other)  # ... when the next one is uploaded
    bot.warmup.wait(conv)
    stream.text()  # its prefix (the first image's) must not replace the new image's start
    reply = conv.ask("And this one?", SHORT)
    plain = cold.start(image=other)
    assert reply.reused_tokens == start_length(bot) and reply.text == cold.ask(plain, "And this one?", SHORT).text


def test_undo_while_warming_leaves_only_the_current_image_start(bot, cold, photo, other, monkeypatch):
    monkeypatch.setattr(warmup, "CHUNK", 64)
    seen = record_prefills(bot, monkeypatch, delay=0.05)
    conv = bot.start(image=photo)
    conv.ask("What is this?", SHORT)
    conv.set_image(other)
    conv.undo()  # drops the entry while the new image warms
    bot.warmup.wait(conv)
    assert seen["warm-up"]
    reply = conv.ask("What is this?", SHORT)
    plain = cold.start(image=other)
    assert reply.reused_tokens == start_length(bot) and reply.text == plain.ask("What is this?", SHORT).text


def test_a_failed_warm_up_is_logged_and_the_question_computes_as_usual(bot, cold, photo, caplog):
    def broken(key: str):
        raise RuntimeError("projector out of memory")

    bot.warmup.visual = broken
    with caplog.at_level(logging.ERROR, logger="tapchat"):
        conv = bot.start(image=photo)
        bot.warmup.wait(conv)
    assert "warming the image prefix failed" in caplog.text and "projector out of memory" in caplog.text
    reply = conv.ask("What is this?", SHORT)
    assert reply.reused_tokens == 0 and reply.text == cold.ask(cold.start(image=photo), "What is this?", SHORT).text


def test_no_warm_up_in_grounded_mode_with_an_llm_server_or_switched_off(cold, photo):
    join_warm_ups()  # other tests'
    served = Assistant(cold.predictor, cold.chat, llm_server=ServerLLM(cold.chat, "http://127.0.0.1:9", "served"))
    for bot in (Assistant.tiny("grounded"), served, cold):
        before = len(bot.kv)
        bot.start(image=photo)
        assert not [t for t in threading.enumerate() if t.name.startswith("warmup-")]
        assert len(bot.kv) == before


def test_an_upload_in_the_app_warms_the_start(tmp_path, photo):
    config = AppConfig(data_dir=tmp_path, tiny=True)
    service = ChatService(Assistant.tiny(store=ChatStore(config.db_path, config.image_dir)), config)
    cid = service.new_chat("ann")
    service.set_image("ann", cid, _png(photo))  # what an upload calls, and nothing more
    stream = service.stream("ann", cid, "What is this?", max_new_tokens=2)
    stream.text()
    assert stream.reply.reused_tokens == start_length(service.bot)
    service.bot.store.close()


def test_a_process_that_exits_mid_warm_up_exits_cleanly():
    """A daemon thread still inside torch at interpreter exit aborts the process (exit 134); the warm-up stops."""
    script = ("import numpy as np, assistant.warmup as w; from assistant.engine import Assistant; w.CHUNK = 16; "
              "Assistant.tiny().start(image=np.zeros((64, 64, 3), np.uint8)); print('bye')")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "bye" in done.stdout and "terminate called" not in done.stderr


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
