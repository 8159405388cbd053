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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.demo_bundle import gallery, pack
from finetune.demo_eval import compare, digest, evaluate_bundle, file_digests, gallery_answers, remeasure
from finetune.demo_readme import readme
from finetune.demo_runs import FINISHED, commit, finished, train_stage

CONFIGS = Path(__file__).parent / "configs"
MAX_BUNDLE_MB = 25.0
BASE_SIZE = 128  # the configs' image size (TAP's and the chat projector's)
CHAT_CHECKPOINT_EVERY = 200  # steps (~6 min on 2 cores): a stopped chat stage loses at most that much


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
    chat_turns: int = 6  # short-answer turns per training conversation (`world-chat --turns`)
    find_turns: bool = True  # training conversations carry find-grounded turns (`world-chat --find-turns`)

    @classmethod
    def smoke(cls, seed: int = 0, size: int = 256) -> Recipe:
        return cls(seed=seed, train_images=8, eval_images=3, size=size, quick=True,
                   steps={"tap_stage1": 2, "tap_stage2": 2, "tap_decoder": 2, "tap_iou": 2, "chat_stage1": 2,
                          "chat_stage2": 2})


@dataclass(frozen=True)
class Stage:
    """One training stage of the build, as data that `train_stages` runs: `trainer` (`tap`: TapTrainer, `chat`:
    Trainer) trains on `config` (a file in `CONFIGS`) with `overrides` (config keys; `{world}`, `{work}`, `{seed}`,
    `{size}` and `{merge}` are filled in for the build) into its output, the run folder `WORK/<name>`. `inputs`: the
    stages whose output it learns from, so it is retrained when one of them is (`--reuse`)."""

    name: str
    trainer: Literal["tap", "chat"]
    config: str
    inputs: tuple[str, ...]
    overrides: dict[str, str]

    def output(self, work: Path) -> Path:
        """The stage's run folder: its checkpoints, `RUNS` and `FINISHED`, and the model later stages start from."""
        return work / self.name


TAP_DATA = {"data.sa1b": "{world}/train", "data.priors": "{world}/priors", "seed": "{seed}", "report_to": "[]"}
CAPTIONS = {"data.captions": "{world}/captions_train.json", "data.image_folder": "{world}/train"}
CHAT_DATA = {"data.image_folder": "{world}", "seed": "{seed}", "model.seed": "{seed}",
             "save_every": str(CHAT_CHECKPOINT_EVERY)}
#: The training stages in the order they run, each starting from what it learns from. TAP's configs are the learning
#: proof's; the chat model reads TAP's image encoder, which the TAP stages after stage 2 leave as stage 2 trained it.
STAGES = (
    # TAP's input size is the world's; the stages after the first read it from their checkpoint
    Stage("tap_stage1", "tap", "tap_world_stage1.yaml", (),
          {**TAP_DATA, "model.overrides.image_size": "{size}", "init": "scratch"}),
    Stage("tap_stage2", "tap", "tap_world_stage2.yaml", ("tap_stage1",),
          {**TAP_DATA, **CAPTIONS, "init": "{work}/tap_stage1"}),
    Stage("tap_decoder", "tap", "tap_world_decoder.yaml", ("tap_stage2",),
          {**TAP_DATA, **CAPTIONS, "init": "{work}/tap_stage2"}),
    Stage("tap_iou", "tap", "tap_world_iou.yaml", ("tap_decoder",), {**TAP_DATA, "init": "{work}/tap_decoder"}),
    Stage("chat_stage1", "chat", "demo_chat_stage1.yaml", ("tap_stage2",),
          {"data.path": "{world}/chat_captions.json", **CHAT_DATA, "model.tap_checkpoint": "{work}/tap_stage2",
           "model.tokenizer": "{world}/tokenizer.json",
           # the projector merges size/128 patches a side: 8 x 8 tokens at any size, finer features in each
           "model.projector.merge": "{merge}"}),
    Stage("chat_stage2", "chat", "demo_chat_stage2.yaml", ("chat_stage1",),
          {"data.path": "{world}/chat_train.json", **CHAT_DATA, "model.init": "{work}/chat_stage1"}),
)
#: The recipe's options of the chat data (`make_chat_data`), which only the chat stages learn from.
CHAT_DATA_OPTIONS = ("chat_turns", "find_turns")
#: The config key that a recipe's step count for a stage sets: TAP's schedule length, a cap on the chat's epochs.
STEPS_KEY = {"tap": "steps", "chat": "max_steps"}
#: The stages whose outputs the bundle packs: TAP after its last refit, the chat model after its last stage.
PACKED = ("tap_iou", "chat_stage2")


