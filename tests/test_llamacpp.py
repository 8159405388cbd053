"""A tiny random Phi exported to GGUF (`assistant.gguf_export`) and run by llama.cpp with a tapchat prompt given as
embeddings (`assistant.llamacpp`): the same greedy answer and close logits as transformers, at F32 and Q8_0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytest.importorskip("gguf", reason="the gguf package is not installed")

from assistant.config import ChatConfig  # noqa: E402
from assistant.gguf_export import export_gguf, quantize_gguf, weight_bytes  # noqa: E402
from assistant.llamacpp import LlamaCppLLM  # noqa: E402
from assistant.llm import TINY_LLM, TinyPhi  # noqa: E402
from assistant.model import ChatModel  # noqa: E402
from assistant.projector import ProjectorConfig  # noqa: E402
from assistant.template import Turn, render  # noqa: E402
from tokenizer_tap.errors import CheckpointError, WeightsNotFoundError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_KEYS = {"backend", "precision", "decode_tok_s", "prefill_pos_s", "ttft_s", "rss_mb", "limit_fraction"}
ANSWER = 8
PROJECTOR = ProjectorConfig(in_dim=32, hidden_dim=32, out_dim=128, grid=8, num_blocks=1)  # 16 visual tokens


@pytest.fixture(scope="module")
def chat() -> ChatModel:
    config = ChatConfig(mode="tapchat", llm=TINY_LLM, projector=PROJECTOR)
    return ChatModel.create(config, tiny=TinyPhi(hidden_size=128, intermediate_size=256), seed=3)


@pytest.fixture(scope="module")
def folder(chat: ChatModel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phi")
    chat.llm.save_pretrained(out)
    chat.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gguf_f32(folder: Path) -> Path:
    return export_gguf(folder, folder / "model-f32.gguf", "f32")


@pytest.fixture(scope="module")
def prompt(chat: ChatModel) -> torch.Tensor:
    """The image question as `ChatModel.embed_sequence` makes it: text rows with the projected image rows inside."""
    ids = chat.tokenize(render([Turn("What is in the image?")]))
    visual = chat.visual_tokens(torch.randn(1, PROJECTOR.in_dim, PROJECTOR.grid, PROJECTOR.grid,
                                            generator=torch.Generator().manual_seed(0)))[0]
    with torch.inference_mode():
        return chat.embed_sequence(ids, visual)


@pytest.fixture(scope="module")
def reference(chat: ChatModel, prompt: torch.Tensor) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy answer and the logits before each of its tokens (the whole sequence re-run per step)."""
    ids, logits = [], []
    with torch.inference_mode():
        rows = prompt
        for _ in range(ANSWER):
            logits.append(chat.llm(inputs_embeds=rows[None]).logits[0, -1].numpy())
            ids.append(int(logits[-1].argmax()))
            rows = torch.cat([rows, chat.embedding(torch.tensor(ids[-1:]))])
    return ids, logits


