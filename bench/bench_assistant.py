"""Chat-engine benchmark: time to first token, decode speed, prefix reuse, batching, peak memory.

Sections (each in its own subprocess, so peak RSS belongs to it alone):
  tiny  - `Assistant.tiny("tapchat")` end to end on a synthetic picture: first-turn TTFT (image already encoded),
          decode tokens/s, follow-up TTFT with the conversation's KV cache vs with it dropped, and 32 single-turn
          questions answered in one `answer_batch` call vs one call each (same greedy answers, checked), on one
          image and spread over 8 images.
  phi2  - a real-size Phi-2 (2.7 B, random weights, --dtype) with 1024 visual tokens: first-turn TTFT (full prefill
          of ~1100 positions), decode tokens/s, follow-up TTFT with prefix reuse vs a fresh prefill.
  quant - optionally (--quant 4bit,8bit) the phi2 section with a bitsandbytes model (GPU; CPU kernels are slow).

Usage: python bench/bench_assistant.py [--sections tiny,phi2] [--threads 2] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_tokenizer import cpu_name, synthetic_image  # noqa: E402


def first_token(steps) -> float:
    """Seconds until the decode loop yields its first token."""
    start = time.perf_counter()
    next(steps)
    return time.perf_counter() - start


def conversation_turn(chat, ids, visual, settings, entry=None):
    """One conversation turn as the engine runs it (the one decode loop on the continuous batcher, KV prefix in
    `entry`; None: a fresh prefill), as (1,) tensors."""
    import threading

    from assistant.batching import Batcher
    from assistant.decoding import End, Request, run
    batcher = Batcher(chat, threading.RLock())
    for event in run(batcher, [Request(ids, visual, settings, "", "img", entry)], eos_id=chat.eos_id):
        if isinstance(event, End):
            return
        yield torch.tensor([event.token])


def batch_vs_single(bot, items, settings) -> tuple[float, float, bool]:
    """Seconds for one `answer_batch` call, for one call per item, and whether the answers agree."""
    bot.answer_batch(items, settings)  # warm-up: encodes the images (kept in the feature cache)
    t0 = time.perf_counter()
    batched = bot.answer_batch(items, settings, batch_size=len(items))
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [bot.answer_batch([item], settings)[0] for item in items]
    return t_batch, time.perf_counter() - t0, batched == single


def tiny(args: argparse.Namespace) -> dict:
    from assistant.decoding import GenerationSettings
    from assistant.engine import Assistant, BatchItem
    bot = Assistant.tiny("tapchat")
    image = synthetic_image()
    settings = GenerationSettings(max_new_tokens=32)
    ttft, follow, fresh, rate = [], [], [], []
    for _ in range(args.repeats):
        conv = bot.start(image=image)
        first = bot.ask(conv, "What is in the image? Describe it.", settings)
        ttft.append(first.first_token_s)
        rate.append(first.new_tokens / (first.total_s - first.first_token_s) if first.new_tokens > 1 else 0)
        follow.append(bot.ask(conv, "And what colour is it?", settings).first_token_s)
        conv.turns.pop()  # ask the same follow-up again, now without the cache
        bot.kv.drop(conv.id)
        fresh.append(bot.ask(conv, "And what colour is it?", settings).first_token_s)
    short = GenerationSettings(max_new_tokens=16)
    same = [BatchItem(image, f"Question {i}: what is at position {i}?") for i in range(32)]
    images = [synthetic_image(seed=k) for k in range(8)]  # 4 questions per image, as in VQA-style benchmarks
    mixed = [BatchItem(images[i % 8], f"Question {i}: what is at position {i}?") for i in range(32)]
    t_batch, t_single, same_ok = batch_vs_single(bot, same, short)
    t_mixed_batch, t_mixed_single, mixed_ok = batch_vs_single(bot, mixed, short)
    return {"first_turn_ttft_ms": 1000 * statistics.median(ttft),
            "follow_up_ttft_reuse_ms": 1000 * statistics.median(follow),
            "follow_up_ttft_no_reuse_ms": 1000 * statistics.median(fresh),
            "follow_up_ratio": statistics.median(f / g for f, g in zip(follow, fresh)),
            "decode_tokens_per_s": statistics.median(rate),
            "batch32_s": t_batch, "one_by_one32_s": t_single, "batch_speedup": t_single / t_batch,
            "batched_equals_single": same_ok and mixed_ok,
            "batch32_8images_s": t_mixed_batch, "one_by_one32_8images_s": t_mixed_single,
            "batch_speedup_8images": t_mixed_single / t_mixed_batch,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def phi2(args: argparse.Namespace, quantization: str = "none") -> dict:
    from transformers import PhiConfig, PhiForCausalLM

    from assistant.config import ChatConfig
    from assistant.decoding import CachedPrefix, GenerationSettings
    from assistant.kvcache import new_cache
    from assistant.llm import TINY_LLM, load_tokenizer, quantize_model
    from assistant.model import ChatModel
    from assistant.projector import ConvProjector, ProjectorConfig
    from assistant.template import Turn, render

    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    config = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
                       max_position_embeddings=2048)  # microsoft/phi-2's config.json
    torch.set_default_dtype(dtype)
    with torch.device(device):
        llm = PhiForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if quantization != "none":
        llm = quantize_model(llm, quantization, dtype)
    build_s = time.perf_counter() - t0
    proj_cfg = ProjectorConfig(in_dim=1024, hidden_dim=1024, out_dim=2560)
    chat_cfg = ChatConfig(mode="tapchat", tap_model="tap_vit_l", llm="microsoft/phi-2", projector=proj_cfg)
    chat = ChatModel(chat_cfg, llm.eval(), load_tokenizer(TINY_LLM),  # token ids only; Phi-2's own needs a download
                     ConvProjector(proj_cfg).to(device=device, dtype=dtype)).eval()
    features = torch.randn(1, 1024, 64, 64, device=device)
    with torch.inference_mode():
        visual = chat.visual_tokens(features)[0]
    n_new = args.phi2_tokens
    settings = GenerationSettings(max_new_tokens=n_new)
    forced = GenerationSettings(max_new_tokens=n_new)
    question = "What is in the image? Describe the main objects and where they are."
    first_ids = chat.tokenize(render([Turn(question)]))
    entry = CachedPrefix(new_cache())
    steps = conversation_turn(chat, first_ids, visual, forced, entry)
    ttft = first_token(steps)
    t0 = time.perf_counter()
    answer_ids = [int(t[0]) for t in steps]
    decode_rate = len(answer_ids) / (time.perf_counter() - t0) if answer_ids else 0.0
    answer = chat.tokenizer.decode([t for t in answer_ids if t != chat.eos_id]) or "a picture"
    follow_ids = chat.tokenize(render([Turn(question, answer), Turn("What colour is the largest one?")]))
    one = GenerationSettings(max_new_tokens=1)
    reuse = first_token(conversation_turn(chat, follow_ids, visual, one, entry))
    fresh = first_token(conversation_turn(chat, follow_ids, visual, settings))
    return {"device": device, "dtype": args.dtype, "quantization": quantization, "build_s": build_s,
            "prompt_positions": chat.prompt_length(first_ids), "first_turn_ttft_s": ttft,
            "prefill_tokens_per_s": chat.prompt_length(first_ids) / ttft, "decode_tokens_per_s": decode_rate,
            "follow_up_positions": chat.prompt_length(follow_ids), "reused_positions": entry.reused,
            "follow_up_ttft_reuse_s": reuse, "follow_up_ttft_no_reuse_s": fresh, "follow_up_ratio": reuse / fresh,
            "kv_cache_mb": entry.nbytes / 2 ** 20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None}


def worker(section: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    if section == "tiny":
        queue.put(tiny(args))
    elif section == "phi2":
        queue.put(phi2(args))
    else:
        queue.put(phi2(args, quantization=section))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="tiny,phi2", help="comma list of tiny, phi2, 4bit, 8bit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--phi2-tokens", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__}
    ctx = multiprocessing.get_context("spawn")
    for section in args.sections.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=worker, args=(section, args, queue))
        proc.start()
        results[section] = queue.get()
        proc.join()
        print(section, json.dumps(results[section], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
