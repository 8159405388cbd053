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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.demo_eval import compare, digest, evaluate_bundle, file_digests, gallery_answers, remeasure
from finetune.demo_readme import readme

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "configs"
MAX_BUNDLE_MB = 25.0
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
RUNS = "RUNS.jsonl"  # a line per run of a stage: when it started, from which checkpoint step, at which commit
CHAT_CHECKPOINT_EVERY = 200  # steps (~6 min on 2 cores): a stopped chat stage loses at most that much
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


def gallery(bundle: Path, recipe: Recipe, count: int = 4) -> list[dict]:
    """Held-out scenes (the eval split's first ones, drawn at `GALLERY_SIZE` px: the same scene, finer) with a click
    or a box (`prompt`) on an object that is the only one of its kind, and a question whose answer is known: the
    app's example gallery for the demo models (`gallery/examples.json`, the layout of examples/examples.json) and
    what tests check."""
    from collections import Counter  # heavy: `python -m finetune` imports this module for every command's parser

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


def pack(tap_run: Path, chat_run: Path, bundle: Path) -> None:
    """Copy the two checkpoints into the bundle (the chat one naming `../tap`), stored in float16."""
    from assistant.model import ChatModel  # heavy: `python -m finetune` imports this module for every command's parser
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
    import torch  # heavy: `python -m finetune` imports this module for every command's parser
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        names = f.keys()  # a safe_open handle is not iterable
        tensors = {k: f.get_tensor(k) for k in names}
    save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}, str(path), metadata)


def build(out: Path, work: Path, recipe: Recipe, reuse: bool = False, command: str = "") -> dict:
    """Run every step; returns the metrics written to `out/metrics.json`. `reuse`: keep the training stages that a
    previous build with the same recipe finished in `work` (their `FINISHED` file), and resume an unfinished one
    from its last checkpoint, to train only what is missing. Every run of every stage is recorded (`RUNS`), and the
    bundle's metrics carry them, its file digests and the held-out questions' digest (`--verify`)."""
    # heavy: `python -m finetune` imports this module for every command's parser
    from finetune.config import TrainConfig
    from finetune.tap.config import TapTrainConfig
    from finetune.tap.trainer import TapTrainer
    from finetune.tap.world import make_world
    from finetune.trainer import Trainer
    from finetune.world_chat import make_chat_data

    world = work / "world"
    built = {"commit": commit(), "command": command}
    timings: dict[str, float] = {}
    markers: dict[str, dict] = {}
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

    def train(stage: str, fit) -> None:
        """Reuse the stage where an earlier build finished it with this recipe, else run `fit(resume)`."""
        folder, wanted = work / stage, stage_recipe(stage, asdict(recipe))
        fresh_input = any(n in trained for n in NEEDS[stage])
        marker = finished(folder / FINISHED)
        if reuse and not fresh_input and marker is not None and marker["recipe"] == wanted:
            print(f"demo-models: {stage} reused ({folder})", flush=True)
        else:
            trained.append(stage)
            resume = begin(folder, wanted, resume=reuse and not fresh_input)
            print(f"demo-models: {stage} {'resumed' if resume else 'started'} ({folder})", flush=True)
            fit(resume)
            marker = {"recipe": wanted, "runs": ended(folder)}
            marker["seconds"] = round(sum(r["seconds"] for r in marker["runs"]), 1)
            (folder / FINISHED).write_text(json.dumps(marker, indent=1))
            print(f"demo-models: {stage} done in {marker['runs'][-1]['seconds']:.0f} s", flush=True)
        timings[stage], markers[stage] = marker["seconds"], marker

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
        init = str(work / NEEDS[stage][0]) if NEEDS[stage] else "scratch"
        extra = ([f"data.captions={world / 'captions_train.json'}", f"data.image_folder={world / 'train'}"]
                 if stage in ("tap_stage2", "tap_decoder") else [])
        config = TapTrainConfig.load(stage_config(stage), [
            *tap_data, *extra, *scratch(stage), f"init={init}", f"output_dir={work / stage}", *limit(stage)])
        train(stage, lambda resume, c=config: TapTrainer(c).train(resume=resume))
    chat_common = [f"data.image_folder={world}", f"seed={recipe.seed}", f"model.seed={recipe.seed}",
                   f"save_every={CHAT_CHECKPOINT_EVERY}"]
    stages = (("chat_stage1", "chat_captions.json",
               [f"model.tap_checkpoint={work / 'tap_stage2'}", f"model.tokenizer={world / 'tokenizer.json'}",
                # the projector merges size/128 patches a side: 8 x 8 tokens at any size, finer features in each
                f"model.projector.merge={recipe.size // BASE_SIZE}"]),
              ("chat_stage2", "chat_train.json", [f"model.init={work / 'chat_stage1'}"]))
    for stage, data, extra in stages:
        config = TrainConfig.load(stage_config(stage), [
            f"data.path={world / data}", *chat_common, *extra, f"output_dir={work / stage}", *limit(stage)])
        train(stage, lambda resume, c=config: Trainer(c).train(resume=resume))
    clock = time.perf_counter()
    pack(work / "tap_iou", work / "chat_stage2", out)
    gallery(out, recipe)
    files = file_digests(out)
    size_mb = sum((out / name).stat().st_size for name in files) / 2**20
    metrics = evaluate_bundle(out, world, recipe.eval_images)
    metrics["gallery"] = gallery_answers(out)
    lap("evaluate")
    metrics.update(bundle_mb=round(size_mb, 2), seconds=timings, recipe=asdict(recipe), cores=os.cpu_count(),
                   torch_threads=_threads(), built=built, stages=markers, files=files,
                   inputs={"chat_eval": digest(world / "chat_eval.json")})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "README.md").write_text(readme(metrics))
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    if size_mb > MAX_BUNDLE_MB:
        raise RuntimeError(f"the bundle is {size_mb:.1f} MB, over the {MAX_BUNDLE_MB:.0f} MB the repository allows")
    return metrics


