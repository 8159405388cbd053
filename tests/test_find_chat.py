"""Find in a conversation: every instance of a concept as numbered regions, and questions grounded in all of them
(counts, position words, "0 × ..."), on the demo models and held-out world scenes whose objects the test knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from assistant.decoding import GenerationSettings
from assistant.engine import Assistant, BatchItem
from assistant.loading import LoadOptions, load
from assistant.template import parse_line
from finetune.tap.world import CONCEPTS, render
from tokenizer_tap.errors import UnknownConceptError
from tokenizer_tap.region import Region

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
SHORT = GenerationSettings(max_new_tokens=3)


@pytest.fixture(scope="module")
def bot() -> Assistant:
    return load(Assistant, LoadOptions(demo=True, demo_models=DEMO, device="cpu")).assistant


def scene(index: int):
    """Held-out world scene `index` (seed 0): its image and its annotations."""
    s = render(0, "eval", index)
    return s.image, s.regions


def test_find_makes_every_instance_a_numbered_region_once(bot) -> None:
    image, truth = scene(91)
    cars = [r for r in truth if r.concept == "car"]
    chat = bot.start(image=image)
    found = chat.find("cars")
    assert len(found) == len(cars) == 3
    assert sorted(r.number for r in found) == [1, 2, 3] and {r.kind for r in found} == {"region"}
    assert {r.concept for r in found} == {"car"} and {r.image for r in found} == {chat.image_key}
    again = chat.find("car")
    assert [r.number for r in again] == [r.number for r in found] and chat.next_number() == 4
    chat.remove_region(found[0].number)
    assert sorted(r.number for r in chat.find("Cars")) == sorted([4] + [r.number for r in found[1:]])
    with pytest.raises(UnknownConceptError, match="closest: "):
        chat.find("unicorns")


def test_a_question_naming_a_concept_is_grounded_in_every_instance(bot) -> None:
    image, truth = scene(91)
    chat = bot.start(image=image)
    reply = chat.ask("How many cars are there?", SHORT, find=True)
    *lines, found, question = chat.turns[-1].prompt.splitlines()
    assert question == "How many cars are there?" and found == "found: 3 × car"
    assert sorted(reply.regions) == [1, 2, 3] and len(lines) == 3
    for text, region in zip(lines, sorted(chat.current_regions(), key=lambda r: r.number), strict=True):
        assert text.startswith(f"<region{region.number}>: car (") and f"grid, {region.position}, " in text
        assert parse_line(text).concept == "car"
    absent = next(c for c in ("balloon", "boat", "bird", "star") if c not in {r.concept for r in truth})
    chat.ask(f"Is there a {absent}?", SHORT, find=True)  # none found is grounding too
    assert chat.turns[-1].prompt.splitlines()[-2] == f"found: 0 × {absent}"
    chat.ask("How many cars are there?", SHORT, find=False)  # switched off per request
    assert chat.turns[-1].prompt == "How many cars are there?"
    assert chat.next_number() == 4  # the second find reused the three cars


def test_find_grounding_follows_the_model_unless_asked(bot) -> None:
    image, _ = scene(91)
    assert bot.config.mode == "tapchat" and bot.config.find_grounding is None and not bot.config.finds
    chat = bot.start(image=image)
    chat.ask("How many cars are there?", SHORT)
    assert chat.turns[-1].prompt == "How many cars are there?"
    assert bot.config.with_(find_grounding=True).finds and bot.config.with_(mode="grounded", projector=None).finds


def test_benchmark_batches_find_only_when_asked(bot, monkeypatch) -> None:
    image, _ = scene(91)
    texts, real = [], bot._single_turn

    def spy(*args):
        request = real(*args)
        texts.append(request.text)
        return request
    monkeypatch.setattr(bot, "_single_turn", spy)
    items = [BatchItem(image, "How many cars are there?")]
    bot.answer_batch(items, SHORT)
    bot.answer_batch(items, SHORT, find=True)
    assert "found:" not in texts[0] and "found: 3 × car\nHow many cars are there?" in texts[1]
    assert "<region3>: car" in texts[1] and "<region4>" not in texts[1]


def test_the_world_and_the_grounding_lines_share_one_position_word() -> None:
    image, truth = scene(91)
    for a in truth:
        assert Region([(a.concept, 1.0)], box=a.box, size=(image.shape[1], image.shape[0])).position == a.position
    assert "car" in CONCEPTS
