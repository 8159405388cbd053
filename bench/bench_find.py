"""Latency of `TapPredictor.find` on cached images, full-size random weights (default tap_vit_b, 2 CPU threads).

Per dtype, in a fresh subprocess each: --images synthetic pictures (bench_tokenizer's) are encoded first, untimed,
so every query finds the image's features cached (one more image warms up). On each image:
  * first query: includes the one dense-prompt pass (the 16 x 16 grid through the decoder, concept probabilities);
  * later queries (--queries of them): read that pass, so they cost ranking, merging and the kept instances' masks
    and captions only. The target: a later query costs <= 10 % of the first.
Random weights give every grid mask much the same top concept, so each query asks for that one (read off the
warm-up image): first and later queries then find, upscale and caption the same instances, and differ by the grid
pass alone - the worst case for the ratio, since a query that finds less costs less. `--min-score 0` makes every
mask whose top concept is the queried one a candidate (instances per query are reported beside the times).
Random weights never end a caption early, so captions are capped at --typical-tokens (official captions run 5-7
tokens + EOS, as in bench_tokenizer); later queries are also timed with --max-new-tokens captions and without any.

Usage: python bench/bench_find.py [--threads 2] [--dtypes float32,bfloat16] [--images 3] [--queries 4]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; spawned workers inherit sys.path

from bench.bench_tokenizer import DEFAULT_TOKENIZER, cpu_name, model_parser, per_dtype, synthetic_image, timer  # noqa: E402


def run_one(args: argparse.Namespace, dtype: str) -> dict:
    """First and later `find` queries on --images cached images, for one dtype (runs in its own process)."""
    import torch

    from tokenizer_tap.build import build_tap
    from tokenizer_tap.predictor import TapPredictor
    from tokenizer_tap.text_tokenizer import TextTokenizer

    torch.set_num_threads(args.threads)
    timed = timer(args.device)
    predictor = TapPredictor(build_tap(args.model, random_weights=True, device=args.device, dtype=dtype),
                             TextTokenizer(args.tokenizer), cache_size=args.images + 1)
    warm_up = predictor.set_image(synthetic_image(seed=args.images))
    names = predictor.model.concept_projector.names
    query = names[int(predictor.dense(warm_up).probs.argmax(1).mode().values)]
    find = functools.partial(predictor.find, query, min_score=args.min_score, max_new_tokens=args.typical_tokens)
    find(key=warm_up)
    keys = [predictor.set_image(synthetic_image(seed=seed)) for seed in range(args.images)]
    first, later, first_found, later_found, later_long, later_no_caption = [], [], [], [], [], []
    for key in keys:
        calls = predictor.grid_calls
        t, found = timed(find, key=key)
        first.append(t)
        first_found.append(len(found))
        for _ in range(args.queries):
            t, found = timed(find, key=key)
            later.append(t)
            later_found.append(len(found))
            later_long.append(timed(find, key=key, max_new_tokens=args.max_new_tokens)[0])
            later_no_caption.append(timed(find, key=key, caption=False)[0])
        if predictor.grid_calls != calls + 1:
            raise RuntimeError("a later query decoded the grid again: the dense-pass cache is broken")
    return {"dtype": dtype, "query": query, "first_s": statistics.median(first), "first_runs_s": first,
            "later_s": statistics.median(later), "later_runs_s": later,
            "later_no_caption_s": statistics.median(later_no_caption),
            "later_long_captions_s": statistics.median(later_long),
            "later_over_first": statistics.median(later) / statistics.median(first),
            "first_instances": statistics.mean(first_found), "later_instances": statistics.mean(later_found)}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    rows = [(f"first query on a cached image, grid pass included, {args.typical_tokens}-token captions (s, median "
             f"of {args.images})",
             "first_s", "{:.2f}"),
            ("  instances found (mean)", "first_instances", "{:.1f}"),
            (f"later query on the same image, {args.typical_tokens}-token captions (s, median)", "later_s", "{:.3f}"),
            ("  instances found (mean)", "later_instances", "{:.1f}"),
            (f"later query, {args.max_new_tokens}-token captions (s, median)", "later_long_captions_s", "{:.3f}"),
            ("later query without captions (s, median)", "later_no_caption_s", "{:.3f}"),
            ("later / first (target <= 0.10)", "later_over_first", "{:.3f}")]
    lines = ["| metric | " + " | ".join(r["dtype"] for r in results) + " |", "|---|" + "---:|" * len(results)]
    lines += [f"| {name} | " + " | ".join(fmt.format(r[key]) for r in results) + " |" for name, key, fmt in rows]
    return "\n".join(lines)


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--images", type=int, default=3, help="images queried (one more warms up)")
    parser.add_argument("--queries", type=int, default=4, help="later queries per image")
    parser.add_argument("--min-score", type=float, default=0.0)
    parser.add_argument("--typical-tokens", type=int, default=8, help="caption length of the first and later queries")
    parser.add_argument("--max-new-tokens", type=int, default=38, help="the long captions' length")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    results = per_dtype(run_one, args)
    print(f"{args.model}, random weights, device {args.device}, {args.threads} threads, "
          f"{cpu_name()}\n")
    print(markdown(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
