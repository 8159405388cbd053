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

from .decoding import CachedPrefix, GenerationSettings, Request, next_tokens, resume, sequence_items
from .kvcache import new_cache
from .model import IMAGE_TOKEN, ChatModel


@dataclass(eq=False)
class Member:
    """One request in (or waiting to leave) the batch: its sampling state, produced tokens and KV row."""

    settings: GenerationSettings
    cancel: threading.Event
    prefix: CachedPrefix
    limit: int
    seen: list[int]
    generator: torch.Generator | None
    keep: bool = True  # give the KV row back on leaving (a conversation's next turn extends it)
    ready: deque[int] = field(default_factory=deque)  # chosen, not yet read
    produced: int = 0
    last: int = -1  # the token the next step feeds
    ended: bool = False
    error: BaseException | None = None

    def choose(self, logits: torch.Tensor, eos_id: int) -> None:
        """Pick the next token from this row's (1, vocab) logits; end after EOS or at the limit."""
        self.take(int(next_tokens(logits, [self.seen], self.settings, self.generator)[0]), eos_id)

    def take(self, token: int, eos_id: int) -> None:
        """Record the chosen token: it is read next and fed back at the next step."""
        self.ready.append(token)
        self.produced += 1
        self.seen.append(token)
        self.last = token
        self.ended = token == eos_id or self.produced >= self.limit


