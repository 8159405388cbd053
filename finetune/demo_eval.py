"""What the demo bundle scores on held-out scenes, how its README reports it, and `demo-models --verify`: the
shipped bundle re-measured from its own files against what its `metrics.json` claims.

Headline figures mean what they say: the answers target counts only questions whose answer is not written in the
prompt (a region question carries the region's line, concept and caption, so it scores as well blind), every answers
figure stands beside the same model shown black images, and the concept figures are from label-supervised priors
(the synthetic world's simulated teacher is the true concept plus noise, not CLIP distillation)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

TARGETS = {"point_miou": 0.7, "concept_top1": 0.8, "caption_named": 0.8, "answers": 0.7}
#: Issue 28's targets with find grounding, per kind of question, and for `find` itself (find_eval.py).
FIND_TARGETS = {"count": 0.85, "position": 0.8, "colour": 0.75, "find_exact_count": 0.85, "find_recall": 0.9,
                "find_precision": 0.9}
ASKED_KINDS = ("colour", "count", "position")  # the answers target: their answers are not in the prompt
IN_PROMPT_KINDS = ("region",)  # the question carries the region line: reported on its own line, marked
#: `--verify`: re-measured held-out figures agree with metrics.json to within this (absolute): float32 kernels round
#: differently across CPUs (AVX2, AVX-512, AMX), which can move a borderline mask cell or a greedy answer.
TOLERANCE = 0.01
CONCEPTS_NOTE = "label-supervised priors: the simulated teacher is the true concept plus noise, not CLIP"
UNHASHED = ("README.md", "metrics.json")  # written from the digests, so not among them


def caption_named(caption: str, obj: dict) -> bool:
    """Whether a region caption names the object's concept and, where it has one, its colour."""
    words = set(caption.lower().replace(",", " ").replace(".", " ").split())
    return obj["concept"] in words and (obj["colour"] is None or obj["colour"] in words)


def region_kind(obj: dict) -> str:
    """What a click on the region is: a whole object made of parts is as ambiguous as SAM's examples."""
    return {"object": "object made of parts" if obj["parts"] else "one-piece object"}.get(obj["kind"], obj["kind"])


def kinds_accuracy(by_kind: dict[str, float], asked: Counter, kinds: tuple[str, ...]) -> float:
    """Exact match over the questions of `kinds`, each kind weighted by how many were asked."""
    n = sum(asked[k] for k in kinds)
    return sum(by_kind.get(k, 0.0) * asked[k] for k in kinds) / max(n, 1)


def evaluate_bundle(bundle: Path, world: Path, eval_images: int) -> dict:
    """Held-out scores: TAP's regions through `TapPredictor`, and the chat model's short answers, seeing and blind
    (`answers`: exact match over `ASKED_KINDS`; `answers_by_kind["overall"]` over all kinds)."""
    # heavy: `python -m finetune` imports this module for every command's parser
    from assistant.config import ChatConfig
    from finetune.evaluate import accuracy
    from finetune.tap.evaluate import evaluate_regions
    from finetune.tap.find_eval import evaluate_find
    from finetune.tap.records import open_sa1b
    from finetune.tap.world import load_labels, render
    from tokenizer_tap.predictor import TapPredictor

    predictor = TapPredictor.from_pretrained(str(bundle / "tap"), device="cpu", dtype="float32")
    regions = evaluate_regions(predictor, open_sa1b(world / "eval"), load_labels(world, "eval"),
                               max_images=eval_images)
    objects = {f"{e['image_id']}/{o['id']}": o
               for e in json.loads((world / "world.json").read_text())["splits"]["eval"] for o in e["objects"]}
    named = [caption_named(text, objects[key]) for key, text in regions.captions.items()]
    by_kind: dict[str, list[float]] = {}
    for key, value in regions.point_ious.items():
        by_kind.setdefault(region_kind(objects[key]), []).append(value)
    seeing = accuracy(bundle / "chat", world / "chat_eval.json")
    blind = accuracy(bundle / "chat", world / "chat_eval.json", blank_images=True)
    asked = Counter(q["kind"] for q in json.loads((world / "chat_eval.json").read_text()))
    out = {**regions.to_dict(), "point_miou_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
           "caption_named": sum(named) / max(len(named), 1),
           "caption_examples": dict(list(regions.captions.items())[:8]),
           "answers": kinds_accuracy(seeing, asked, ASKED_KINDS),
           "answers_blind": kinds_accuracy(blind, asked, ASKED_KINDS),
           "answers_by_kind": seeing, "answers_blind_by_kind": blind, "questions_by_kind": dict(sorted(asked.items()))}
    if ChatConfig.load(bundle / "chat").finds:  # a model trained on find-grounded turns: with and without them
        out["answers_find_by_kind"] = accuracy(bundle / "chat", world / "chat_eval.json", find=True)
        out["answers_find_blind_by_kind"] = accuracy(bundle / "chat", world / "chat_eval.json", blank_images=True,
                                                     find=True)
        drawn = json.loads((world / "world.json").read_text())  # the held-out scenes again, masks and all
        out.update(evaluate_find(predictor, (render(drawn["seed"], "eval", i, drawn["size"])
                                             for i in range(eval_images))))
    return out


