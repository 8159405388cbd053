"""Latency benchmark of tokenizer_tap with full-size random weights (default tap_vit_b on 2 CPU threads).

Measures, per dtype, in a fresh subprocess each (so peak RSS belongs to that dtype alone):
  * image encoder: `get_features` on one padded 1024x1024 image, median of --repeats after a warm-up;
  * set_image: resize + pad + encode of the 1190x1264 test picture (one run, warm);
  * click: `predict([Prompt.point(x, y)], max_new_tokens=38)` on cached features, median over --clicks points;
    with random weights captions often end early at EOS, so the worst case is also timed: the same click
    without caption plus a caption forced to run all 38 steps (`generate` with an EOS id that never occurs),
    and a click with a typical-length caption (--typical-tokens steps);
  * throughput: --batch point prompts in one `predict` call, captions included (prompts per second);
  * segment_everything on the default 16x16 grid, keeping and captioning 24 regions (one run);
  * peak RSS (ru_maxrss) of the subprocess.

Usage: python bench/bench_tokenizer.py [--threads 2] [--dtypes float32,bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; spawned workers inherit sys.path
from tokenizer_tap.cpu import machine_line  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "reference" / "tap-parity" / "text_tokenizer.model"


def synthetic_image(width: int = 1190, height: int = 1264, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: smooth gradients, a few flat rectangles and discs, and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin((xx + yy) / 97.0)], axis=-1) * 200
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 100), rng.integers(0, height - 100)
        w, h = rng.integers(60, 400, size=2)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=3)
    for _ in range(8):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(30, 200)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, size=3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def cpu_name() -> str:
    """The machine a figure was measured on: CPU, cores, the flags that set its speed (AVX2, AVX-512-BF16, AMX),
    torch."""
    return machine_line()


def emit(results: dict, path: Path | None) -> None:
    """Print the results as JSON, and also write them to `path` when given (--json)."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.write_text(text)


def model_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every TAP bench shares: which model, where, in which precisions, on how many threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tap_vit_b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def per_dtype(run: Callable[[argparse.Namespace, str], dict], args: argparse.Namespace) -> list[dict]:
    """`run(args, dtype)` for each of `args.dtypes`, each in a fresh process: one precision's allocations and
    thread pools never colour the next one's timings."""
    ctx = multiprocessing.get_context("spawn")
    results = []
    for dtype in args.dtypes.split(","):
        with ctx.Pool(1) as pool:
            results.append(pool.apply(run, (args, dtype)))
    return results


