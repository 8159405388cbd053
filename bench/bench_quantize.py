"""Weight-only int8 / int4 on CPU (assistant/quantize.py): time of the linear layers of Phi-2-size decoder blocks.

Per block the six linear layers Phi-2 runs (q, k, v, dense: 2560x2560; fc1 2560->10240; fc2 10240->2560) with random
weights, timed as one pass over `--blocks` blocks at 1 row (decoding one token) and 8 rows (a decode batch of 8),
for bf16, fp32, int8 and int4 at each group size; and over one block at `--prefill` rows (a first turn's prompt),
also with the kernel forced (`DEQUANT_ROWS` off) to show why large inputs dequantise. And lm_head (2560x51200) at 1
row.

Usage: python bench/bench_quantize.py [--threads 1] [--blocks 4] [--prefill 1077] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant import quantize  # noqa: E402
from bench.bench_tokenizer import cpu_name  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB = 2560, 10240, 51200  # microsoft/phi-2
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]


def linear(weight: torch.Tensor) -> nn.Linear:
    """A layer holding `weight` (out, in) and a zero bias, without nn.Linear's slow init."""
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype), requires_grad=False)
    return layer


def variants(weights: list[torch.Tensor], groups: list[int]) -> dict[str, list[nn.Module]]:
    """The same random fp32 layers (Phi-2's weight scale) as bf16, fp32, int8 and int4 at each group size."""
    layers = [linear(w) for w in weights]
    out = {"bf16": [linear(w.to(torch.bfloat16)) for w in weights], "fp32": layers,
           "int8": [quantize.WeightOnlyLinear.of(layer, "int8", 128) for layer in layers]}
    for g in groups:
        out[f"int4-g{g}"] = [quantize.WeightOnlyLinear.of(layer, "int4", g) for layer in layers]
    return out


def fastest(models: dict[str, list[nn.Module]], rows: int, repeats: int) -> dict[str, float]:
    """Milliseconds of the fastest pass over each model's layers with `rows` input rows (bf16; fp32 for fp32),
    the models taking turns pass by pass: this bench shares its machine, and what else runs only adds time."""
    inputs = {name: [torch.randn(rows, layer.in_features, dtype=torch.float32 if name == "fp32" else torch.bfloat16)
                     for layer in layers] for name, layers in models.items()}
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # the first round warms up
            for name, layers in models.items():
                start = time.perf_counter()
                for layer, x in zip(layers, inputs[name], strict=True):
                    layer(x)
                if round_:
                    best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(t * 1000, 2) for name, t in best.items()}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    weights = [torch.randn(n_out, n_in) * 0.02 for _ in range(args.blocks) for n_in, n_out in SHAPES]
    models = variants(weights, [int(g) for g in args.groups.split(",")])
    results: dict = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "blocks": args.blocks,
                     "prefill_rows": args.prefill}
    results["batch1_ms"] = fastest(models, 1, args.repeats)
    results["batch8_ms"] = fastest(models, 8, args.repeats)
    one_block = {name: layers[:len(SHAPES)] for name, layers in models.items()
                 if not name.startswith("int4") or name == f"int4-g{quantize.QuantScheme.group_size}"}
    results["prefill_one_block_ms"] = fastest(one_block, args.prefill, 2)
    saved = dict(quantize.DEQUANT_ROWS)
    quantize.DEQUANT_ROWS.update({8: 1 << 30, 4: 1 << 30})  # the kernels at every size
    results["prefill_one_block_kernel_ms"] = fastest({k: v for k, v in one_block.items() if k.startswith("int")},
                                                     args.prefill, 1)
    quantize.DEQUANT_ROWS.update(saved)
    results["lm_head_batch1_ms"] = fastest(variants([torch.randn(VOCAB, HIDDEN) * 0.02],
                                                    [quantize.QuantScheme.group_size]), 1, args.repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=1077, help="rows of the prefill pass (a first turn)")
    parser.add_argument("--groups", default="32,64,128", help="int4 group sizes (the prefill: the default one's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
