"""Decoding: sampling settings, choosing the next token, per-conversation KV prefixes, and the one decode loop.

Live chat, benchmark batches and the LLM-server path all read their tokens through `run`. A *lane* computes them:
`batching.Batcher` (this process: continuous batching over one `ChatModel`) or `remote.ServerLLM` (a vLLM server).
Both take a `Request`, and answer `next(member)` with a token id or None once the answer ended; `leave(member)`
hands back the member's KV prefix. `run` joins requests (at most `window` in flight), reads them round robin, and
yields typed events: a `Token`, then one `End` per request.

The loop is our own rather than `generate()` because a conversation's KV cache must outlive one call: a follow-up
question extends the cache of the previous turn instead of re-running the image prefix (about 1100 positions in
tapchat mode; `resume` works out what is left to compute).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from tokenizer_tap.cache import BoundedCache

from .kvcache import fit, new_cache
from .model import IMAGE_TOKEN, ChatModel


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options; the defaults are greedy, which benchmarks need to be reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    allowed_tokens: tuple[int, ...] | None = None  # only these may be chosen (multiple-choice by likelihood)

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError("max_new_tokens must be between 1 and 4096")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError("temperature must be between 0 and 5")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.5 <= self.repetition_penalty <= 3.0:
            raise ValueError("repetition_penalty must be between 0.5 and 3")

    def to_dict(self) -> dict:
        """Every field as a plain dict: stored with each answer, and how a copy with one field changed is made."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed, "allowed_tokens": self.allowed_tokens}


