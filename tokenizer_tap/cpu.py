"""What this CPU runs fastest, for `--dtype auto`, and the machine line every benchmark figure carries.

bf16 halves the bytes a product reads, so work that streams weights (an LLM's decode, one row at a time) gains on
any x86 CPU; work that is bound by arithmetic (TAP's image encoder, a long prefill) gains only where the CPU
multiplies bf16 itself (AVX-512-BF16, AMX) and is several times slower where oneDNN emulates it (AVX2 only). Flags
alone do not settle it (a VM may hide some, and oneDNN's kernels change between torch releases), so `auto` times
both kinds of work once per CPU, flag set, torch version and thread count, and keeps the answer in a small JSON file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Literal

import torch

#: The flags that decide how fast float32/bf16/int8 products run; printed with every benchmark figure.
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile",
         "amx_bf16", "amx_int8")
#: A typical answer: the tapchat prompt (1077 positions, prefilled as a block) then this many decoded tokens.
TURN_POSITIONS, TURN_TOKENS = 1077, 64
Work = Literal["compute", "turn"]


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC ..."), or what the platform reports where /proc/cpuinfo is absent."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of `FLAGS` this CPU reports (Linux; empty elsewhere)."""
    for line in _cpuinfo():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in FLAGS if f in have]
    return []


def machine_line() -> str:
    """'<cpu>, <n> cores, flags avx2 fma ..., torch <version>': what a benchmark figure was measured on."""
    flags = " ".join(cpu_flags()) or "unknown"
    return f"{cpu_name()}, {os.cpu_count()} cores, flags {flags}, torch {torch.__version__}"


def fastest_dtype(work: Work, cache: Path | None = None) -> torch.dtype:
    """float32 or bfloat16, whichever runs `work` faster on this CPU: "compute" (an encoder pass: products of many
    rows) or "turn" (an LLM answer: a `TURN_POSITIONS` prefill plus `TURN_TOKENS` one-row steps). Timed once and
    cached in `cache` (default ~/.cache/tapchat/cpu_dtypes.json). `TAPCHAT_AUTO_DTYPE` overrides the choice."""
    if forced := os.environ.get("TAPCHAT_AUTO_DTYPE"):  # reproduce a figure, or pin tests to one precision
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"TAPCHAT_AUTO_DTYPE={forced!r}: use float32 or bfloat16")
        return getattr(torch, forced)
    path = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tapchat" / "cpu_dtypes.json"
    key = f"{machine_line()}, {torch.get_num_threads()} threads"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known.get(key), dict):
        known[key] = probe()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=1))
        except OSError:  # a read-only home: time it again next start
            pass
    return getattr(torch, known[key][work])


def probe() -> dict[str, str]:
    """Time one weight matrix (4096 -> 8192, larger than a CPU cache in either precision) multiplied by 256 rows
    (compute) and by one row (streaming), in float32 and bf16; the faster dtype per kind of work. About a second."""
    weight = torch.randn(8192, 4096)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = weight.to(dtype)
        block, row = torch.randn(256, 4096, dtype=dtype), torch.randn(1, 4096, dtype=dtype)
        times[dtype] = (median_s(lambda w=w, x=block: torch.nn.functional.linear(x, w)),
                        median_s(lambda w=w, x=row: torch.nn.functional.linear(x, w)))

    def turn(dtype: torch.dtype) -> float:
        block_s, row_s = times[dtype]
        return block_s * TURN_POSITIONS / 256 + row_s * TURN_TOKENS
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    return {"compute": names[min(times, key=lambda d: times[d][0])], "turn": names[min(times, key=turn)]}


def median_s(work, repeats: int = 3) -> float:
    """Median seconds of `work()` over `repeats` calls after one warm-up call (no autograd)."""
    with torch.inference_mode():
        work()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.exists() else []
