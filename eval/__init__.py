"""Benchmark harness: run a chat checkpoint or TAP over benchmark questions (batched, resumable, sharded) and score
answers with each benchmark's official rules (`python -m eval run|score|merge|compare`): the paper's tables.

Benchmarks are modules registered by name in `benchmarks.py` (interface in `spec.py`).
"""
