"""`python -m finetune demo-models` (`make demo-models`): the demo models that run where the public weights are
absent, rebuilt end to end by this project's own pipelines on the synthetic scene world, with their metrics.

Each step is the code of its own command: `tap-world` -> `world-chat` -> `tap-train` stage 1 (masks + concept
priors), stage 2 (+ region captions), stage 2 continued with the image encoder frozen (`tap_decoder`) and a refit
of the IoU head alone (`tap_iou`: which point mask a click routes to) -> `train` stage 1 (scene captions) and
stage 2 (conversations, region lines included) -> evaluation on held-out scenes. The result is a bundle:
- `tap/`: the TAP checkpoint folder (`TapPredictor.from_pretrained`, `--tap-checkpoint`);
- `chat/`: the chat checkpoint folder, its own LLM and tokenizer in `llm/`, naming `../tap` as its TAP;
- `gallery/`: held-out scenes with a click and a question, the app's examples when it runs these models;
- `metrics.json` and `README.md`: what was measured on held-out scenes, against the targets, and the CPU time.

The recipe (sizes, steps, learning rates) lives in the configs: TAP's is the learning proof's
(`tap_world_stage*.yaml`), the chat model's `demo_chat_stage*.yaml`; the world's size and the seed are options
here. Every step is seeded, so one machine rebuilds the same bundle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
MAX_BUNDLE_MB = 25.0
TARGETS = {"point_miou": 0.7, "concept_top1": 0.8, "caption_named": 0.8, "answers": 0.7}
ASKED_KINDS = ("colour", "count", "position", "region")  # the answers target's kinds; relations are reported beside
TAP_CONFIGS = {"tap_stage1": "tap_world_stage1.yaml", "tap_stage2": "tap_world_stage2.yaml",  # the learning proof's
               "tap_decoder": "tap_world_decoder.yaml", "tap_iou": "tap_world_iou.yaml"}
#: What each training stage learns from: a stage is retrained when one of these was (`--reuse`). The chat model
#: reads TAP's image encoder, which the TAP stages after stage 2 leave as stage 2 trained it.
NEEDS = {"tap_stage1": (), "tap_stage2": ("tap_stage1",), "tap_decoder": ("tap_stage2",), "tap_iou": ("tap_decoder",),
         "chat_stage1": ("tap_stage2",), "chat_stage2": ("chat_stage1",)}
GALLERY_SIZE = 256
BASE_SIZE = 128  # the configs' image size (TAP's and the chat projector's)
GALLERY_SCAN = 64
GALLERY_CONCEPTS = ("sun", "house", "car", "boat", "tree", "balloon", "cloud")
FINISHED = "FINISHED.json"  # written into a stage's run folder when it completes (`--reuse`)
TAP_FILES = ("config.json", "model.safetensors", "text_tokenizer.model", "concepts.safetensors")


@dataclass
class Recipe:
    """What `demo-models` builds: the world's size and seed, and the optimizer steps of the stages named in `steps`
    (TAP: the schedule's length, 3x / 8x the learning proof's, which stops while still improving; stage 2 trains
    masks, concepts and captions together, so its steps buy the most; chat: a cap on the configs' epochs).
    `quick` is the smoke-test size: the whole pipeline in about a minute, learning nothing."""

    seed: int = 0
    train_images: int = 2000
    eval_images: int = 200
    size: int = 256
    quick: bool = False
    steps: dict[str, int] = field(default_factory=lambda: {"tap_stage1": 4500, "tap_stage2": 4800})

    @classmethod
    def smoke(cls, seed: int = 0, size: int = 256) -> Recipe:
        return cls(seed=seed, train_images=8, eval_images=3, size=size, quick=True,
                   steps={"tap_stage1": 2, "tap_stage2": 2, "tap_decoder": 2, "tap_iou": 2, "chat_stage1": 2,
                          "chat_stage2": 2})


def caption_named(caption: str, obj: dict) -> bool:
    """Whether a region caption names the object's concept and, where it has one, its colour."""
    words = set(caption.lower().replace(",", " ").replace(".", " ").split())
    return obj["concept"] in words and (obj["colour"] is None or obj["colour"] in words)


def region_kind(obj: dict) -> str:
    """What a click on the region is: a whole object made of parts is as ambiguous as SAM's examples."""
    return {"object": "object made of parts" if obj["parts"] else "one-piece object"}.get(obj["kind"], obj["kind"])


def evaluate_bundle(bundle: Path, world: Path, eval_images: int) -> dict:
    """Held-out scores: TAP's regions through `TapPredictor`, and the chat model's short answers (seeing and blind;
    `answers` is exact match over the target's kinds, `answers_by_kind["overall"]` over all)."""
    from collections import Counter

    from finetune.evaluate import accuracy
    from finetune.tap.evaluate import evaluate_regions
    from finetune.tap.records import open_sa1b
    from finetune.tap.world import load_labels
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
    target_n = sum(asked[k] for k in ASKED_KINDS)
    return {**regions.to_dict(), "point_miou_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "caption_named": sum(named) / max(len(named), 1),
            "caption_examples": dict(list(regions.captions.items())[:8]),
            "answers": sum(seeing.get(k, 0.0) * asked[k] for k in ASKED_KINDS) / max(target_n, 1),
            "answers_by_kind": seeing, "answers_blind": blind}


def gallery(bundle: Path, recipe: Recipe, count: int = 4) -> list[dict]:
    """Held-out scenes (the eval split's first ones, drawn at `GALLERY_SIZE` px: the same scene, finer) with a click
    or a box (`prompt`) on an object that is the only one of its kind, and a question whose answer is known: the
    app's example gallery for the demo models (`gallery/examples.json`, the layout of examples/examples.json) and
    what tests check."""
    from collections import Counter

    from PIL import Image

    from finetune.tap.world import render
    folder = bundle / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    items: list[dict] = []
    for index in range(GALLERY_SCAN):  # any eval-split scene is unseen in training, also past --eval-images
        scene = render(recipe.seed, "eval", index, GALLERY_SIZE)
        counts = Counter(r.concept for r in scene.regions)
        shown = {item["concept"] for item in items}
        picks = [r for r in scene.regions if r.kind == "object" and r.concept in GALLERY_CONCEPTS and r.colour
                 and counts[r.concept] == 1 and r.concept not in shown and r.area >= 0.01 * GALLERY_SIZE ** 2]
        if not picks:
            continue
        r = max(picks, key=lambda p: p.area)
        name = f"scene_{scene.image_id}.jpg"
        Image.fromarray(scene.image).save(folder / name, "JPEG", quality=92)
        items.append({"image": name, "regions": [prompt(r)],
                      "question": "What colour is <region1>?", "concept": r.concept, "answer": r.colour})
        if len(items) == count:
            break
    (folder / "examples.json").write_text(json.dumps(items, indent=1))
    return items


def prompt(region) -> dict:
    """The gallery's prompt for an object: a click where the object is one piece (a sun, a cloud), a box where it is
    made of parts (a click on a house lands on its wall or a window, and a part is as right an answer as the whole,
    as for SAM; the box says which is meant)."""
    if region.parts:
        return {"box": [int(v) for v in region.box]}
    x, y = region.point()
    return {"point": [round(x), round(y)]}


def gallery_answers(bundle: Path) -> list[dict]:
    """Each gallery example run as the app runs it (the bundle's `Assistant`, the click, the question, greedy): the
    chip's concept and caption and the answer, beside the known ones, for the README and the browser test."""
    import numpy as np
    from PIL import Image

    from assistant.conversation import ConversationError
    from assistant.engine import Assistant
    from assistant.generation import GenerationSettings
    from tokenizer_tap.prompts import Prompt
    bot = Assistant.from_pretrained(bundle / "chat", device="cpu", dtype="float32")
    rows = []
    for example in json.loads((bundle / "gallery" / "examples.json").read_text()):
        image = np.asarray(Image.open(bundle / "gallery" / example["image"]).convert("RGB"))
        conv = bot.start(image=image)
        try:
            region = bot.add_region(conv, Prompt.from_dict(example["regions"][0])).grounded
        except ConversationError as exc:  # no mask there: what the app would say, and nothing to ask about
            chip, caption, answer = "", "", str(exc)
        else:
            chip, caption = region.concept, region.caption
            answer = bot.ask(conv, example["question"], GenerationSettings(max_new_tokens=16)).text
        rows.append({"image": example["image"], "concept": example["concept"], "colour": example["answer"],
                     "chip": chip, "caption": caption, "answer": answer, "named": chip == example["concept"],
                     "right": bool(chip) and example["answer"] in answer.lower()})
    return rows


def pack(tap_run: Path, chat_run: Path, bundle: Path) -> None:
    """Copy the two checkpoints into the bundle (the chat one naming `../tap`), stored in float16."""
    from assistant.model import ChatModel
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "tap").mkdir(parents=True)
    for name in TAP_FILES:
        shutil.copyfile(tap_run / name, bundle / "tap" / name)
    chat = ChatModel.from_pretrained(chat_run)
    chat.config = chat.config.with_(tap_model="../tap")
    chat.save_pretrained(bundle / "chat")
    for path in bundle.rglob("*.safetensors"):
        halve(path)


