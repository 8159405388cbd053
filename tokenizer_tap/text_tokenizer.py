"""SentencePiece tokenizer of the caption decoder (the LLaMA-1/2 `tokenizer.model`, 32000 pieces).

SentencePiece has no pad piece, so, as upstream, the last id (31999 for LLaMA) fills unused buffer slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .errors import CheckpointError


class TextTokenizer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: not a SentencePiece model ({exc})") from None
        self.n_words = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.n_words - 1

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.EncodeAsIds(text) + ([self.eos_id] if eos else [])

    def detokenize(self, tokens: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Token buffers (BOS first) -> strings: drop BOS, cut at the first EOS, decode."""
        out = []
        for row in np.asarray(tokens).tolist():
            row = row[1:]
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            out.append(self.sp.DecodeIds(row))
        return out
