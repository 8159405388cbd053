"""The answer check: an answer's claims about the regions it cites against what TAP says of them, and the note it
leaves beside a finished answer (kept in the turn and the store, never in a prompt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from assistant.check import COLOURS, check_answer
from assistant.decoding import GenerationSettings
from assistant.engine import Assistant
from assistant.store import ChatStore
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.region import Region

VOCABULARY = ["house", "car", "dog", "grass", "person", "man", "roof", "door", "leaves", "traffic light", "orange",
              "background"]


def region(number: int, concepts: list[str], caption: str, kind: str = "region") -> Region:
    return Region([(c, 0.5) for c in concepts], caption, number=number, kind=kind)


HOUSE = region(1, ["house", "building"], "a white house with a red roof")
CAR = region(2, ["car", "truck"], "a red car parked by the road")


@pytest.mark.parametrize("answer, notes", [
    ("<region1> is a red house.", ["TAP sees a white house here (<region1>)"]),  # a disagreeing colour
    ("<region1> is a dog.", ["TAP sees a white house here (<region1>)"]),  # a disagreeing concept
    ("<region1> is a white house.", []),
    ("The HOUSES in <region1> are White.", []),  # plural and case agree
    ("<region1> is GRAY.", ["TAP sees a white house here (<region1>)"]),  # either spelling of grey
    ("There is a red dog in the image.", []),  # no region cited
    ("<region7> is a red dog.", []),  # a region TAP said nothing about
    ("<region1> is a house standing on green grass.", []),  # green describes the grass, not the region
    ("<region1> is in the background.", []),  # framing words are no concept claims
    ("<region1> is a house next to a dog.", []),  # one agreeing concept is enough
])
def test_claims_about_one_region(answer: str, notes: list[str]) -> None:
    assert check_answer(answer, [HOUSE, CAR], VOCABULARY) == notes


def test_two_regions_in_one_answer_each_get_their_own_verdict() -> None:
    assert check_answer("<region1> is a white house and <region2> is a blue car.", [HOUSE, CAR], VOCABULARY) == [
        "TAP sees a red car here (<region2>)"]
    assert check_answer("The dog <region1> stands next to a red car <region2>.", [HOUSE, CAR], VOCABULARY) == [
        "TAP sees a white house here (<region1>)"]
    assert check_answer("<region2> is a dog. <region1> is a black house.", [HOUSE, CAR], VOCABULARY) == [
        "TAP sees a red car here (<region2>)", "TAP sees a white house here (<region1>)"]


def test_a_caption_without_its_subjects_colour_gives_no_colour_verdict() -> None:
    plain = region(1, ["car"], "a car parked by the road")
    roof = region(2, ["roof"], "the roof of a red house")  # red is the house's colour, not the roof's
    assert check_answer("<region1> is a blue car. <region2> is a grey roof.", [plain, roof], VOCABULARY) == []
    assert check_answer("<region1> is a dog.", [plain], VOCABULARY) == ["TAP sees a car here (<region1>)"]


def test_scene_regions_and_phrases_from_the_vocabulary() -> None:
    leaves = region(3, ["leaves"], "green leaves on a branch", kind="scene")
    light = region(1, ["traffic light"], "a traffic light")
    assert check_answer("<scene3> is a person.", [leaves], VOCABULARY) == ["TAP sees green leaves here (<scene3>)"]
    assert check_answer("<scene3> is a leaf.", [leaves], VOCABULARY) == []  # irregular plural
    assert check_answer("<region1> shows traffic lights.", [light], VOCABULARY) == []
    assert check_answer("<region1> is an orange car.", [light], VOCABULARY) == [
        "TAP sees a traffic light here (<region1>)"]


def test_the_world_paints_with_the_basic_colours() -> None:
    from finetune.tap.world import PALETTE
    assert set(PALETTE) == set(COLOURS)


@pytest.fixture
def stored_bot(tmp_path: Path) -> Assistant:
    return Assistant.tiny("tapchat", store=ChatStore(tmp_path / "chat.db"))


def test_a_finished_answer_carries_its_note_into_the_store_and_back(stored_bot, photo: np.ndarray, monkeypatch):
    bot = stored_bot
    conv = bot.start(image=photo)
    conv.add_region(Prompt.point(200, 150))
    conv.regions[1].concepts, conv.regions[1].caption = [("house", 0.8), ("building", 0.1)], "a white house"
    said = "<region1> is a red house."
    monkeypatch.setattr(bot.chat.tokenizer, "decode", lambda ids, **kw: said)  # the tiny model's answer, fixed
    prompts: list[str] = []
    prepare = bot.prepare
    monkeypatch.setattr(bot, "prepare", lambda session, text, *a: prompts.append(text) or prepare(session, text, *a))
    settings = GenerationSettings(max_new_tokens=3)
    reply = conv.ask("What is <region1>?", settings)
    note = "TAP sees a white house here (<region1>)"
    assert reply.text == said and reply.complete and reply.note == conv.turns[0].note == note
    message = bot.store.get_conversation("local", conv.id).messages[1]
    assert (message.text, message.note) == (said, note)
    bot.forget(conv)
    again = bot.open("local", conv.id)
    assert again.turns[0].note == note and again.turns[0].answer == said
    again.ask("And the roof?", settings)
    assert "TAP sees" not in prompts[-1] and said in prompts[-1]  # the answer is history; its note is not


def test_a_stopped_answer_gets_no_note(stored_bot, photo: np.ndarray, monkeypatch):
    bot = stored_bot
    conv = bot.start(image=photo)
    conv.add_region(Prompt.point(200, 150))
    conv.regions[1].concepts, conv.regions[1].caption = [("house", 0.8)], "a white house"
    monkeypatch.setattr(bot.chat.tokenizer, "decode", lambda ids, **kw: "<region1> is a red house.")
    stream = conv.stream("What is <region1>?", GenerationSettings(max_new_tokens=3))
    stream.cancel()
    stream.text()
    assert not stream.reply.complete and stream.reply.note == conv.turns[0].note == ""
    assert bot.store.get_conversation("local", conv.id).messages[1].note is None
    assert conv.check("<region1> is a red house.") == "TAP sees a white house here (<region1>)"
