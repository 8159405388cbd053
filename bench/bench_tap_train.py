"""TAP pre-training benchmark: the learning proof at full length on the synthetic world, with throughput.

Writes the world (`python -m finetune tap-world`), then trains `tap_tiny` (at 128 px) from scratch with
finetune/configs/tap_world_stage1.yaml and tap_world_stage2.yaml, and measures on held-out scenes, each against the
untrained model: point-prompt mIoU, box-prompt mIoU, concept top-1 and caption CIDEr (the eval harness's scorer).

A miniature of the paper's Table 5 rides along: stage 1 with L_seg alone versus L_seg + L_concept, each followed by
the same caption fine-tune (text decoder only, encoder and decoder frozen: Table 2's VG setting), so the captions
show what the semantic token learned.

Usage: python bench/bench_tap_train.py [--work runs/bench-tap] [--train 800] [--steps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_tokenizer import cpu_name, emit  # noqa: E402

CONFIGS = ROOT / "finetune" / "configs"


def world_settings(world: Path) -> list[str]:
    return [f"data.sa1b={world / 'train'}", f"data.priors={world / 'priors'}", "report_to=[]"]


def caption_settings(world: Path) -> list[str]:
    return [f"data.captions={world / 'captions_train.json'}", f"data.image_folder={world / 'train'}"]


def measure(folder: Path | None, world: Path, eval_images: int, seed: int = 0) -> dict:
    """Region scores through `TapPredictor`, and CIDEr of the box-prompt captions against the world's."""
    import json

    from eval.captioning import score
    from finetune.tap.config import TapTrainConfig
    from finetune.tap.evaluate import evaluate_regions
    from finetune.tap.priors import Priors
    from finetune.tap.records import open_sa1b
    from finetune.tap.trainer import build_model
    from finetune.tap.world import load_labels
    from tokenizer_tap.checkpoint import save_pretrained
    from tokenizer_tap.predictor import TapPredictor
    if folder is None:  # the untrained model: the same config, initialised as training starts, saved as a folder
        config = TapTrainConfig.load(CONFIGS / "tap_world_stage1.yaml", world_settings(world) + [f"seed={seed}"])
        tap, tokenizer = build_model(config)
        folder = world.parent / "untrained"
        concepts = Priors(world / "priors").concepts()
        save_pretrained(tap, folder, tokenizer, (concepts[0].numpy(), concepts[1]))
    predictor = TapPredictor.from_pretrained(str(folder), device="cpu", dtype="float32")
    scores = evaluate_regions(predictor, open_sa1b(world / "eval"), load_labels(world, "eval"),
                              max_images=eval_images)
    references = {}
    for image in json.loads((world / "world.json").read_text())["splits"]["eval"]:
        for obj in image["objects"]:
            references[f"{image['image_id']}/{obj['id']}"] = [obj["caption"]]
    captions = score(scores.captions, references, meteor=False)["metrics"]
    return {**scores.to_dict(), "CIDEr": captions["CIDEr"], "BLEU-4": captions["BLEU-4"],
            "examples": dict(list(scores.captions.items())[:5])}


def train(config: str, out: Path, settings: list[str]) -> dict:
    from finetune.tap.config import TapTrainConfig
    from finetune.tap.trainer import TapTrainer
    t0 = time.perf_counter()
    result = TapTrainer(TapTrainConfig.load(CONFIGS / config, [f"output_dir={out}", *settings])).train()
    return {"steps": result.steps, "train_s": time.perf_counter() - t0, "final_loss": result.final_loss,
            "images_per_s": result.images_per_s, "prompts_per_s": result.prompts_per_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-tap")
    ap.add_argument("--train", type=int, default=800, help="training scenes")
    ap.add_argument("--eval", type=int, default=100, help="held-out scenes")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps of each stage-1 and 2 run (0: the configs')")
    ap.add_argument("--caption-steps", type=int, default=200, help="steps of the Table 5 caption fine-tunes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from finetune.tap.world import make_world

    shutil.rmtree(args.work, ignore_errors=True)
    world = args.work / "world"
    make_world(world, train=args.train, eval=args.eval, seed=0, size=128, dim=256)  # the configs' size, sem_embed_dim
    base = world_settings(world) + ([f"steps={args.steps}"] if args.steps else [])
    caps = caption_settings(world)
    tune = ["trainable.image_encoder=false", "trainable.prompt_encoder=false", "trainable.image_decoder=false",
            "loss.alpha=0", "loss.concept=0", "data.caption_ratio=1.0", "data.scale_jitter=[1.0, 1.0]",
            f"steps={args.caption_steps}"]
    runs = {  # the main proof first, then the Table 5 miniature
        "seg_concept": ("tap_world_stage1.yaml", []),
        "stage2": ("tap_world_stage2.yaml", [f"init={args.work / 'seg_concept'}", *caps]),
        "seg_only": ("tap_world_stage1.yaml", ["data.priors="]),
        "seg_only+captions": ("tap_world_stage2.yaml", [f"init={args.work / 'seg_only'}", *caps, *tune]),
        "seg_concept+captions": ("tap_world_stage2.yaml", [f"init={args.work / 'seg_concept'}", *caps, *tune]),
    }
    results: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "train_scenes": args.train,
                     "eval_scenes": args.eval, "steps_per_stage": args.steps,
                     "untrained": measure(None, world, args.eval)}
    for name, (config, extra) in runs.items():
        results[name] = {"training": train(config, args.work / name, base + extra),
                         "held_out": measure(args.work / name, world, args.eval)}
        emit(results, args.json)


if __name__ == "__main__":
    main()