class Batcher:
    """The running decode batch of one `ChatModel`; `leave` must be called with `lock` held."""

    def __init__(self, model: ChatModel, lock) -> None:
        self.model, self.lock = model, lock
        self.members: list[Member | None] = []  # batch rows, in cache order (None: a left member's row)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, cache length): 0 over each row's left padding
        self.largest = 0  # the most rows ever decoded together (for tests and benchmarks)

    def join(self, request: Request) -> Member:
        """Prefill `request` alone on top of its prefix, choose the first token, and enter the batch for the rest."""
        return self.join_many([request])[0]

    def join_many(self, requests: list[Request]) -> list[Member]:
        """`join` for several requests at once, entering the batch in one copy. Requests that extend the same
        `shared` prefix (benchmark questions about one image) are prefilled together, each on its own row."""
        with self.lock:
            members: list[Member | None] = [None] * len(requests)
            groups: dict[int, list[int]] = {}
            blocks = []
            for i, request in enumerate(requests):
                if request.shared is not None:
                    groups.setdefault(len(request.shared.items), []).append(i)
                    continue
                member = members[i] = self._member(request, request.prefix or CachedPrefix(new_cache()))
                if self._prefill(member, request):
                    own, member.prefix.cache = member.prefix.cache, new_cache()
                    blocks.append(([member], own, torch.ones(1, own.get_seq_length(), dtype=torch.long,
                                                              device=self.model.device)))
            for rows in groups.values():
                block = self._prefill_shared([requests[i] for i in rows])
                blocks.append(block)
                for i, member in zip(rows, block[0], strict=True):
                    members[i] = member
            self._admit(blocks)
            return members  # type: ignore[return-value]

    def _member(self, request: Request, prefix: CachedPrefix) -> Member:
        """A request's decoding state (its prefill lowers the token limit to what the context leaves)."""
        settings = request.settings
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(settings.seed)
        return Member(settings, request.cancel, prefix, settings.max_new_tokens, [t for t in request.ids if t >= 0],
                      generator, request.keep_prefix)

    def _prefill(self, member: Member, request: Request) -> bool:
        """Prefill one request on top of its prefix and choose its first token; False when it ended already."""
        model, prefix = self.model, member.prefix
        sequences, visuals, past, items = resume(model, request.ids, request.visual, prefix, request.image_key)
        embeds, mask, positions = model.embed(sequences, visuals, past=past)
        if request.max_context is not None:
            member.limit = min(member.limit, request.max_context - int(positions.max()) - 1)
        if member.limit <= 0 or request.cancel.is_set():
            member.ended = True
            return False
        with torch.inference_mode():
            logits = model.forward_embeds(embeds, mask, positions, prefix.cache)
        prefix.items.extend(items[past:])
        member.choose(logits, model.eos_id)
        return not member.ended

    def _prefill_shared(self, requests: list[Request]) -> tuple[list[Member], DynamicCache, torch.Tensor]:
        """Prefill requests that start with computed prefixes of one length as one left-padded batch, a row each.

        Each row starts as a copy of its request's prefix; its own tokens follow its padding (masked), their
        positions continuing right after the prefix, so a row computes what it would alone. Rows that end at
        their first token become holes when the block is admitted."""
        model, past = self.model, len(requests[0].shared.items)
        cache = new_cache()
        for i in range(len(requests[0].shared.cache.layers)):
            layers = [r.shared.cache.layers[i] for r in requests]
            cache.update(torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers]), i)
        rest = [r.ids[r.shared_tokens:] for r in requests]
        embeds, mask, positions = model.embed(rest, [r.visual if IMAGE_TOKEN in ids else None
                                                     for r, ids in zip(requests, rest, strict=True)], past=past)
        with torch.inference_mode():
            logits = model.forward_embeds(embeds, mask, positions, cache)
        members = []
        for row, request in enumerate(requests):
            member = self._member(request, CachedPrefix(new_cache()))
            member.keep = False  # its row is not a resumable prefix (the shared part is the caller's)
            if request.max_context is not None:
                member.limit = min(member.limit, request.max_context - int(positions[row].max()) - 1)
            if member.limit <= 0 or request.cancel.is_set():
                member.ended = True
            else:
                member.choose(logits[row:row + 1], model.eos_id)
            members.append(member)
        return members, cache, mask

    def prefill(self, prompts: list[tuple[list[int], torch.Tensor | None, str | None]]) -> list[CachedPrefix]:
        """The KV prefixes of prompt starts several requests share, (ids, image tokens, image key) each, computed
        now in one forward (they have the same length: one template, one image each); needs `lock`."""
        model = self.model
        embeds, mask, positions = model.embed([ids for ids, _, _ in prompts],
                                              [vis if IMAGE_TOKEN in ids else None for ids, vis, _ in prompts])
        cache = new_cache()
        with torch.inference_mode():
            model.forward_embeds(embeds, mask, positions, cache)
        prefixes = []
        for row, (ids, _, key) in enumerate(prompts):
            own = new_cache((layer.keys[row:row + 1], layer.values[row:row + 1]) for layer in cache.layers)
            prefixes.append(CachedPrefix(own, sequence_items(ids, key, model.num_visual_tokens)))
        return prefixes

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
        """Take `member` out of the batch; its prefix then holds the prompt and every token fed back (when its
        request keeps it)."""
        if any(m is member for m in self.members):
            self._dismiss(member)
        member.ended = True
        return member.prefix

    # ------------------------------------------------------------------------------------------- internals
    def _step(self) -> None:
        """One decode step for every member not ended or cancelled (those leave first)."""
        for m in [m for m in self.members if m is not None and (m.ended or m.cancel.is_set())]:
            self.leave(m)
        if not self.members:
            return
        model, members = self.model, self.members
        self.largest = max(self.largest, len(members) - members.count(None))
        ids = torch.tensor([[m.last if m is not None else model.eos_id] for m in members], device=model.device)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        try:
            with torch.inference_mode():
                out = model.llm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                                use_cache=True, logits_to_keep=1)
        except Exception as exc:  # every member shares the failed step: each reader gets the error
            for m in members:
                if m is not None:
                    m.error, m.ended = exc, True
            self.members, self.cache, self.mask = [], None, None
            return
        self.mask = mask
        logits = out.logits[:, -1].float()
        if len(members) == 1:  # one conversation answering alone: the common case, kept short
            members[0].prefix.items.append(members[0].last)
            members[0].choose(logits, model.eos_id)
            return
        # rows that sample alike (same settings, no seeded generator of their own) choose in one call
        groups: dict[object, list[int]] = {}
        for row, m in enumerate(members):
            if m is not None:
                m.prefix.items.append(m.last)
                groups.setdefault(m.settings if m.generator is None else id(m), []).append(row)
        for rows in groups.values():
            first = members[rows[0]]
            tokens = next_tokens(logits[rows], [members[r].seen for r in rows], first.settings, first.generator)
            for r, token in zip(rows, tokens.tolist(), strict=True):
                members[r].take(token, model.eos_id)

    def _admit(self, blocks: list[tuple[list[Member], DynamicCache, torch.Tensor]]) -> None:
        """Add prefilled blocks (members, their rows' cache, its mask) to the batch, left-padding every row to the
        longest, in one copy; a member that already ended is a hole in its block.

        Layer by layer, each layer's old tensors freed as soon as its new ones exist, so admitting costs one layer
        of extra memory, not a second copy of the batch. The in-place cache adopts the joined tensors full: the
        next step grows them into a buffer with room, once, and later steps write in place."""
        blocks = [([m if not m.ended else None for m in ms], c, mask) for ms, c, mask in blocks
                  if any(not m.ended for m in ms)]
        if not blocks:
            return
        if self.members:
            blocks.insert(0, (self.members, self.cache, self.mask))
        longest = max(mask.shape[1] for _, _, mask in blocks)
        target = blocks[0][1]
        for i, layer in enumerate(target.layers):
            for name in ("keys", "values"):
                parts = [_left_pad(getattr(c.layers[i], name), longest) for _, c, _ in blocks]
                for _, c, _ in blocks[1:]:
                    setattr(c.layers[i], name, None)
                setattr(layer, name, torch.cat(parts) if len(parts) > 1 else parts[0])
        self.mask = torch.cat([_left_pad(mask, longest) for _, _, mask in blocks])
        self.cache = target
        self.members = [m for ms, _, _ in blocks for m in ms]

    def _dismiss(self, member: Member) -> None:
        """Take `member`'s row out of the batch (into its own cache, padding stripped, when its request keeps it).

        The row stays as a hole, computed but unread, until holes are half the batch: then the batch is compacted
        once, and the padding columns no remaining row needs are trimmed (a batch of questions ending one by one
        costs a few copies, not one per question)."""
        row = next(i for i, m in enumerate(self.members) if m is member)
        if member.keep:
            pad = int((self.mask[row] == 0).sum())
            member.prefix.cache = new_cache((layer.keys[row:row + 1, :, pad:], layer.values[row:row + 1, :, pad:])
                                            for layer in self.cache.layers)  # copied, exactly as long as the row
        self.members[row] = None
        keep = [r for r, m in enumerate(self.members) if m is not None]
        if not keep:
            self.members, self.cache, self.mask = [], None, None
            return
        if 2 * len(keep) > len(self.members):
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        trim = int((mask == 0).all(0).sum())  # leading columns that are padding for every remaining row
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.members, self.mask = [self.members[r] for r in keep], mask[:, trim:]


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """`t` (batch, ..., positions[, dim]) left-padded with zeros to `length` positions (the mask hides them)."""
    missing = length - (t.shape[-2] if t.dim() == 4 else t.shape[-1])
    if missing == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, missing, 0) if t.dim() == 4 else (missing, 0))
