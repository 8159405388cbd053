"""Eval-harness throughput (tiny model): 64 GQA-style questions over 8 images answered with batch size 16 vs 1,
and the harness's own cost per question outside the model (image reading, JSONL writing, bookkeeping). The images
are encoded once before timing (TAP's feature cache), so the two runs compare answering, not encoding.

Usage: python bench/bench_eval.py [--questions 64] [--batch-size 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_tokenizer import cpu_name, emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from assistant.engine import Assistant
    from eval.questions import Question
    from eval.runner import ChatAnswerer, run

    work = Path(tempfile.mkdtemp(prefix="tapchat-bench-eval-"))
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(work / f"n{i}.jpg")
    per_image = args.questions // args.images  # as in GQA, several questions per image
    questions = [Question(str(i), f"n{i // per_image}.jpg",
                          f"Is the object {i} red?\nAnswer the question using a single word or phrase.", raw_id=str(i))
                 for i in range(args.questions)]
    bot = Assistant.tiny()
    # Warm-up: one question per image, so both timed runs find every image already encoded (TAP's feature cache
    # holds 8); encoding costs the same batched or not and would otherwise land on whichever run goes first.
    run(ChatAnswerer(bot, 8), questions[::per_image], work, work / "warm.jsonl", batch_size=4, progress=False)
    results: dict = {"machine": cpu_name(), "questions": args.questions,
                     "images": args.images}
    for name, batch in [("batched", args.batch_size), ("one_by_one", 1)]:
        model_time = 0.0
        real = bot.answer_batch

        def timed(*a, _real=real, **k):
            nonlocal model_time
            t = time.perf_counter()
            out = _real(*a, **k)
            model_time += time.perf_counter() - t
            return out

        bot.answer_batch = timed
        t0 = time.perf_counter()
        run(ChatAnswerer(bot, 8), questions, work, work / f"{name}.jsonl", batch_size=batch, progress=False)
        total = time.perf_counter() - t0
        bot.answer_batch = real
        results[name] = {"batch_size": batch, "total_s": total, "questions_per_s": args.questions / total,
                         "harness_ms_per_question": 1000 * (total - model_time) / args.questions}
    same = (work / "batched.jsonl").read_text().count("\n") == args.questions
    answers = [[json.loads(x)["text"] for x in (work / f"{n}.jsonl").read_text().splitlines()]
               for n in ("batched", "one_by_one")]
    results["speedup"] = results["one_by_one"]["total_s"] / results["batched"]["total_s"]
    results["identical_answers"] = same and answers[0] == answers[1]
    shutil.rmtree(work, ignore_errors=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
