"""Chat data about the synthetic scene world (`python -m finetune world-chat WORLD`): what the demo chat model learns.

Everything is read off `world.json`, so every answer is true of its image:
- `chat_captions.json` (chat stage 1): the image alone, answered with a scene caption that lists its objects;
- `chat_train.json` (chat stage 2): multi-turn conversations about colour, count, position, relations and regions.
  A region turn starts with the region line the assistant itself writes for a click (`template.line`), built
  from the annotation (concept, box, area, caption) as TAP would report it, so the model learns to read those lines.
  With `find`, most questions that name concepts are find-grounded as the engine grounds them: every instance of
  each named concept as a numbered line with its position word, then the counts ("found: 2 × car");
- `chat_eval.json`: the eval split's questions in the `short-answer` benchmark's layout, one per kind and image;
- `tokenizer.json`: a byte-level BPE trained on the text above and the chat template (the demo model's own).

Answers to the short-answer kinds are one word or phrase (a colour, a digit, a place such as "top left", yes / no,
a concept), scored by exact match. An object is only asked about by a name that picks it out: its concept when that
is unique in the scene, else colour + concept when that is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from assistant.llm import EOS_TEXT
from assistant.template import Turn, line, render, render_pretrain, user_prompt
from tokenizer_tap.region import Region
from tokenizer_tap.vocabulary import concepts_in

KINDS = ("colour", "count", "position", "relation", "region")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
            "in front of": "behind", "behind": "in front of"}
PLURALS = {"bush": "bushes", "person": "people", "leaves": "leaves", "grass": "grass"}
COUNT_MAX = 9  # counts are answered with one digit
FIND_SHARE = 0.8  # find-grounded share of the questions that name concepts: the rest keep the model answering
# without find grounding (switched off per request, as benchmarks do)
Obj = dict[str, Any]


def plural(concept: str) -> str:
    return PLURALS.get(concept, concept + "s")


def name(obj: Obj, colour: bool) -> str:
    """'car', 'red car', 'person in red'."""
    if not colour or not obj["colour"]:
        return obj["concept"]
    return f"person in {obj['colour']}" if obj["concept"] == "person" else f"{obj['colour']} {obj['concept']}"


def names(objects: list[Obj]) -> dict[int, str]:
    """Object id -> the shortest name that picks it out in its scene (objects and stuff; parts are left out)."""
    concepts = Counter(o["concept"] for o in objects)
    coloured = Counter((o["concept"], o["colour"]) for o in objects)
    out = {}
    for o in objects:
        if o["kind"] == "part":
            continue
        if concepts[o["concept"]] == 1:
            out[o["id"]] = o["concept"]
        elif o["colour"] and coloured[(o["concept"], o["colour"])] == 1:
            out[o["id"]] = name(o, colour=True)
    return out


def scene_caption(entry: dict) -> str:
    """'A blue sky over green grass, with a yellow sun, 2 white clouds and a red house.' (objects left to right)."""
    objects = entry["objects"]
    stuff = {o["concept"]: o for o in objects if o["kind"] == "stuff"}
    things = sorted((o for o in objects if o["kind"] == "object"), key=lambda o: o["bbox"][0])
    groups: dict[tuple[str, str | None], int] = {}
    for o in things:
        groups[(o["concept"], o["colour"])] = groups.get((o["concept"], o["colour"]), 0) + 1
    phrases = []
    for (concept, colour), n in groups.items():
        noun = name({"concept": concept, "colour": colour}, colour=True)
        if n == 1:
            phrases.append(("an " if noun[0] in "aeiou" else "a ") + noun)
        else:
            words = noun.split()
            phrases.append(f"{n} " + (f"people in {colour}" if concept == "person" and colour
                                      else " ".join(words[:-1] + [plural(words[-1])])))
    sky = stuff.get("sky")
    text = f"A {sky['colour']} sky" if sky else "A scene"
    if "grass" in stuff:
        text += f" over {stuff['grass']['colour']} grass"
    if phrases:
        text += ", with " + (", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0])
    return text + "."


def annotation_region(obj: Obj, entry: dict, rng: np.random.Generator, number: int = 1) -> Region:
    """`obj` as TAP would report it, numbered `number` (score drawn, as TAP's varies)."""
    x, y, w, h = obj["bbox"]
    size = entry["width"] * entry["height"]
    return Region([(obj["concept"], float(rng.uniform(0.5, 1.0)))], obj["caption"], box=(x, y, x + w, y + h),
                  area=obj["area"] / size, size=(entry["width"], entry["height"]), number=number)


def region_line(obj: Obj, entry: dict, rng: np.random.Generator) -> str:
    """The line the assistant writes for a click on `obj`."""
    return line(annotation_region(obj, entry, rng))


def find_grounded(question: str, entry: dict, names: Sequence[str], numbers: dict[int, int],
                  rng: np.random.Generator) -> str:
    """`question` as a find-grounded turn: every instance of each concept of `names` it names, numbered as the
    conversation numbers regions (`numbers`: annotation id -> number, shared by its turns), then the counts."""
    regions, found = [], {}
    for concept in concepts_in(question, names):
        instances = [o for o in entry["objects"] if o["concept"] == concept]
        found[concept] = len(instances)
        for i in rng.permutation(len(instances)):  # TAP's score order, not the scene's
            o = instances[i]
            number = numbers.setdefault(o["id"], max(numbers.values(), default=0) + 1)
            regions.append(annotation_region(o, entry, rng, number))
    return user_prompt(question, regions, found) if found else question


def questions(entry: dict, rng: np.random.Generator, absent: Sequence[str] = ()) -> dict[str, list[tuple[str, str]]]:
    """Every question of each kind that has one right answer in this scene, as (question, answer); `absent`: object
    concepts of the world that may be counted as 0 when the scene has none."""
    objects = entry["objects"]
    named = names(objects)
    things = [o for o in objects if o["kind"] == "object"]
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    concepts = Counter(o["concept"] for o in objects)
    for o in objects:
        if o["kind"] != "part" and o["colour"] and concepts[o["concept"]] == 1:
            out["colour"].append((f"What colour is the {o['concept']}?", o["colour"]))
    counts = Counter(o["concept"] for o in things)
    for concept, n in counts.items():
        if n <= COUNT_MAX:
            out["count"].append((f"How many {plural(concept)} are there?", str(n)))
    missing = [c for c in absent if c not in counts]
    if missing:  # one zero per scene: "none" must be learnt, but not drown the counts
        out["count"].append((f"How many {plural(missing[int(rng.integers(len(missing)))])} are there?", "0"))
    for o in things:
        if o["id"] in named:
            out["position"].append((f"Where is the {named[o['id']]}?", o["position"]))
    for o in things:
        if o["id"] not in named:
            continue
        held: dict[int, set[str]] = {}
        for rel, other in o["relations"]:
            held.setdefault(other, set()).add(rel)
        for other, rels in held.items():
            if other not in named:
                continue
            rel = sorted(rels)[int(rng.integers(len(rels)))]
            out["relation"].append((f"Is the {named[o['id']]} {rel} the {named[other]}?", "yes"))
            if OPPOSITE[rel] not in rels:
                out["relation"].append((f"Is the {named[o['id']]} {OPPOSITE[rel]} the {named[other]}?", "no"))
    for o in objects:
        line = region_line(o, entry, rng)
        if o["colour"]:
            out["region"].append((f"{line}\nWhat colour is <region1>?", o["colour"]))
        out["region"].append((f"{line}\nWhat is <region1>?", o["concept"]))
    return out


def conversation(entry: dict, qs: dict[str, list[tuple[str, str]]], rng: np.random.Generator,
                 turns: int, find_names: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Up to `turns` (question, answer) pairs, each of a kind drawn evenly (relations, the most numerous, would
    otherwise crowd out the rest), plus one region description (a caption answer).

    With `find_names` (the world's concepts), `FIND_SHARE` of the questions naming them are find-grounded, and
    regions are numbered through the conversation as the app numbers them (a click is a new region).
    """
    pools = {k: [qs[k][i] for i in rng.permutation(len(qs[k]))] for k in KINDS if qs[k]}
    picked = []
    while pools and len(picked) < turns:
        kind = sorted(pools)[int(rng.integers(len(pools)))]
        picked.append((kind, *pools[kind].pop()))
        if not pools[kind]:
            del pools[kind]
    described = [o for o in entry["objects"] if o["caption"]]
    if described:
        o = described[int(rng.integers(len(described)))]
        picked.insert(int(rng.integers(len(picked) + 1)),
                      ("region", f"{region_line(o, entry, rng)}\nDescribe <region1>.", o["caption"]))
    if not find_names:
        return [(q, a) for _, q, a in picked]
    numbers: dict[int, int] = {}  # annotation id (a click: -its turn) -> region number
    out = []
    for k, (kind, q, a) in enumerate(picked):
        if kind == "region":
            numbers[-1 - k] = max(numbers.values(), default=0) + 1
            out.append((q.replace("<region1>", f"<region{numbers[-1 - k]}>"), a))
        else:
            out.append((find_grounded(q, entry, find_names, numbers, rng) if rng.random() < FIND_SHARE else q, a))
    return out


TURNS = 10  # short-answer turns per training conversation (the shipped demo models were trained with 10)


def make_chat_data(world: str | Path, *, seed: int = 0, turns: int = TURNS, vocab_size: int = 1024,
                   find: bool = False) -> dict[str, Path]:
    """Write the chat files and the tokenizer into the world folder; returns their paths by name. `find`: training
    conversations carry find-grounded turns (`conversation`); the held-out questions are the same either way."""
    world = Path(world)
    data = json.loads((world / "world.json").read_text())
    objects = sorted({o["concept"] for split in data["splits"].values() for e in split for o in e["objects"]
                      if o["kind"] == "object"})
    every = sorted({o["concept"] for split in data["splits"].values() for e in split for o in e["objects"]})
    captions, train, evaluation = [], [], []
    for i, entry in enumerate(data["splits"].get("train", [])):
        rng = np.random.default_rng([seed, 0, i])
        image = entry["file_name"]
        captions.append({"id": f"cap-{entry['image_id']}", "image": image,
                         "conversations": [{"from": "human", "value": "<image>"},
                                           {"from": "gpt", "value": scene_caption(entry)}]})
        pairs = conversation(entry, questions(entry, rng, objects), rng, turns, every if find else ())
        conv = []
        for k, (q, a) in enumerate(pairs):
            conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
        train.append({"id": f"chat-{entry['image_id']}", "image": image, "conversations": conv})
    for i, entry in enumerate(data["splits"].get("eval", [])):
        rng = np.random.default_rng([seed, 1, i])
        for kind, pairs in questions(entry, rng, objects).items():
            if pairs:
                q, a = pairs[int(rng.integers(len(pairs)))]
                evaluation.append({"id": f"{kind}-{entry['image_id']}", "image": entry["file_name"], "kind": kind,
                                   "question": q, "answer": a})
    paths = {name: world / f"chat_{name}.json" for name in ("captions", "train", "eval")}
    for key, records in [("captions", captions), ("train", train), ("eval", evaluation)]:
        paths[key].write_text(json.dumps(records, indent=0))
    paths["tokenizer"] = train_tokenizer(corpus(captions + train), world / "tokenizer.json", vocab_size)
    return paths


def corpus(records: list[dict]) -> list[str]:
    """The strings the model is trained on, rendered exactly as training renders them."""
    texts = []
    for r in records:
        said = [c["value"].replace("<image>\n", "").replace("<image>", "") for c in r["conversations"]]
        if len(said) == 2 and r["id"].startswith("cap-"):
            texts.append(render_pretrain(said[1]))
        else:
            texts.append(render([Turn(q, a) for q, a in zip(said[::2], said[1::2])]))
    return texts


def train_tokenizer(texts: list[str], path: Path, vocab_size: int) -> Path:
    """Byte-level BPE as Phi-2's (every string round-trips, no BOS), `<|endoftext|>` its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("world", type=Path, help="a folder written by `python -m finetune tap-world`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--turns", type=int, default=TURNS, help="short-answer turns per training conversation")
    parser.add_argument("--vocab-size", type=int, default=1024, help="entries of the BPE tokenizer")
    parser.add_argument("--find-turns", action="store_true",
                        help="ground most questions that name concepts as `find` does (every instance, counts)")


def run(args: argparse.Namespace) -> int:
    if not (args.world / "world.json").is_file():
        print(f"{args.world}: no world.json (write the world with `python -m finetune tap-world` first)",
              file=sys.stderr)
        return 2
    for key, path in make_chat_data(args.world, seed=args.seed, turns=args.turns,
                                    vocab_size=args.vocab_size, find=args.find_turns).items():
        print(f"{key}: {path}")
    return 0