def stage_config(stage: str) -> Path:
    """The config file a training stage runs (its digest is part of what `--reuse` compares)."""
    return CONFIGS / TAP_CONFIGS.get(stage, f"demo_{stage}.yaml")


def stage_recipe(stage: str, recipe: dict) -> dict:
    """What a stage's result depends on: the recipe (less the held-out size) and its config file as it reads now."""
    trains = {k: v for k, v in recipe.items() if k != "eval_images"}
    return {**trains, "config": hashlib.sha256(stage_config(stage).read_bytes()).hexdigest()[:16]}


def finished(marker: Path) -> dict | None:
    """A stage's `FINISHED` marker (recipe, seconds, runs), or None: not finished, or by an older build."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if "runs" in data else None


def commit() -> str:
    """The checkout's commit, `+changes` where tracked code differs from it (the bundle folder aside), or
    `unknown` outside a git checkout (an installed package)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)models")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def read_runs(folder: Path) -> list[dict]:
    path = folder / RUNS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def newest_checkpoint(folder: Path) -> tuple[int, float] | None:
    """(step, when it was saved) of the stage's newest whole checkpoint (`finetune/loop.py` writes progress.json
    last)."""
    found = sorted((folder / "checkpoints").glob("step-*/progress.json"))
    if not found:
        return None
    return json.loads(found[-1].read_text())["step"], found[-1].stat().st_mtime


def begin(folder: Path, recipe: dict, resume: bool) -> bool:
    """Record a new run of the stage in `folder`; returns whether it resumes. It resumes (when allowed) from the
    newest checkpoint that an earlier run of the same recipe left; otherwise the folder is emptied first."""
    runs, newest = read_runs(folder), newest_checkpoint(folder)
    resume = resume and newest is not None and bool(runs) and runs[-1]["recipe"] == recipe
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    run = {"started": time.time(), "recipe": recipe, "commit": commit(), "from_step": newest[0] if resume else 0,
           "checkpoint_saved": newest[1] if resume else None}
    with (folder / RUNS).open("a") as f:
        f.write(json.dumps(run) + "\n")
    return resume


