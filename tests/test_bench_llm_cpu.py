"""bench/bench_llm_cpu.py at a tiny width: every row it writes carries the keys the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"backend", "precision", "decode_tok_s", "prefill_pos_s", "ttft_s", "rss_mb", "limit_fraction"}


def test_in_process_rows_at_every_precision_carry_the_named_keys(tmp_path):
    out = tmp_path / "llm_cpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_llm_cpu.py"), "--json", str(out),
                           "--layers", "1", "--hidden", "160", "--rows", "inprocess:bf16,inprocess:int8,inprocess:int4",
                           "--tokens", "4", "--users", "2", "--threads", "1"], capture_output=True, text=True,
                           timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert "flags" in results["machine"] and results["limits"]["copy_gb_per_s"] > 0
    rows = results["rows"]
    assert [(r["backend"], r["precision"]) for r in rows] == [("inprocess", p) for p in ("bf16", "int8", "int4")]
    for row in rows:
        assert set(row) >= KEYS, row.get("error", row)
        assert row["tokens"] == 4 and row["prompt_positions"] > 1024  # the image prompt, answers of one length
        assert row["limit_fraction"] > 0 and row["decode_tok_s"] > 0 and row["rss_mb"] > 0
    assert rows[2]["weight_mb"] < rows[1]["weight_mb"] < rows[0]["weight_mb"]  # int4 < int8 < bf16 bytes read