def halve(path: Path) -> None:
    """Store a safetensors file's float32 tensors as float16 (metadata kept): half the bytes in the repository.
    Loading casts them back into the float32 modules, and the bundle is evaluated as stored."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        names = f.keys()  # a safe_open handle is not iterable
        tensors = {k: f.get_tensor(k) for k in names}
    save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}, str(path), metadata)


def build(out: Path, work: Path, recipe: Recipe, reuse: bool = False) -> dict:
    """Run every step; returns the metrics written to `out/metrics.json`. `reuse`: keep the training stages that a
    previous build with the same recipe finished in `work` (their `FINISHED` file), to retrain only what follows."""
    from finetune.config import TrainConfig
    from finetune.tap.config import TapTrainConfig
    from finetune.tap.trainer import TapTrainer
    from finetune.tap.world import make_world
    from finetune.trainer import Trainer
    from finetune.world_chat import make_chat_data

    world = work / "world"
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        print(f"demo-models: {name} done in {timings[name]:.0f} s", flush=True)

    if world.exists():
        shutil.rmtree(world)
    make_world(world, recipe.train_images, recipe.eval_images, seed=recipe.seed, size=recipe.size, dim=256)
    make_chat_data(world, seed=recipe.seed)
    lap("world")

    trained: list[str] = []  # a stage whose input trained again is trained again too (it learnt from the old)
    trains = {k: v for k, v in asdict(recipe).items() if k != "eval_images"}  # what a stage's result depends on

    def recipe_of(stage: str) -> dict:
        """What the stage's result depends on: the recipe, and its config file as it reads now."""
        return {**trains, "config": hashlib.sha256(stage_config(stage).read_bytes()).hexdigest()[:16]}

    def done(stage: str) -> bool:
        """A stage finished by an earlier build, with nothing it learns from retrained: reused with its time."""
        marker = work / stage / FINISHED
        if any(n in trained for n in NEEDS[stage]) or not (reuse and finished(marker) == recipe_of(stage)):
            trained.append(stage)
            marker.unlink(missing_ok=True)  # until it finishes again
            return False
        timings[stage] = json.loads(marker.read_text())["seconds"]
        print(f"demo-models: {stage} reused ({work / stage})", flush=True)
        return True

    def finish(stage: str) -> None:
        lap(stage)
        (work / stage / FINISHED).write_text(json.dumps({"seconds": timings[stage], "recipe": recipe_of(stage)}))

    def limit(stage: str) -> list[str]:
        if stage not in recipe.steps:
            return []
        return [f"{'steps' if stage.startswith('tap') else 'max_steps'}={recipe.steps[stage]}"]

    def scratch(stage: str) -> list[str]:
        """TAP's input size is the world's; the stages after the first read it from their checkpoint."""
        return [] if NEEDS[stage] else [f"model.overrides.image_size={recipe.size}"]

    tap_data = [f"data.sa1b={world / 'train'}", f"data.priors={world / 'priors'}", f"seed={recipe.seed}",
                "report_to=[]"]
    for stage in TAP_CONFIGS:  # each starts from the one stage it learns from
        if done(stage):
            continue
        init = str(work / NEEDS[stage][0]) if NEEDS[stage] else "scratch"
        extra = ([f"data.captions={world / 'captions_train.json'}", f"data.image_folder={world / 'train'}"]
                 if stage in ("tap_stage2", "tap_decoder") else [])
        config = TapTrainConfig.load(stage_config(stage), [
            *tap_data, *extra, *scratch(stage), f"init={init}", f"output_dir={work / stage}", *limit(stage)])
        TapTrainer(config).train()
        finish(stage)
    chat_common = [f"data.image_folder={world}", f"seed={recipe.seed}", f"model.seed={recipe.seed}"]
    stages = (("chat_stage1", "chat_captions.json",
               [f"model.tap_checkpoint={work / 'tap_stage2'}", f"model.tokenizer={world / 'tokenizer.json'}",
                # the projector merges size/128 patches a side: 8 x 8 tokens at any size, finer features in each
                f"model.projector.merge={recipe.size // BASE_SIZE}"]),
              ("chat_stage2", "chat_train.json", [f"model.init={work / 'chat_stage1'}"]))
    for stage, data, extra in stages:
        if done(stage):
            continue
        config = TrainConfig.load(stage_config(stage), [
            f"data.path={world / data}", *chat_common, *extra, f"output_dir={work / stage}", *limit(stage)])
        Trainer(config).train()
        finish(stage)
    pack(work / "tap_iou", work / "chat_stage2", out)
    gallery(out, recipe)
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    metrics = evaluate_bundle(out, world, recipe.eval_images)
    metrics["gallery"] = gallery_answers(out)
    lap("evaluate")
    metrics.update(bundle_mb=round(size_mb, 2), seconds=timings, recipe=asdict(recipe), cores=os.cpu_count(),
                   torch_threads=_threads())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "README.md").write_text(readme(metrics))
    if size_mb > MAX_BUNDLE_MB:
        raise RuntimeError(f"the bundle is {size_mb:.1f} MB, over the {MAX_BUNDLE_MB:.0f} MB the repository allows")
    return metrics


