"""Greedy answers must not change when the conversation code is restructured (issue 27).

`tests/data/greedy_answers.json` was recorded before the restructuring, by running this file as a script:

    .venv/bin/python tests/test_greedy_answers.py     # re-record (only when the models themselves change)

The scenarios go through the public names the README documents: multi-turn chats with point, box and negative-point
regions, an undo, an image switch, two chats answered at once (continuous batching) and benchmark batches; on the
tiny random models (tapchat and grounded) and on the shipped demo bundle.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "greedy_answers.json"
DEMO = ROOT / "models" / "demo"
TOKENS = 12


def _picture(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 60 + seed * 40)], -1).astype(np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 60))
        img[y0:y0 + 60, x0:x0 + 80] = rng.integers(0, 256, 3)
    return img


def _chat_scenario(bot, images: list, points: list[tuple[float, float]], box: tuple) -> list[str]:
    """One conversation: regions, three turns, an undo and a re-ask, a negative click, an image switch."""
    from assistant.decoding import GenerationSettings
    from tokenizer_tap.prompts import Prompt

    settings = GenerationSettings(max_new_tokens=TOKENS)
    conv = bot.start(image=images[0])
    answers = []
    bot.add_region(conv, Prompt.point(*points[0]))
    answers.append(bot.ask(conv, "What is <region1>?", settings).text)
    bot.add_region(conv, Prompt.from_box(*box))
    answers.append(bot.ask(conv, "Compare <region1> and <region2>.", settings).text)
    answers.append(bot.ask(conv, "Describe the image.", settings).text)
    bot.undo(conv)
    answers.append(bot.ask(conv, "How many things are there?", settings).text)
    third = bot.add_region(conv, Prompt.point(*points[1]))
    bot.refine_region(conv, third.number, Prompt.point(*points[1], negatives=[points[0]]))
    answers.append(bot.ask(conv, "What colour is <region3>?", settings).text)
    bot.set_image(conv, images[1])
    bot.add_region(conv, Prompt.point(*points[0]))
    answers.append(bot.ask(conv, "And <region4>?", settings).text)
    return answers


def _together(bot, images: list, point: tuple[float, float]) -> list[str]:
    """Two chats whose answers are written at the same time (one decode batch)."""
    from assistant.decoding import GenerationSettings
    from tokenizer_tap.prompts import Prompt

    settings = GenerationSettings(max_new_tokens=TOKENS)
    convs = [bot.start(image=im) for im in images]
    for conv in convs:
        bot.add_region(conv, Prompt.point(*point))
    streams = [bot.stream(conv, "What colour is <region1>?", settings) for conv in convs]
    out: list[str] = ["", ""]

    def read(i: int) -> None:
        out[i] = streams[i].text()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _batch(bot, images: list, point: tuple[float, float]) -> list[str]:
    from assistant.decoding import GenerationSettings
    from assistant.engine import BatchItem
    from tokenizer_tap.prompts import Prompt

    items = [BatchItem(images[0], "What is in the image?"), BatchItem(images[1], "What is <region1>?",
                                                                      [Prompt.point(*point)]),
             BatchItem(images[0], "Is there a car?"), BatchItem(None, "Say hello.")]
    return bot.answer_batch(items, GenerationSettings(max_new_tokens=TOKENS), batch_size=3)


def tiny_answers() -> dict[str, list[str]]:
    from assistant.engine import Assistant

    images = [_picture(0), _picture(1)]
    out = {}
    for mode in ("tapchat", "grounded"):
        bot = Assistant.tiny(mode)
        out[f"tiny-{mode}-chat"] = _chat_scenario(bot, images, [(120, 90), (250, 180)], (20, 30, 200, 160))
        out[f"tiny-{mode}-together"] = _together(bot, images, (120, 90))
        out[f"tiny-{mode}-batch"] = _batch(bot, images, (120, 90))
    return out


def demo_digest() -> str:
    """The demo chat model's weights: recorded answers belong to these files."""
    digest = hashlib.sha256()
    for path in sorted((DEMO / "chat").rglob("*.safetensors")) + sorted((DEMO / "tap").glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def demo_answers(monkeypatch=None) -> dict[str, list[str]]:
    import os

    from assistant.engine import Assistant
    from tokenizer_tap.image_io import load_image

    if monkeypatch is not None:
        monkeypatch.setenv("TAPCHAT_DEMO_MODELS", str(DEMO))
    else:
        os.environ["TAPCHAT_DEMO_MODELS"] = str(DEMO)
    bot = Assistant.demo(device="cpu")
    images = [load_image(DEMO / "gallery" / f"scene_100000{i}.jpg") for i in (1, 2)]
    return {"demo-chat": _chat_scenario(bot, images, [(80, 150), (215, 49)], (34, 109, 125, 192)),
            "demo-together": _together(bot, images, (80, 150)),
            "demo-batch": _batch(bot, images, (80, 150))}


def test_tiny_greedy_answers_are_the_recorded_ones():
    recorded = json.loads(RECORD.read_text())["answers"]
    now = tiny_answers()
    for key, answers in now.items():
        assert answers == recorded[key], key


@pytest.mark.skipif(not (DEMO / "chat" / "config.json").is_file(), reason="no demo bundle in this checkout")
def test_demo_greedy_answers_are_the_recorded_ones(monkeypatch):
    record = json.loads(RECORD.read_text())
    assert record["demo_digest"] == demo_digest(), (
        "models/demo changed since the answers were recorded: re-record with `python tests/test_greedy_answers.py`")
    now = demo_answers(monkeypatch)
    for key, answers in now.items():
        assert answers == record["answers"][key], key


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    answers = {**tiny_answers(), **demo_answers()}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"demo_digest": demo_digest(), "answers": answers}, indent=1) + "\n")
    print(f"recorded {sum(map(len, answers.values()))} answers in {RECORD}")
