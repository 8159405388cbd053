"""`python -m finetune check|train|synthetic|evaluate` (the chat stages) and `tap-train|tap-priors|tap-world`
(TAP region-level pre-training) `world-chat` (chat data about the synthetic world)
and `demo-models` (all of them, end to end: the bundled demo models)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import TrainConfig


def check(config: TrainConfig) -> int:
    """Validate every record and print counts and token lengths; exit status 1 when nothing is usable."""
    # each subcommand loads only what it runs: `train` starts once per rank, and must not pay for the others
    from assistant.config import ChatConfig
    from assistant.llm import load_tokenizer
    from assistant.model import tokenize_with_image
    from assistant.projector import ProjectorConfig
    from tokenizer_tap.config import get_config

    from .data import load_records, prepare
    m = config.model
    if m.init:
        chat_config = ChatConfig.load(m.init)
        llm, num_visual = chat_config.llm, chat_config.projector.num_tokens()
        base = Path(m.init) / "llm"
        tokenizer = load_tokenizer(str(base) if base.is_dir() else llm)
    else:
        tap = m.tap_checkpoint if m.tap_checkpoint and Path(m.tap_checkpoint).is_dir() else m.tap_model
        grid = get_config(tap).grid_size
        num_visual = ProjectorConfig(in_dim=1, out_dim=1, grid=grid, **m.projector).num_tokens()
        tokenizer = load_tokenizer(m.tokenizer or m.llm)
    samples, report = prepare(load_records(config.data.path), lambda t: tokenize_with_image(tokenizer, t),
                              tokenizer.eos_token_id, stage=config.stage, num_visual=num_visual,
                              max_length=config.data.max_length, image_folder=config.data.image_folder)
    print(f"{config.data.path} ({config.stage}, {num_visual} visual tokens per image)")
    print(report.summary(config.data.max_length))
    return 0 if samples else 1


def tap_train(args: argparse.Namespace) -> int:
    from .tap.config import TapTrainConfig
    from .tap.sa1b import InputError
    from .tap.trainer import TapTrainer
    try:
        config = TapTrainConfig.load(args.config, args.overrides)
        trainer = TapTrainer(config)
    except (ValueError, OSError) as exc:  # bad config, data or weights: a message, not a traceback
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        result = trainer.train(resume=args.resume)
    except InputError as exc:  # a shard that became unreadable during the run
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    if trainer.acc.is_main_process:
        print(f"done: {result.steps} steps over {result.images} images, final loss {result.final_loss:.4f}, "
              f"{result.images_per_s:.2f} images/s, {result.prompts_per_s:.1f} prompts/s; bad records: "
              f"{sum(result.bad.get('counts', {}).values())}; checkpoint: {result.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("check", "validate a config's data and print counts (no training)"),
                        ("train", "train; writes the assistant checkpoint folder to output_dir")]:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", type=Path, help="a YAML file (see finetune/configs/)")
        c.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-4 data.path=my.json")
        if name == "train":
            c.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    s = sub.add_parser("synthetic", help="write the coloured-shapes dataset used by the learning proof")
    s.add_argument("folder", type=Path)
    s.add_argument("--train-images", type=int, default=400)
    s.add_argument("--eval-images", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="exact-match accuracy of a checkpoint on held-out questions")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("questions", type=Path)
    e.add_argument("--blank-images", action="store_true")
    t = sub.add_parser("tap-train", help="TAP region-level pre-training (masks + concept priors, then captions)")
    t.add_argument("config", type=Path, help="a YAML file (see finetune/configs/tap_*.yaml)")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. data.sa1b=DIR init=official max_steps=100")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    from . import demo, world_chat  # subcommands' own modules: loaded here, after the light ones are parsed
    from .tap import teacher, world
    teacher.add_arguments(sub.add_parser("tap-priors", help="CLIP concept priors (SemanticSA-1B) for SA-1B masks"))
    world.add_arguments(sub.add_parser("tap-world", help="write the synthetic scene world (SA-1B layout)"))
    world_chat.add_arguments(sub.add_parser("world-chat", help="chat data and a tokenizer from a synthetic world"))
    demo.add_arguments(sub.add_parser("demo-models", help="train, evaluate and bundle the demo models end to end"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "tap-priors":
        sys.exit(teacher.run(args))
    if args.command == "tap-world":
        sys.exit(world.run(args))
    if args.command == "world-chat":
        sys.exit(world_chat.run(args))
    if args.command == "demo-models":
        sys.exit(demo.run(args))
    if args.command == "tap-train":
        sys.exit(tap_train(args))
    if args.command == "synthetic":
        from .synthetic import make
        for key, path in make(args.folder, args.train_images, args.eval_images, args.seed).items():
            print(f"{key}: {path}")
        return
    if args.command == "evaluate":
        from .evaluate import accuracy
        print(json.dumps(accuracy(args.checkpoint, args.questions, blank_images=args.blank_images), indent=2))
        return
    try:
        config = TrainConfig.load(args.config, args.overrides)
    except (ValueError, OSError) as exc:
        sys.exit(f"{args.config}: {exc}")
    if args.command == "check":
        sys.exit(check(config))
    from .trainer import Trainer
    trainer = Trainer(config)
    result = trainer.train(resume=args.resume)
    if trainer.acc.is_main_process:
        print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, {result.samples_per_s:.1f} samples/s, "
              f"{result.tokens_per_s:.0f} trained tokens/s; skipped images: {len(result.skipped_images)}; "
              f"checkpoint: {result.output_dir}")