def llama_answer(path: Path, prompt: torch.Tensor, ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """llama.cpp's greedy answer, and its logits when fed the reference answer (teacher forcing)."""
    with LlamaCppLLM(path, n_ctx=256, threads=1) as llm:
        greedy = list(llm.greedy(prompt, ANSWER))
        logits = [llm.prefill(prompt)] + [llm.step(t) for t in ids[:-1]]
    return greedy, logits


def test_the_f32_export_answers_as_transformers_does(gguf_f32, prompt, reference):
    ids, expected = reference
    greedy, logits = llama_answer(gguf_f32, prompt, ids)
    assert greedy == ids
    scale = max(float(np.abs(e).max()) for e in expected)
    for got, want in zip(logits, expected):
        assert np.abs(got - want).max() < 2e-3 * scale  # llama.cpp's GELU is a table lookup: not bit-exact


def test_q8_0_stays_close(gguf_f32, prompt, reference):
    ids, expected = reference
    q8 = quantize_gguf(gguf_f32, gguf_f32.parent / "model-q8_0.gguf", "q8_0")
    assert weight_bytes(q8) < 0.4 * weight_bytes(gguf_f32)  # 8.5 bits a weight against 32
    greedy, logits = llama_answer(q8, prompt, ids)
    scale = max(float(np.abs(e).max()) for e in expected)
    for got, want in zip(logits, expected):
        assert np.abs(got - want).max() < 0.05 * scale
    assert sum(a == b for a, b in zip(greedy, ids)) >= ANSWER - 2  # a near tie may flip late in random weights


def test_the_export_holds_phi2_metadata_and_the_vocabulary(gguf_f32, chat):
    import gguf

    reader = gguf.GGUFReader(gguf_f32)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "phi2"
    assert fields["phi2.embedding_length"] == 128 and fields["phi2.block_count"] == 2
    assert fields["phi2.rope.dimension_count"] == int(0.4 * 128 / 4)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.eos_token_id"] == chat.eos_id
    assert len(fields["tokenizer.ggml.tokens"]) == chat.llm.config.vocab_size
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "blk.1.attn_q.bias", "output.bias"}


def test_f16_halves_the_file_and_q4_k_m_quantizes(folder, prompt):
    f16 = export_gguf(folder, folder / "model-f16.gguf", "f16")
    q4 = quantize_gguf(f16, folder / "model-q4_k_m.gguf", "q4_k_m")
    with LlamaCppLLM(q4, n_ctx=256, threads=1) as llm:
        assert len(list(llm.greedy(prompt, 3))) == 3
    assert weight_bytes(q4) < weight_bytes(f16)


def test_missing_corrupt_and_unsuitable_files_are_refused_in_one_sentence(tmp_path, gguf_f32, folder):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        LlamaCppLLM(tmp_path / "none.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        LlamaCppLLM(tmp_path / "text.gguf")
    (tmp_path / "cut.gguf").write_bytes(gguf_f32.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="cannot load"):
        LlamaCppLLM(tmp_path / "cut.gguf")
    with pytest.raises(ValueError, match="choose one of"):
        quantize_gguf(gguf_f32, tmp_path / "x.gguf", "q3")
    with LlamaCppLLM(gguf_f32, n_ctx=32, threads=1) as llm, pytest.raises(ValueError, match="expected"):
        llm.prefill(np.zeros((4, 7), np.float32))


def test_the_bench_writes_llama_cpp_rows_with_the_named_keys(tmp_path):
    """bench/bench_llm_cpu.py at a tiny width: the GGUF rows carry the issue's keys and their own peak memory."""
    out = tmp_path / "llm_cpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_llm_cpu.py"), "--json", str(out),
                           "--layers", "1", "--hidden", "160", "--rows", "llama.cpp:q8_0,llama.cpp:q4_k_m",
                           "--tokens", "4", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"], r["precision"]) for r in rows] == [("llama.cpp", "q8_0"), ("llama.cpp", "q4_k_m")]
    for row in rows:
        assert set(row) >= BENCH_KEYS, row.get("error", row)
        assert row["tokens"] == 4 and row["prompt_positions"] > 1024  # the image prompt, exactly `tokens` answered
        assert row["limit_fraction"] > 0 and row["decode_tok_s"] > 0 and row["prefill_pos_s"] > 0
        assert 0 < row["rss_mb"] < 2048
    assert rows[1]["weight_mb"] < rows[0]["weight_mb"]


def test_a_prompt_start_kept_in_the_context_gives_the_same_answer(gguf_f32, prompt, reference):
    """The app computes an image's prompt start at upload; the question then only extends the context."""
    ids, _ = reference
    with LlamaCppLLM(gguf_f32, n_ctx=256, threads=1) as llm:
        llm.prefill(prompt[:20])
        assert list(llm.greedy(prompt[20:], ANSWER, keep=True)) == ids
        with pytest.raises(ValueError, match="do not fit"):
            llm.extend(prompt.repeat(5, 1))