def ended(folder: Path) -> list[dict]:
    """The stage's runs as its marker keeps them. A stopped run counts until the checkpoint that the next run
    resumed from (its work after that was lost and done again); one that saved none before it stopped counts 0."""
    runs, rows = read_runs(folder), []
    for run, after in zip(runs, [*runs[1:], None]):
        if after is None:
            seconds, to_step = time.time() - run["started"], None
        elif after["checkpoint_saved"] > run["started"]:
            seconds, to_step = after["checkpoint_saved"] - run["started"], after["from_step"]
        else:
            seconds, to_step = 0.0, run["from_step"]
        rows.append({"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run["started"])), "commit": run["commit"],
                     "from_step": run["from_step"], "to_step": to_step, "seconds": round(seconds, 1),
                     "stopped": after is not None})
    return rows


def verify(bundle: Path) -> list[str]:
    """Everything in which the bundle is not what its metrics.json says, empty when it is: the stage configs and
    recipe it was built with against the configs now, its files against their
    digests, its README against the one its metrics write, and its held-out figures re-measured on the world that
    the recipe's seed redraws."""
    try:
        m = json.loads((bundle / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{bundle / 'metrics.json'}: cannot be read ({exc})"]
    if "stages" not in m or "files" not in m:
        return [f"{bundle}: its metrics.json records no stage provenance or file digests (packed before "
                "`--verify` existed): rebuild it with `make demo-models`"]
    now = {stage: stage_recipe(stage, m["recipe"]) for stage in m["stages"]}
    problems = [f"{stage}: built with {marker['recipe']}, the recipe and config now give {now[stage]}"
                for stage, marker in m["stages"].items() if marker["recipe"] != now[stage]]
    files = file_digests(bundle)
    problems += [f"{name}: {'missing' if name not in files else 'changed since packing'}"
                 for name, sha in m["files"].items() if files.get(name) != sha]
    problems += [f"{name}: not in the bundle when it was packed" for name in files if name not in m["files"]]
    if not (bundle / "README.md").is_file() or (bundle / "README.md").read_text() != readme(m):
        problems.append(f"{bundle / 'README.md'}: differs from the README its metrics.json writes")
    try:
        measured = remeasure(bundle, m)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:  # a bundle edited into one that does not load
        return [*problems, f"{bundle}: cannot be re-measured ({exc})"]
    if measured.pop("inputs") != m["inputs"]:
        problems.append("the held-out questions this code draws differ from those the bundle was scored on")
    return problems + compare({k: m.get(k) for k in measured}, measured)


def _threads() -> int:
    import torch  # heavy: `python -m finetune` imports this module for every command's parser
    return torch.get_num_threads()


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
                             "stage configs finished in --work, and resume an unfinished one from its last "
                             "checkpoint (train only what is missing; delete a stage's folder to retrain it)")
    parser.add_argument("--verify", type=Path, metavar="BUNDLE",
                        help="build nothing: re-measure BUNDLE (e.g. models/demo) from its own files and check it "
                             "against its metrics.json, its files' digests and the stage configs now (~1-2 min)")


def command_line(args: argparse.Namespace) -> str:
    """The build as one command, for the bundle's README."""
    parts = ["python -m finetune demo-models", f"--out {args.out}", f"--work {args.work}"]
    parts += [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("seed", "train_images", "eval_images", "size")
              if getattr(args, k) != getattr(Recipe, k, 0)]
    return " ".join(parts + [f"--{flag}" for flag in ("smoke", "reuse") if getattr(args, flag)])


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        problems = verify(args.verify)
        for problem in problems:
            print(f"demo-models --verify: {problem}", file=sys.stderr)
        print(f"{args.verify}: {'does not match its metrics.json' if problems else 'verified'}")
        return 1 if problems else 0
    recipe = (Recipe.smoke(args.seed, args.size) if args.smoke else
              Recipe(seed=args.seed, train_images=args.train_images, eval_images=args.eval_images, size=args.size))
    try:
        metrics = build(args.out, args.work, recipe, reuse=args.reuse, command=command_line(args))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"demo-models: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ("point_miou", "concept_top1", "caption_named", "answers",
                                             "answers_blind", "bundle_mb")}, indent=1))
    return 0
