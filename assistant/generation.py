"""Token generation: sampling settings, the fixed-batch decode loop and per-conversation prefix KV caches.

The loops are our own rather than `generate()` because a conversation's KV cache must outlive one call: a
follow-up question extends the cache of the previous turn instead of re-running the image prefix (about 1100
positions in tapchat mode; `resume` works out what is left to compute). Cancellation is checked before every
forward step, so `cancel.set()` stops the model within one token.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from tokenizer_tap.cache import BoundedCache

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
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def common_prefix(self, items: list[Hashable]) -> int:
        """Length of the longest common prefix of the cached sequence and `items`."""
        n = 0
        for a, b in zip(self.items, items):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, n: int) -> None:
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
        return self._entries.pop(key) or CachedPrefix(DynamicCache())

    def put(self, key: str, entry: CachedPrefix) -> None:
        self._entries.put(key, entry)  # over budget: oldest first; an entry alone over it is not kept

    def drop(self, key: str) -> None:
        self._entries.pop(key)

    @property
    def nbytes(self) -> int:
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


def decode(model: ChatModel, sequences: list[list[int]], visuals: list[torch.Tensor | None],
           settings: GenerationSettings, *, cancel: threading.Event | None = None,
           max_context: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row of a fixed batch, step by step, until all rows end, a limit is hit or
    `cancel` is set (benchmarks' single-turn questions; conversations go through `batching.Batcher`).

    A batch whose rows start with the same tokens (same image, same template) computes that shared part once
    (see `_prefill_shared`).
    """
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(settings.seed)
    cache = DynamicCache()
    seen = [[t for t in s if t >= 0] for s in sequences]  # the whole prompt counts for the repetition penalty
    past = 0
    if len(sequences) > 1:
        sequences, visuals, past = _prefill_shared(model, sequences, visuals, cache)
    embeds, mask, positions = model.embed(sequences, visuals, past=past)
    done = torch.zeros(len(sequences), dtype=torch.bool, device=model.device)
    limit = settings.max_new_tokens
    if max_context is not None:
        limit = min(limit, max_context - int(positions.max()) - 1)
    step_input: dict = {"embeds": embeds}
    with torch.inference_mode():
        for _ in range(max(limit, 0)):
            if cancel is not None and cancel.is_set():
                return
            if "embeds" in step_input:
                logits = model.forward_embeds(step_input["embeds"], mask, positions, cache)
            else:
                out = model.llm(input_ids=step_input["ids"], attention_mask=mask, position_ids=positions,
                                cache=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1].float()
            token = next_tokens(logits, seen, settings, generator)
            token = torch.where(done, torch.full_like(token, model.eos_id), token)
            yield token
            done |= token == model.eos_id
            if bool(done.all()):
                return
            for row, t in enumerate(token.tolist()):
                seen[row].append(t)
            step_input = {"ids": token[:, None]}
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1


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


def _prefill_shared(model: ChatModel, sequences: list[list[int]], visuals: list[torch.Tensor | None],
                    cache: DynamicCache) -> tuple[list[list[int]], list[torch.Tensor | None], int]:
    """Run the rows' common leading tokens once per distinct image and give every row its copy.

    Benchmark prompts share the system text and template and often the image: the ~1100 positions up to the
    question are computed once per distinct image (all such prefixes have the same length, so they run as one
    unpadded batch) instead of once per question. The rows' remaining tokens follow after per-row padding that
    the mask hides (positions continue from the mask), so each row sees exactly what it would see alone.
    Returns the rows' remaining tokens, their visuals and the shared length in positions.
    """
    n = 0
    first = sequences[0]
    while all(len(s) > n + 1 and s[n] == first[n] for s in sequences):  # leave >= 1 token per row
        n += 1
    if n < 16:  # not worth a separate forward
        return sequences, visuals, 0
    has_image = IMAGE_TOKEN in first[:n]
    groups: dict[int, int] = {}  # distinct image tensor -> its row in the prefix batch
    rows = [groups.setdefault(id(v), len(groups)) if has_image else 0 for v in visuals]
    distinct = list({id(v): v for v in visuals}.values()) if has_image else [None]
    embeds, mask, positions = model.embed([first[:n]] * len(distinct), distinct)
    with torch.inference_mode():
        model.forward_embeds(embeds, mask, positions, cache)
    cache.batch_select_indices(torch.tensor(rows, device=embeds.device))
    rest = [s[n:] for s in sequences]
    return rest, [v if IMAGE_TOKEN in r else None for v, r in zip(visuals, rest)], embeds.shape[1]