def run_one(args: argparse.Namespace, dtype: str) -> dict:
    """All measurements for one dtype (runs in its own process)."""
    import torch

    from tokenizer_tap.build import build_tap
    from tokenizer_tap.predictor import TapPredictor
    from tokenizer_tap.text_tokenizer import TextTokenizer

    torch.set_num_threads(args.threads)
    timed = timer(args.device)
    model = build_tap(args.model, random_weights=True, device=args.device, dtype=dtype)
    tok = TextTokenizer(args.tokenizer)
    predictor = TapPredictor(model, tok)
    rgb = synthetic_image()
    encoder = time_encoder(model, rgb, timed, args.repeats)
    set_image = timed(predictor.set_image, rgb)[0]
    calls = predictor.encoder_calls
    # Clicks at random points of the picture; the first one is a warm-up.
    rng = np.random.default_rng(1)
    height, width = rgb.shape[:2]
    points = [(float(x), float(y)) for x, y in
              zip(rng.uniform(0.05, 0.95, args.clicks + 1) * width, rng.uniform(0.05, 0.95, args.clicks + 1) * height)]
    click = time_clicks(predictor, points, timed, args.max_new_tokens)
    worst = time_worst_case(predictor, tok, points, timed, args)
    encoder_calls_during_clicks = predictor.encoder_calls - calls
    batch_times = time_batch(predictor, width, height, timed, args)
    # Segment everything: the default 16x16 grid; thresholds off so random weights keep max_regions regions.
    everything_s, regions = timed(predictor.segment_everything, iou_threshold=-float("inf"), max_regions=24)
    no_caption, forced = worst["no_caption"], worst["forced"]
    return {
        "dtype": dtype,
        "everything_s": everything_s, "everything_regions": len(regions),
        "encoder_s": statistics.median(encoder), "encoder_runs_s": encoder,
        "set_image_s": set_image,
        "click_ms": 1e3 * statistics.median(click), "click_runs_ms": [1e3 * t for t in click],
        "caption_steps_mean": float(np.mean(worst["lengths"])),
        "click_no_caption_ms": 1e3 * statistics.median(no_caption),
        "forced_caption_ms": 1e3 * statistics.median(forced), "forced_caption_steps": worst["steps"],
        "click_forced_ms": 1e3 * statistics.median(a + b for a, b in zip(no_caption, forced)),
        "click_typical_ms": 1e3 * statistics.median(worst["typical"]),
        "caption_token_ms": 1e3 * statistics.median(forced) / args.max_new_tokens,
        "encoder_calls_during_clicks": encoder_calls_during_clicks,
        "batch_prompts": args.batch, "batch_s": statistics.median(batch_times),
        "batch_prompts_per_s": args.batch / statistics.median(batch_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def timer(device: str) -> Callable[..., tuple[float, Any]]:
    """`timed(fn, *args, **kwargs)` -> (seconds, result); on a GPU it waits for the queued work on either side, so
    the time is the call's own."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn: Callable[..., Any], *fn_args: Any, **fn_kwargs: Any) -> tuple[float, Any]:
        sync()
        t = time.perf_counter()
        result = fn(*fn_args, **fn_kwargs)
        sync()
        return time.perf_counter() - t, result

    return timed


def time_encoder(model: Any, rgb: np.ndarray, timed: Callable[..., tuple[float, Any]], repeats: int) -> list[float]:
    """The image encoder on the padded 1024x1024 batch the predictor would build (BGR, as the model expects)."""
    import torch

    from tokenizer_tap.transforms import preprocess

    padded, _ = preprocess(rgb, model.config.image_size)
    batch = torch.from_numpy(padded)[None]
    with torch.inference_mode():
        model.get_features(batch)  # warm-up
        return [timed(model.get_features, batch)[0] for _ in range(repeats)]


def time_clicks(predictor: Any, points: list[tuple[float, float]], timed: Callable[..., tuple[float, Any]],
                max_new_tokens: int) -> list[float]:
    """A captioned click at each point but the first (a warm-up)."""
    from tokenizer_tap.prompts import Prompt

    click = []
    for i, (x, y) in enumerate(points):
        t, _ = timed(predictor.predict, [Prompt.point(x, y)], max_new_tokens=max_new_tokens)
        if i:
            click.append(t)
    return click


def time_worst_case(predictor: Any, tok: Any, points: list[tuple[float, float]],
                    timed: Callable[..., tuple[float, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Worst case: the same clicks without caption + a caption forced through all max_new_tokens steps (and one of
    a typical length). The natural caption length is recounted with the real EOS (greedy, so the same tokens as
    the click)."""
    import torch

    from tokenizer_tap.prompts import Prompt

    no_caption, forced, typical, steps, lengths = [], [], [], 0, []
    model = predictor.model
    decoder = model.text_decoder
    for i, (x, y) in enumerate(points):
        t, regions = timed(predictor.predict, [Prompt.point(x, y)], caption=False)
        sem = torch.from_numpy(regions[0].sem_token).to(model.device, model.dtype)[None, None]
        with torch.inference_mode():
            c, buf = timed(decoder.generate, sem, tok.bos_id, -1, tok.pad_id, args.max_new_tokens)
            c_typical = timed(decoder.generate, sem, tok.bos_id, -1, tok.pad_id, args.typical_tokens)[0]
            natural = decoder.generate(sem, tok.bos_id, tok.eos_id, tok.pad_id, args.max_new_tokens)
        steps = int((buf != tok.pad_id).sum()) - 1
        if i:
            no_caption.append(t)
            forced.append(c)
            typical.append(t + c_typical)
            lengths.append(int((natural != tok.pad_id).sum()) - 1)
    return {"no_caption": no_caption, "forced": forced, "typical": typical, "steps": steps, "lengths": lengths}


def time_batch(predictor: Any, width: int, height: int, timed: Callable[..., tuple[float, Any]],
               args: argparse.Namespace) -> list[float]:
    """Throughput: a grid of --batch prompts in one predict call, after a warm-up."""
    from tokenizer_tap.prompts import Prompt

    side = int(np.ceil(np.sqrt(args.batch)))
    grid = [Prompt.point((0.5 + i % side) / side * width, (0.5 + i // side) / side * height)
            for i in range(args.batch)]
    predictor.predict(grid, max_new_tokens=args.max_new_tokens)  # warm-up
    return [timed(predictor.predict, grid, max_new_tokens=args.max_new_tokens)[0] for _ in range(args.batch_repeats)]


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    rows = [
        (f"image encoder, 1024² (s, median of {args.repeats})", "encoder_s", "{:.2f}"),
        ("set_image 1190x1264, resize+encode (s, 1 run)", "set_image_s", "{:.2f}"),
        (f"click, natural caption (ms, median of {args.clicks})", "click_ms", "{:.0f}"),
        ("  mean natural caption length (decoding steps)", "caption_steps_mean", "{:.1f}"),
        ("click without caption (ms)", "click_no_caption_ms", "{:.0f}"),
        (f"forced {args.max_new_tokens}-token caption (ms)", "forced_caption_ms", "{:.0f}"),
        ("  forced caption steps", "forced_caption_steps", "{}"),
        (f"click, decode+concept+{args.max_new_tokens}-token caption (ms)", "click_forced_ms", "{:.0f}"),
        ("  caption cost per token (ms)", "caption_token_ms", "{:.1f}"),
        (f"click, decode+concept+{args.typical_tokens}-token caption (ms)", "click_typical_ms", "{:.0f}"),
        ("encoder calls during clicks", "encoder_calls_during_clicks", "{}"),
        (f"{args.batch} prompts in one predict (prompts/s)", "batch_prompts_per_s", "{:.1f}"),
        ("segment_everything, 256 grid prompts, 24 regions captioned (s)", "everything_s", "{:.1f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ]
    lines = ["| metric | " + " | ".join(r["dtype"] for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for name, key, fmt in rows:
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[key]) for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timed encoder runs (after one warm-up)")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="prompts in the throughput call")
    parser.add_argument("--batch-repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=38)
    parser.add_argument("--typical-tokens", type=int, default=8,
                        help="caption length of a typical click (official sample captions run 5-7 tokens + EOS)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    results = per_dtype(run_one, args)
    if any(r["encoder_calls_during_clicks"] for r in results):
        sys.exit("the image encoder ran during clicks: the feature cache is broken")
    print(f"{args.model}, random weights, device {args.device}, {args.threads} threads, torch {torch.__version__}, "
          f"{cpu_name()} ({os.cpu_count()} logical CPUs)\n")
    print(markdown(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