def stage_config(stage: str) -> Path:
    """The config file a training stage runs (its digest is part of what `--reuse` compares)."""
    return CONFIGS / TAP_CONFIGS.get(stage, f"demo_{stage}.yaml")


def finished(marker: Path) -> dict | None:
    """The recipe a stage was finished with (`FINISHED`), or None: not finished, or by an older build."""
    try:
        return json.loads(marker.read_text()).get("recipe")
    except (OSError, ValueError):
        return None


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def cell(text: str) -> str:
    """Model output as one Markdown table cell (an untrained model writes anything, pipes and newlines included)."""
    return " ".join(text.replace("|", "\\|").split())


def readme(m: dict) -> str:
    """The bundle's README: what it is, how it was made, and every measured number beside its target."""
    r = m["recipe"]
    rows = [("point-click mIoU", m["point_miou"], TARGETS["point_miou"]),
            ("point-click mIoU, the best of TAP's point masks (oracle)", m["point_miou_oracle"], None),
            ("the true masks through the decoder's output grid (ceiling)", m["grid_ceiling"], None),
            ("box-prompt mIoU", m["box_miou"], None),
            ("concept top-1", m["concept_top1"], TARGETS["concept_top1"]),
            ("captions naming object and colour", m["caption_named"], TARGETS["caption_named"]),
            (f"short answers, exact match ({', '.join(ASKED_KINDS)})", m["answers"], TARGETS["answers"]),
            ("short answers, exact match (all kinds, relations too)", m["answers_by_kind"]["overall"], None)]
    kinds = {k: v for k, v in m["answers_by_kind"].items() if k != "overall"}
    missed = [name for name, value, target in rows if target is not None and value < target]
    lines = [
        "# Demo models: TAP + a small chat model trained on synthetic scenes",
        "",
        "Trained by this project's own pipelines (`make demo-models`, finetune/demo.py) on the synthetic scene world "
        "(`python -m finetune tap-world`): made for scenes like the examples, **not on photos**; on those, the scores "
        "below (its region names are good, its answers often wrong). For real images use TAP-L + Phi-2 (README, "
        "\"Models\").",
        "",
        f"World: {r['train_images']} training and {r['eval_images']} held-out scenes at {r['size']} px, seed "
        f"{r['seed']}{' (smoke size: the models learned nothing)' if r['quick'] else ''}. Bundle: "
        f"{m['bundle_mb']:.1f} MB.",
        "",
        "## Held-out scores",
        "",
        "| metric | measured | target |",
        "|---|---|---|",
        *[f"| {name} | {value:.3f} | {'' if target is None else f'>= {target}'} |" for name, value, target in rows],
        "",
        *([f"Below target: {', '.join(missed)}; BENCHMARKS.md (\"demo models\") says what was tried and what "
           "would reach them.", ""] if missed else []),
        "Short answers by kind (exact match; blind = the same model shown black images): "
        + ", ".join(f"{k} {v:.3f} (blind {m['answers_blind'].get(k, 0.0):.3f})" for k, v in kinds.items()) + ".",
        "Point-click mIoU by region kind: " + ", ".join(f"{k} {v:.3f}" for k, v in m["point_miou_by_kind"].items())
        + ". The ceiling is what masks right about every cell of the decoder's low-res output grid (a quarter of a "
        "patch) would score.",
        f"Concepts: {m['labelled']} labelled regions, majority-class top-1 {m['majority']:.3f}.",
        "",
        "## The gallery, as the app answers it",
        "",
        "Held-out scenes (`gallery/`, the app's first examples): a click on the object (a box where it is made of "
        "parts), then \"What colour is <region1>?\", answered greedily by these models.",
        "",
        "| scene | object (colour) | chip | TAP's caption | answer | right |",
        "|---|---|---|---|---|---|",
        *[f"| {g['image']} | {g['concept']} ({g['colour']}) | {cell(g['chip'])} | {cell(g['caption'])} | "
          f"{cell(g['answer'])} | {'yes' if g['named'] and g['right'] else 'no'} |" for g in m.get("gallery", [])],
        "",
        "## Build time",
        "",
        f"{sum(m['seconds'].values()) / 60:.1f} min wall on {m['cores']} CPU cores ({m['torch_threads']} torch "
        "threads): " + ", ".join(f"{k} {v:.0f} s" for k, v in m["seconds"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="the bundle folder (replaced)")
    parser.add_argument("--work", type=Path, default=Path("runs/demo"), help="world and training runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=Recipe.train_images)
    parser.add_argument("--eval-images", type=int, default=Recipe.eval_images)
    parser.add_argument("--size", type=int, default=Recipe.size, choices=(128, 256),
                        help="the scenes' side in px, TAP's input size (128: coarser masks, ~0.6x the time)")
    parser.add_argument("--smoke", action="store_true", help="a tiny end-to-end run (checks the pipeline, ~1 min)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep training stages an earlier build with the same seed, size, training scenes and "
                             "stage configs finished in --work (retrain only what follows; "
                             "delete a stage's folder to retrain it)")


def run(args: argparse.Namespace) -> int:
    recipe = (Recipe.smoke(args.seed, args.size) if args.smoke else
              Recipe(seed=args.seed, train_images=args.train_images, eval_images=args.eval_images, size=args.size))
    try:
        metrics = build(args.out, args.work, recipe, reuse=args.reuse)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"demo-models: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ("point_miou", "concept_top1", "caption_named", "answers",
                                             "bundle_mb")}, indent=1))
    return 0
