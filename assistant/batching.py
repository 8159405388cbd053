"""Continuous batching: concurrent conversations decode together, one forward per step for all of them.

A request is prefilled alone, reusing its conversation's cached prefix, and joins the running batch at the next
step; one that ends (EOS, its limit) or is stopped leaves it and takes its KV cache back for the next turn.
There is no thread of its own: whichever reader needs a token runs one step for every member, under the engine's
lock, so clicks still get the model between steps (see `FairRLock`).

Rows are left-padded to a common cache length; the attention mask hides the padding and each row keeps its own
positions, so a row computes what it would compute alone (greedy outputs are identical; tests check it).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .generation import CachedPrefix, GenerationSettings, next_tokens, resume
from .model import ChatModel


@dataclass(eq=False)
class Member:
    """One request in (or waiting to leave) the batch: its sampling state, produced tokens and KV row."""

    settings: GenerationSettings
    cancel: threading.Event
    prefix: CachedPrefix
    limit: int
    seen: list[int]
    generator: torch.Generator | None
    ready: deque[int] = field(default_factory=deque)  # chosen, not yet read
    produced: int = 0
    last: int = -1  # the token the next step feeds
    ended: bool = False
    error: BaseException | None = None

    def choose(self, logits: torch.Tensor, eos_id: int) -> None:
        """Pick the next token from this row's (1, vocab) logits; end after EOS or at the limit."""
        token = int(next_tokens(logits, [self.seen], self.settings, self.generator)[0])
        self.ready.append(token)
        self.produced += 1
        self.seen.append(token)
        self.last = token
        self.ended = token == eos_id or self.produced >= self.limit


class Batcher:
    """The running decode batch of one `ChatModel`; `leave` must be called with `lock` held."""

    def __init__(self, model: ChatModel, lock) -> None:
        self.model, self.lock = model, lock
        self.members: list[Member] = []  # batch rows, in cache order
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, cache length): 0 over each row's left padding
        self.largest = 0  # the most rows ever decoded together (for tests and benchmarks)

    def join(self, ids: list[int], visual: torch.Tensor | None, settings: GenerationSettings, *,
             prefix: CachedPrefix, image_key: str | None, cancel: threading.Event,
             max_context: int | None, text: str | None = None) -> Member:
        """Prefill `ids` alone on top of `prefix`, choose the first token, and enter the batch for the rest.

        (`text`, the prompt as text, is for the server backend's interface; tokens are what runs here.)
        """
        with self.lock:
            return self._join(ids, visual, settings, prefix, image_key, cancel, max_context)

    def _join(self, ids, visual, settings, prefix, image_key, cancel, max_context) -> Member:
        model = self.model
        sequences, visuals, past, items = resume(model, ids, visual, prefix, image_key)
        embeds, mask, positions = model.embed(sequences, visuals, past=past)
        limit = settings.max_new_tokens
        if max_context is not None:
            limit = min(limit, max_context - int(positions.max()) - 1)
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(settings.seed)
        member = Member(settings, cancel, prefix, limit, [t for t in ids if t >= 0], generator)
        if limit <= 0 or cancel.is_set():
            member.ended = True
            return member
        with torch.inference_mode():
            logits = model.forward_embeds(embeds, mask, positions, prefix.cache)
        prefix.items.extend(items[past:])
        member.choose(logits, model.eos_id)
        if not member.ended:
            self._admit(member)
        return member

    def next(self, member: Member) -> int | None:
        """`member`'s next token, running batch steps as needed; None once it has ended (or was cancelled).

        A token already chosen is returned without the lock: a newcomer's first token (chosen by its prefill)
        does not wait for the prefills queued behind it.
        """
        while True:
            if member.ready and not member.cancel.is_set() and member.error is None:
                return member.ready.popleft()  # only this member's reader pops; deque ops are atomic
            with self.lock:
                if member.error is not None:
                    raise member.error
                if member.cancel.is_set():  # checked first: nothing more is read after Stop, as when alone
                    self.leave(member)
                    return None
                if member.ready:
                    continue
                if member.ended:
                    self.leave(member)
                    return None
                self._step()

    def leave(self, member: Member) -> CachedPrefix:
        """Take `member` out of the batch; its prefix then holds the prompt and every token fed back."""
        if member in self.members:
            self._dismiss(member)
        member.ended = True
        return member.prefix

    # ------------------------------------------------------------------------------------------- internals
    def _step(self) -> None:
        """One decode step for every member not ended or cancelled (those leave first)."""
        for m in [m for m in self.members if m.ended or m.cancel.is_set()]:
            self.leave(m)
        if not self.members:
            return
        self.largest = max(self.largest, len(self.members))
        model, members = self.model, self.members
        ids = torch.tensor([[m.last] for m in members], device=model.device)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        try:
            with torch.inference_mode():
                out = model.llm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                                use_cache=True, logits_to_keep=1)
        except Exception as exc:  # every member shares the failed step: each reader gets the error
            for m in members:
                m.error, m.ended = exc, True
            self.members, self.cache, self.mask = [], None, None
            return
        self.mask = mask
        logits = out.logits[:, -1].float()
        for row, m in enumerate(members):
            m.prefix.items.append(m.last)
            m.choose(logits[row:row + 1], model.eos_id)

    def _admit(self, member: Member) -> None:
        """Add `member`'s prefilled cache to the batch as a new row, left-padding the shorter side.

        Layer by layer, each layer's old tensors freed as soon as its new ones exist, so admitting costs one layer
        of extra memory, not a second copy of the batch. The member's own cache is consumed (it is in the batch).
        """
        own = member.prefix.cache
        member.prefix.cache = DynamicCache()
        length = own.get_seq_length()
        if not self.members:
            self.members, self.cache = [member], own
            self.mask = torch.ones(1, length, dtype=torch.long, device=self.model.device)
            return
        longest = max(length, self.mask.shape[1])
        for layer, row in zip(self.cache.layers, own.layers, strict=True):
            for name in ("keys", "values"):
                setattr(layer, name, torch.cat([_left_pad(getattr(layer, name), longest),
                                                _left_pad(getattr(row, name), longest)]))
                setattr(row, name, None)
        ones = torch.ones(1, length, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([_left_pad(self.mask, longest), _left_pad(ones, longest)])
        self.members.append(member)

    def _dismiss(self, member: Member) -> None:
        """Take `member`'s row out of the batch into its own cache (padding stripped); trim the padding columns
        no remaining row needs."""
        row = self.members.index(member)
        pad = int((self.mask[row] == 0).sum())
        keep = [r for r in range(len(self.members)) if r != row]
        layers = self.cache.layers
        member.prefix.cache = DynamicCache([(layer.keys[row:row + 1, :, pad:], layer.values[row:row + 1, :, pad:])
                                            for layer in layers])  # copied by DynamicCache
        self.members = [self.members[r] for r in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        trim = int((mask == 0).all(0).sum())  # leading columns that are padding for every remaining row
        for layer in layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.mask = mask[:, trim:]


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """`t` (batch, ..., positions[, dim]) left-padded with zeros to `length` positions (the mask hides them)."""
    missing = length - (t.shape[-2] if t.dim() == 4 else t.shape[-1])
    if missing == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, missing, 0) if t.dim() == 4 else (missing, 0))