def gallery_answers(bundle: Path) -> list[dict]:
    """Each gallery example run as the app runs it (the bundle's `Assistant`, the click, the question, greedy): the
    chip's concept and caption and the answer, beside the known ones, for the README and the browser test."""
    import numpy as np  # heavy: `python -m finetune` imports this module for every command's parser
    from PIL import Image

    from assistant.decoding import GenerationSettings
    from assistant.engine import Assistant
    from assistant.loading import LoadOptions, load
    from assistant.template import ConversationError
    from tokenizer_tap.prompts import Prompt
    bot = load(Assistant, LoadOptions(demo=True, demo_models=bundle, device="cpu")).assistant  # as `--demo` does
    rows = []
    for example in json.loads((bundle / "gallery" / "examples.json").read_text()):
        image = np.asarray(Image.open(bundle / "gallery" / example["image"]).convert("RGB"))
        conv = bot.start(image=image)
        try:
            region = conv.add_region(Prompt.from_dict(example["regions"][0]))
        except ConversationError as exc:  # no mask there: what the app would say, and nothing to ask about
            chip, caption, answer = "", "", str(exc)
        else:
            chip, caption = region.concept, region.caption
            answer = conv.ask(example["question"], GenerationSettings(max_new_tokens=16)).text
        rows.append({"image": example["image"], "concept": example["concept"], "colour": example["answer"],
                     "chip": chip, "caption": caption, "answer": answer, "named": chip == example["concept"],
                     "right": bool(chip) and example["answer"] in answer.lower()})
    return rows


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digests(bundle: Path) -> dict[str, str]:
    """sha256 of every file of the bundle but its README and metrics: what `--verify` checks the files against."""
    return {str(p.relative_to(bundle)): digest(p) for p in sorted(bundle.rglob("*"))
            if p.is_file() and str(p.relative_to(bundle)) not in UNHASHED}


def compare(recorded: object, measured: object, where: str = "") -> list[str]:
    """Where two metric trees differ: floats beyond `TOLERANCE`, anything else at all."""
    if isinstance(recorded, dict) and isinstance(measured, dict):
        keys = sorted(set(recorded) | set(measured))
        return [p for k in keys for p in compare(recorded.get(k), measured.get(k), f"{where}.{k}".lstrip("."))]
    if isinstance(recorded, list) and isinstance(measured, list) and len(recorded) == len(measured):
        return [p for i, (a, b) in enumerate(zip(recorded, measured)) for p in compare(a, b, f"{where}[{i}]")]
    if isinstance(recorded, float) and isinstance(measured, float):
        ok = abs(recorded - measured) <= TOLERANCE
        return [] if ok else [f"{where}: metrics.json says {recorded:.4f}, the bundle scores {measured:.4f}"]
    return [] if recorded == measured else [f"{where}: metrics.json says {recorded!r}, the bundle gives {measured!r}"]


def remeasure(bundle: Path, m: dict) -> dict:
    """The bundle's held-out figures and gallery answers, on the world its recipe's seed redraws."""
    # heavy: `python -m finetune` imports this module for every command's parser
    from finetune.tap.world import make_world
    from finetune.world_chat import make_chat_data

    r = m["recipe"]
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"  # the held-out split alone: its scenes and questions do not depend on training's
        make_world(world, 0, r["eval_images"], seed=r["seed"], size=r["size"], dim=256)
        make_chat_data(world, seed=r["seed"])
        measured = evaluate_bundle(bundle, world, r["eval_images"])
        measured["inputs"] = {"chat_eval": digest(world / "chat_eval.json")}
    measured["gallery"] = gallery_answers(bundle)
    return measured
