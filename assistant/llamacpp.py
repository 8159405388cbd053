"""A GGUF Phi run by llama.cpp in this process (llama-cpp-python's C API), prompts given as embeddings.

Why the low-level API: `llama_cpp.Llama` takes token ids only, while a tapchat prompt is text embeddings with the
image's projected tokens spliced in (`ChatModel.embed_sequence`). A `llama_batch` made with `embd` = hidden size
carries those float rows straight into the graph; answer tokens then go in as ids, looked up in the GGUF's own
table. One sequence, greedy: what the side-by-side bench and a single-user CPU answer need.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

from tokenizer_tap.errors import CheckpointError, WeightsNotFoundError

GGUF_MAGIC = b"GGUF"


@functools.cache
def llama_cpp_module() -> ModuleType:
    """`llama_cpp`, imported once with its backend started; its log (every tensor it loads or quantizes) is kept
    to errors unless the user set the `llama-cpp-python` logger's level."""
    import llama_cpp

    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    llama_cpp.llama_backend_init()
    return llama_cpp


class LlamaCppLLM:
    """One GGUF model and one context (KV cache of `n_ctx` positions); `close()` or `with` frees both."""

    def __init__(self, path: str | Path, *, n_ctx: int | None = None, threads: int | None = None,
                 threads_batch: int | None = None) -> None:
        lib = llama_cpp_module()
        self.path = Path(path)
        _check_file(self.path)
        self._lib, self._model, self._ctx, self._token = lib, None, None, None
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), lib.llama_model_default_params())
        if not self._model:
            raise CheckpointError(f"llama.cpp cannot load {self.path}: not a complete GGUF model of an architecture it "
                                  "knows (re-export it with assistant.gguf_export)")
        self.width = lib.llama_model_n_embd(self._model)
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx or lib.llama_model_n_ctx_train(self._model)
        params.n_batch = params.n_ctx  # a whole prompt in one llama_decode (split into n_ubatch pieces inside)
        params.n_threads = threads or os.cpu_count() or 1
        params.n_threads_batch = threads_batch or params.n_threads
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not make a {params.n_ctx}-position context for {self.path}")
        self.n_ctx = params.n_ctx
        self._token = lib.llama_batch_init(1, 0, 1)
        self._pos = 0

    def prefill(self, embeds) -> np.ndarray:
        """Start a new answer from (positions, width) prompt embeddings (numpy or torch, any float dtype); the
        logits after its last position."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self._pos = 0
        return self.extend(embeds)

    def extend(self, embeds) -> np.ndarray:
        """Append embedding rows after what the context holds (a question after an image prefix computed at
        upload); the logits after the last one."""
        rows = embeds if isinstance(embeds, np.ndarray) else embeds.detach().float().cpu().numpy()
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.width or not len(rows):
            raise ValueError(f"prompt embeddings of shape {rows.shape}: expected (positions, {self.width})")
        lib = self._lib
        n = len(rows)
        batch = lib.llama_batch_init(n, self.width, 1)
        try:
            batch.n_tokens = n
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            np.ctypeslib.as_array(batch.pos, (n,))[:] = np.arange(self._pos, self._pos + n, dtype=np.int32)
            np.ctypeslib.as_array(batch.n_seq_id, (n,))[:] = 1
            for i in range(n):
                batch.seq_id[i][0] = 0
            flags = np.ctypeslib.as_array(batch.logits, (n,))
            flags[:] = 0
            flags[-1] = 1
            return self._decode(batch, n)
        finally:
            lib.llama_batch_free(batch)

    def step(self, token: int) -> np.ndarray:
        """Feed one answer token after the prompt; the logits for the next."""
        batch = self._token
        batch.n_tokens = 1
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, self._pos, 1, 1
        batch.seq_id[0][0] = 0
        return self._decode(batch, 1)

    def greedy(self, embeds, max_new_tokens: int, eos_id: int | None = None, *, keep: bool = False) -> Iterator[int]:
        """Greedy answer ids one at a time, `max_new_tokens` of them or up to and without `eos_id`; `keep` continues
        after what the context holds instead of starting anew."""
        logits = self.extend(embeds) if keep else self.prefill(embeds)
        for i in range(max_new_tokens):
            token = int(np.argmax(logits))
            if token == eos_id:
                return
            yield token
            if i + 1 < max_new_tokens:
                logits = self.step(token)

    def _decode(self, batch, n: int) -> np.ndarray:
        """Run `batch` (n positions after `_pos`) and copy out its one row of logits."""
        if self._pos + n > self.n_ctx:
            raise ValueError(f"{self._pos + n} positions do not fit the {self.n_ctx}-position context")
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} at position {self._pos}")
        self._pos += n
        row = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(row, (self.vocab_size,)).copy()

    def close(self) -> None:
        """Free the batch, the context and the model (safe to call twice)."""
        lib = self._lib
        if self._token is not None:
            lib.llama_batch_free(self._token)
        if self._ctx:
            lib.llama_free(self._ctx)
        if self._model:
            lib.llama_model_free(self._model)
        self._token = self._ctx = self._model = None

    def __enter__(self) -> LlamaCppLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_file(path: Path) -> None:
    """A missing file or one that is not GGUF at all, named before llama.cpp is asked (its log says less)."""
    if not path.is_file():
        raise WeightsNotFoundError(f"GGUF model {path} not found: export one with assistant.gguf_export")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
