"""Benchmark harness: run a chat checkpoint over benchmark questions (batched, resumable, sharded) and score
answers with each benchmark's official rules (`python -m eval run|score|merge`).

First increment: GQA testdev-balanced (official scorer and breakdowns), VQAv2 test-dev submission files and
TextVQA prompts in the Bunny/LLaVA layout, VQA answer normalisation and soft accuracy.
"""
