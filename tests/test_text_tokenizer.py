"""The caption tokenizer reproduces the official encoding and detokenize rules."""

import pytest

from tokenizer_tap import CheckpointError
from tokenizer_tap.text_tokenizer import TextTokenizer


def test_llama_tokenizer_example(llama_tokenizer):
    tok = TextTokenizer(llama_tokenizer)
    assert tok.encode("a woman with blonde hair") == [263, 6114, 411, 1999, 13469, 11315]
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 31999)


def test_detokenize_drops_bos_and_cuts_at_first_eos(llama_tokenizer):
    tok = TextTokenizer(llama_tokenizer)
    ids = tok.encode("a woman with blonde hair")
    row = [1] + ids + [2, 263, 2]
    assert tok.detokenize([row]) == ["a woman with blonde hair"]
    assert tok.detokenize([[1] + ids[:2]]) == ["a woman"]


def test_not_a_model(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        TextTokenizer(bad)
