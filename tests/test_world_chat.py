"""Chat data about the synthetic world (`world-chat`): every answer is true of its image, names pick out one object,
region turns carry the assistant's own region line, the files train and score as they are, and the tokenizer is the
demo model's (byte-level BPE, one special token)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from assistant.llm import load_tokenizer
from assistant.template import parse_line
from eval import short_answer
from eval.spec import RunInputs
from finetune import world_chat as wc
from finetune.data import load_records
from finetune.tap import world as tw


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    tw.make_world(folder, train=12, eval=4, seed=5, size=128, dim=64)
    wc.make_chat_data(folder, seed=5)
    return folder


def entries(world: Path, split: str) -> dict[str, dict]:
    return {e["file_name"]: e for e in json.loads((world / "world.json").read_text())["splits"][split]}


def facts(entry: dict, question: str) -> str:
    """The answer worked out again from the world entry, by parsing the question (a second implementation)."""
    objects = entry["objects"]
    if question.startswith("How many "):
        noun = question.removeprefix("How many ").removesuffix(" are there?")
        return str(sum(o["kind"] == "object" and wc.plural(o["concept"]) == noun for o in objects))
    if question.startswith("What colour is the "):
        concept = question.removeprefix("What colour is the ").removesuffix("?")
        match, = [o for o in objects if o["concept"] == concept]
        return match["colour"]
    if "<region1>" in question:
        line, ask = question.split("\n")
        region = parse_line(line)
        field = {"What colour is <region1>?": "colour", "What is <region1>?": "concept",
                 "Describe <region1>.": "caption"}[ask]
        answers = {o[field] for o in objects if o["caption"] == region.caption and o["concept"] == region.concept}
        assert len(answers) == 1, (line, answers)  # twins with one caption agree on every answer
        return answers.pop()
    raise AssertionError(f"no independent check for {question!r}")


def find(entry: dict, name: str) -> dict:
    """The one object (or stuff) a question's name refers to; fails if the name is ambiguous."""
    hits = [o for o in entry["objects"] if o["kind"] != "part" and name in (o["concept"], wc.name(o, colour=True))]
    assert len(hits) == 1, (name, hits)
    return hits[0]


def test_every_answer_is_true_of_its_image(world: Path) -> None:
    by_file = entries(world, "train")
    train = json.loads((world / "chat_train.json").read_text())
    kinds = Counter()
    for record in train:
        entry = by_file[record["image"]]
        said = [c["value"].removeprefix("<image>\n") for c in record["conversations"]]
        assert record["conversations"][0]["value"].startswith("<image>\n")
        for q, a in zip(said[::2], said[1::2]):
            if q.startswith("Where is the "):
                kinds["position"] += 1
                assert find(entry, q.removeprefix("Where is the ").removesuffix("?"))["position"] == a
            elif q.startswith("Is the "):
                kinds["relation"] += 1
                body = q.removeprefix("Is the ").removesuffix("?")
                rel = next(r for r in wc.OPPOSITE if f" {r} the " in body)
                a_name, b_name = body.split(f" {rel} the ")
                holds = [rel, find(entry, b_name)["id"]] in find(entry, a_name)["relations"]
                assert a == ("yes" if holds else "no")
            else:
                kinds["other"] += 1
                assert facts(entry, q) == a, q
    assert kinds["position"] and kinds["relation"] and kinds["other"] > len(train)


def test_eval_questions_cover_every_kind_and_score_with_short_answer(world: Path) -> None:
    questions, annotations, bad = short_answer.load_run(RunInputs(questions=world / "chat_eval.json"))
    assert not bad
    by_file = entries(world, "eval")
    records = json.loads((world / "chat_eval.json").read_text())
    assert {r["kind"] for r in records} == set(wc.KINDS)
    assert all(r["image"] in by_file for r in records)  # held-out scenes only
    for r in records:
        if r["kind"] in ("count", "colour", "region"):
            assert facts(by_file[r["image"]], r["question"]) == r["answer"]
    truth = {r["id"]: r["answer"] for r in records}
    assert short_answer.score(truth, annotations)["accuracy"] == 1.0


def test_captions_list_the_objects_and_records_load_for_training(world: Path) -> None:
    by_file = entries(world, "train")
    captions = json.loads((world / "chat_captions.json").read_text())
    for record in captions:
        text = record["conversations"][1]["value"]
        objects = [o for o in by_file[record["image"]]["objects"] if o["kind"] == "object"]
        assert all(o["concept"] in text or wc.plural(o["concept"]) in text for o in objects), text
    assert len(load_records(world / "chat_captions.json")) == len(captions)
    assert len(load_records(world / "chat_train.json")) == 12


def test_tokenizer_round_trips_the_training_text(world: Path) -> None:
    tok = load_tokenizer(world / "tokenizer.json")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.bos_token_id == 0
    texts = wc.corpus(json.loads((world / "chat_train.json").read_text()))
    for text in texts[:5] + ["unseen words: zebra Ünïcode 42"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode(texts[0])) < len(texts[0]) / 2  # it learnt the world's words, not just bytes


def test_same_seed_same_files_and_cli(world: Path, tmp_path: Path) -> None:
    tw.make_world(tmp_path / "w", train=12, eval=4, seed=5, size=128, dim=64)
    assert wc.run(argparse.Namespace(world=tmp_path / "w", seed=5, turns=wc.TURNS, vocab_size=1024,
                                     find_turns=False)) == 0
    for name in ("chat_captions.json", "chat_train.json", "chat_eval.json", "tokenizer.json"):
        assert (tmp_path / "w" / name).read_bytes() == (world / name).read_bytes(), name
    assert wc.run(argparse.Namespace(world=tmp_path / "nowhere", seed=0, turns=6, vocab_size=1024,
                                     find_turns=False)) == 2


def test_find_turns_ground_every_instance_with_its_place_and_the_counts(world, tmp_path) -> None:
    """`--find-turns`: questions naming concepts carry every instance's line (numbered through the conversation,
    with the world's own position word) and "found: N × concept"; the held-out questions stay the same."""
    folder = tmp_path / "world"
    tw.make_world(folder, train=12, eval=4, seed=5, size=128, dim=64)
    wc.make_chat_data(folder, seed=5, find=True)
    assert (folder / "chat_eval.json").read_text() == (world / "chat_eval.json").read_text()
    grounded = 0
    for record in json.loads((folder / "chat_train.json").read_text()):
        entry = entries(folder, "train")[record["image"]]
        seen: dict[int, tuple[str, str]] = {}  # region number -> (concept, caption), the same in every turn
        for turn in record["conversations"][::2]:
            *lines, question = turn["value"].replace("<image>\n", "").split("\n")
            if not lines or not lines[-1].startswith("found: "):
                continue
            grounded += 1
            counts = dict(reversed(part.split(" × ")) for part in lines[-1].removeprefix("found: ").split(", "))
            for concept, n in counts.items():
                assert int(n) == sum(o["concept"] == concept for o in entry["objects"]), (question, concept)
                assert concept in question or wc.plural(concept) in question
            regions = [parse_line(text) for text in lines[:-1]]
            assert len(regions) == sum(int(n) for n in counts.values())
            for text, region in zip(lines[:-1], regions, strict=True):
                match = [o for o in entry["objects"] if o["concept"] == region.concept
                         and o["caption"] == region.caption and f", {o['position']}, " in text]
                assert match, text
                assert seen.setdefault(region.number, (region.concept, region.caption)) == (region.concept,
                                                                                            region.caption)
    assert grounded > 20
