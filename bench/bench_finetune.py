"""Fine-tuning benchmark: the learning proof at full length, with training throughput.

Generates the coloured-shapes data (1200 training images with 3-turn conversations, 200 held-out questions over
colour, shape, count and clicked-region colour), trains the tiny model with finetune/configs/tiny_shapes.yaml, then
the same model with every image blanked (image-blind baseline), and scores both by exact match on the held-out
questions through `Assistant.from_pretrained` (the way the app loads a checkpoint).

Usage: python bench/bench_finetune.py [--work runs/bench-finetune] [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_tokenizer import cpu_name, emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-finetune")
    ap.add_argument("--train-images", type=int, default=1200)
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from finetune.config import TrainConfig
    from finetune.evaluate import accuracy
    from finetune.synthetic import make
    from finetune.trainer import Trainer

    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "data"
    make(data, args.train_images, args.eval_images, seed=0)
    results: dict = {"machine": cpu_name(), "train_images": args.train_images,
                     "eval_questions": args.eval_images}
    for name, blank in [("seeing", False), ("blind", True)]:
        config = TrainConfig.load(ROOT / "finetune" / "configs" / "tiny_shapes.yaml",
                                  [f"data.path={data / 'train.json'}", f"data.image_folder={data}",
                                   f"output_dir={args.work / name}", f"data.blank_images={str(blank).lower()}",
                                   "report_to=[]"])
        t0 = time.perf_counter()
        run = Trainer(config).train()
        results[name] = {"steps": run.steps, "train_s": time.perf_counter() - t0, "final_loss": run.final_loss,
                         "samples_per_s": run.samples_per_s, "trained_tokens_per_s": run.tokens_per_s,
                         "accuracy": accuracy(args.work / name, data / "eval.json", blank_images=blank)}
    emit(results, args.json)


if __name__ == "__main__":
    main()