def next_tokens(logits: torch.Tensor, seen: list[list[int]], settings: GenerationSettings,
                generator: torch.Generator | None) -> torch.Tensor:
    """Choose one token per row of (B, vocab) float logits. `seen` (per row) feeds the repetition penalty."""
    if settings.allowed_tokens is not None:
        keep = torch.tensor(settings.allowed_tokens, device=logits.device)
        logits = torch.full_like(logits, float("-inf")).index_copy(1, keep, logits.index_select(1, keep))
    if settings.repetition_penalty != 1.0:
        for row, ids in enumerate(seen):
            if ids:
                idx = torch.tensor(sorted(set(ids)), device=logits.device)
                vals = logits[row, idx]
                p = settings.repetition_penalty
                logits[row, idx] = torch.where(vals > 0, vals / p, vals * p)
    if settings.temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > settings.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class CachedPrefix:
    """A KV cache and the sequence it holds, one hashable item per position (so prefixes can be compared)."""

    cache: DynamicCache
    items: list[Hashable] = field(default_factory=list)
    reused: int = 0  # positions the latest turn did not have to recompute

    @property
    def nbytes(self) -> int:
        """Memory held by the cached keys and values (what `PrefixCache` budgets by): whole buffers, unused
        capacity included, each counted once."""
        held = {}
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                if t is not None:
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(held.values())

    def common_prefix(self, items: list[Hashable]) -> int:
        """Length of the longest common prefix of the cached sequence and `items`."""
        n = 0
        for a, b in zip(self.items, items):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions (cache and items alike), so a prompt can extend the part it shares."""
        if n < len(self.items):
            self.cache.crop(n - len(self.items))  # transformers 5: a negative count of positions to drop
            del self.items[n:]


class PrefixCache:
    """Per-conversation KV caches, evicted least recently used first when over `max_bytes` in total."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: BoundedCache[str, CachedPrefix] = BoundedCache("assistant.kv_prefixes", max_bytes,
                                                                      weigh=lambda e: e.nbytes, unit="bytes")

    def take(self, key: str) -> CachedPrefix:
        """The entry for `key`, removed while in use (a failed turn then simply leaves no cache behind)."""
        return self._entries.pop(key) or CachedPrefix(new_cache())

    def put(self, key: str, entry: CachedPrefix) -> None:
        """Keep `entry` for `key`, evicting least recently used ones to fit; one over the whole budget is not kept.

        Its cache is trimmed to what it holds first: no decoding slack stays allocated between turns."""
        fit(entry.cache)
        self._entries.put(key, entry)  # over budget: oldest first; an entry alone over it is not kept

    def drop(self, key: str) -> None:
        """Forget `key`'s cache (after an undo, a failed turn or a delete); an absent key is fine."""
        self._entries.pop(key)

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries now (at most `max_bytes`)."""
        return self._entries.size

    def __len__(self) -> int:
        return len(self._entries)


def sequence_items(ids: list[int], image_key: str | None, num_visual: int) -> list[Hashable]:
    """One comparable item per position: token ids, and (image key, index) for each visual token."""
    items: list[Hashable] = []
    for tok in ids:
        if tok == IMAGE_TOKEN:
            items.extend((image_key, i) for i in range(num_visual))
        else:
            items.append(tok)
    return items


def resume(model: ChatModel, ids: list[int], visual: torch.Tensor | None, prefix: CachedPrefix,
           image_key: str | None) -> tuple[list[list[int]], list[torch.Tensor | None], int, list[Hashable]]:
    """What is left to compute of one prompt on top of `prefix`, whose cache is cut back to the reusable part.

    Returns the remaining tokens and visual (as a batch of one), the positions reused, and the prompt's items.
    """
    items = sequence_items(ids, image_key, model.num_visual_tokens)
    # keep at least one position to compute (it yields the first logits)
    start, past = _split(ids, min(prefix.common_prefix(items), len(items) - 1), model.num_visual_tokens)
    prefix.truncate(past)
    prefix.reused = past
    todo = ids[start:]
    return [todo], [visual if IMAGE_TOKEN in todo else None], past, items


def _split(ids: list[int], n: int, num_visual: int) -> tuple[int, int]:
    """(index into `ids`, position) where computing resumes after reusing `n` positions.

    A reused span that ends inside the image is cut back to the image start: visual tokens go in all at once.
    """
    pos = 0
    for k, tok in enumerate(ids):
        width = num_visual if tok == IMAGE_TOKEN else 1
        if pos + width > n:
            return k, pos
        pos += width
    return len(ids), pos


@dataclass(eq=False)
class Request:
    """One prompt to answer: its token ids (and image features), how to sample, and where it may resume."""

    ids: list[int]
    visual: torch.Tensor | None
    settings: GenerationSettings
    text: str  # the prompt as text: a server without prompt embeddings is sent this
    image_key: str | None = None
    prefix: CachedPrefix | None = None  # a conversation's cached prefix to extend (local lane)
    cancel: threading.Event = field(default_factory=threading.Event)
    max_context: int | None = None
    keep_prefix: bool = True  # False: nothing extends the answer's KV cache later (benchmark questions)
    shared: CachedPrefix | None = None  # a prompt start computed once for several requests (not copied per request)
    shared_tokens: int = 0  # how many of `ids` it holds


@dataclass(frozen=True)
class Token:
    """Request `index` produced `token` (never EOS)."""

    index: int
    token: int


@dataclass(frozen=True)
class End:
    """Request `index` ended: "eos", "limit" (max_new_tokens or the context) or "cancelled".

    `prefix` holds the prompt and every token fed back (the next turn's KV cache; None from a server)."""

    index: int
    reason: str
    prefix: CachedPrefix | None


class Lane(Protocol):
    def join_many(self, requests: list[Request]) -> list[Any]:
        """Start answering `requests`; returns the member handles that `next` and `leave` take."""
        ...

    def next(self, member: Any) -> int | None:
        """The member's next token id, blocking until it is computed; None once its answer has ended."""
        ...

    def leave(self, member: Any) -> CachedPrefix | None:
        """Take the member out of the lane (also mid-answer); its KV prefix, or None where it lives on a server."""
        ...


def run(lane: Lane, requests: Sequence[Request], *, eos_id: int, lock: Any = None,
        window: int | None = None) -> Iterator[Token | End]:
    """Answer `requests` on `lane`, yielding each token as it comes and one `End` per request.

    `lock` (the engine's model lock) is held while a member leaves; `window` bounds the requests in flight. A reader
    that stops early, or an error, takes every member still in flight out of the lane.
    """
    waiting = deque(enumerate(requests))
    live: dict[int, Any] = {}
    guard = lock if lock is not None else contextlib.nullcontext()
    try:
        while waiting or live:
            joining = [waiting.popleft() for _ in range(min(len(waiting), (window or len(requests)) - len(live)))]
            if joining:  # together: the lane admits them to its batch in one copy
                live.update(zip([i for i, _ in joining], lane.join_many([r for _, r in joining]), strict=True))
            for index in list(live):
                token = lane.next(live[index])
                if token is not None and token != eos_id:
                    yield Token(index, token)
                    continue
                with guard:
                    prefix = lane.leave(live.pop(index))
                reason = "eos" if token == eos_id else \
                    "cancelled" if requests[index].cancel.is_set() else "limit"
                yield End(index, reason, prefix)
    finally:
        if live:
            with guard:
                for member in live.values():
                    lane.leave(member)