def build(out: Path, work: Path, recipe: Recipe, reuse: bool = False, command: str = "") -> dict:
    """Run every step; returns the metrics written to `out/metrics.json`. `reuse`: keep the training stages that a
    previous build with the same recipe finished in `work` (their `FINISHED` file), and resume an unfinished one
    from its last checkpoint, to train only what is missing. Every run of every stage is recorded (`RUNS`), and the
    bundle's metrics carry them, its file digests and the held-out questions' digest (`--verify`)."""
    # heavy: `python -m finetune` imports this module for every command's parser
    from finetune.tap.world import make_world
    from finetune.world_chat import make_chat_data

    world = work / "world"
    built = {"commit": commit(), "command": command}
    start = time.perf_counter()
    if world.exists():
        shutil.rmtree(world)
    make_world(world, recipe.train_images, recipe.eval_images, seed=recipe.seed, size=recipe.size, dim=256)
    make_chat_data(world, seed=recipe.seed, turns=recipe.chat_turns, find=recipe.find_turns)
    timings = {"world": lap("world", start)}
    markers = train_stages(work, recipe, reuse)
    timings.update((name, marker["seconds"]) for name, marker in markers.items())
    start = time.perf_counter()
    tap_run, chat_run = (work / name for name in PACKED)
    pack(tap_run, chat_run, out)
    gallery(out, recipe.seed)
    files = file_digests(out)
    size_mb = sum((out / name).stat().st_size for name in files) / 2**20
    metrics = evaluate_bundle(out, world, recipe.eval_images)
    metrics["gallery"] = gallery_answers(out)
    timings["evaluate"] = lap("evaluate", start)
    metrics.update(bundle_mb=round(size_mb, 2), seconds=timings, recipe=asdict(recipe), cores=os.cpu_count(),
                   torch_threads=_threads(), built=built, stages=markers, files=files,
                   inputs={"chat_eval": digest(world / "chat_eval.json")})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "README.md").write_text(readme(metrics))
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    if size_mb > MAX_BUNDLE_MB:
        raise RuntimeError(f"the bundle is {size_mb:.1f} MB, over the {MAX_BUNDLE_MB:.0f} MB the repository allows")
    return metrics


def lap(name: str, start: float) -> float:
    """Seconds since `start` (as metrics.json keeps them), printed as a step's time."""
    seconds = round(time.perf_counter() - start, 1)
    print(f"demo-models: {name} done in {seconds:.0f} s", flush=True)
    return seconds


def train_stages(work: Path, recipe: Recipe, reuse: bool) -> dict[str, dict]:
    """Each of `STAGES` in order; returns their `FINISHED` markers by name. With `reuse`, a stage that an earlier build
    finished with this recipe is kept and an unfinished one resumes, unless one of its inputs trained again here (it
    learnt from the old one)."""
    trained: set[str] = set()
    markers: dict[str, dict] = {}
    for stage in STAGES:
        fit = trainer(stage, stage_overrides(stage, work, recipe))
        folder, wanted = stage.output(work), stage_recipe(stage.name, asdict(recipe))
        fresh_input = not trained.isdisjoint(stage.inputs)
        marker = finished(folder / FINISHED)
        if reuse and not fresh_input and marker is not None and marker["recipe"] == wanted:
            print(f"demo-models: {stage.name} reused ({folder})", flush=True)
        else:
            trained.add(stage.name)
            marker = train_stage(stage.name, folder, wanted, reuse and not fresh_input, fit)
        markers[stage.name] = marker
    return markers


def stage_overrides(stage: Stage, work: Path, recipe: Recipe) -> list[str]:
    """The stage's `key=value` config overrides in this build: its own filled in, its output folder, and the recipe's
    step count where it sets one."""
    fill: dict[str, Any] = {"world": work / "world", "work": work, "seed": recipe.seed, "size": recipe.size,
                            "merge": recipe.size // BASE_SIZE}

    def value(template: str) -> str:
        text = template.format(**fill)
        # a path in a build folder, spelt as `work / name` spells it (`--work .` gives `tap_stage1`, not `./...`)
        return str(Path(text)) if template.startswith(("{world}", "{work}")) else text

    items = [f"{key}={value(template)}" for key, template in stage.overrides.items()]
    items.append(f"output_dir={stage.output(work)}")
    if stage.name in recipe.steps:
        items.append(f"{STEPS_KEY[stage.trainer]}={recipe.steps[stage.name]}")
    return items


def trainer(stage: Stage, overrides: list[str]) -> Callable[[bool], object]:
    """The stage's `train(resume)`. Its config is read now, so a bad one stops the build before the stage trains."""
    # heavy: `python -m finetune` imports this module for every command's parser
    from finetune.config import TrainConfig
    from finetune.tap.config import TapTrainConfig
    from finetune.tap.trainer import TapTrainer
    from finetune.trainer import Trainer

    path = stage_config(stage.name)
    if stage.trainer == "tap":
        tap_config = TapTrainConfig.load(path, overrides)
        return lambda resume: TapTrainer(tap_config).train(resume=resume)
    chat_config = TrainConfig.load(path, overrides)
    return lambda resume: Trainer(chat_config).train(resume=resume)


def stage_config(stage: str) -> Path:
    """The config file a training stage runs (its digest is part of what `--reuse` compares)."""
    return CONFIGS / {s.name: s.config for s in STAGES}[stage]


def stage_recipe(stage: str, recipe: dict) -> dict:
    """What a stage's result depends on: the recipe (less the held-out size, and for TAP's stages less the chat
    data's options, which TAP never reads) and its config file as it reads now."""
    skip = {"eval_images", *(CHAT_DATA_OPTIONS if next(s for s in STAGES if s.name == stage).trainer == "tap" else ())}
    trains = {k: v for k, v in recipe.items() if k not in skip}
    return {**trains, "config": hashlib.sha256(stage_config(stage).read_bytes()).hexdigest()[:16]}


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
