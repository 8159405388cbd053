"""The in-place KV cache: the same keys, values and greedy ids as transformers' `DynamicLayer`, written in place."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from assistant import kvcache
from assistant.batching import Batcher
from assistant.config import ChatConfig
from assistant.decoding import CachedPrefix, GenerationSettings, PrefixCache, Request, Token
from assistant.decoding import run as decode_run
from assistant.kvcache import InPlaceLayer, new_cache
from assistant.llm import TINY_LLM
from assistant.model import IMAGE_TOKEN, ChatModel
from assistant.projector import ProjectorConfig
from assistant.template import Turn, render


@pytest.fixture(scope="module")
def chat() -> ChatModel:
    return ChatModel.create(ChatConfig(mode="tapchat", tap_model="tap_tiny", llm=TINY_LLM, projector=ProjectorConfig(
        in_dim=32, hidden_dim=16, out_dim=64, merge=2, grid=16)))


@pytest.fixture(scope="module")
def visual(chat: ChatModel) -> torch.Tensor:
    torch.manual_seed(3)
    return chat.visual_tokens(torch.randn(1, 32, 16, 16))[0]


def capacity(t: torch.Tensor) -> int:
    """Positions the buffer behind the view `t` (batch, heads, length, dim) holds."""
    return t.untyped_storage().nbytes() // (t[:, :, :1].numel() * t.element_size())


def test_layer_matches_dynamic_layer(monkeypatch):
    monkeypatch.setattr(kvcache, "BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    ours, ref = InPlaceLayer(), DynamicLayer()

    def step(batch: int, n: int) -> None:
        k, v = torch.randn(batch, 2, n, 3, generator=g), torch.randn(batch, 2, n, 3, generator=g)
        for got, want in zip(ours.update(k, v), ref.update(k, v), strict=True):
            assert torch.equal(got, want)
        assert ours.get_seq_length() == ref.get_seq_length() and capacity(ours.keys) % 4 == 0

    step(3, 5)
    step(3, 1)
    before = ours.keys.data_ptr()
    ours.crop(-2), ref.crop(-2)
    step(3, 1)
    assert ours.keys.data_ptr() == before  # a crop keeps the buffer: the next step writes in place
    index = torch.tensor([2, 0])
    ours.batch_select_indices(index), ref.batch_select_indices(index)
    step(2, 1)
    ours.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
    step(4, 2)
    ours.keys, ours.values = ref.keys[:, :, 1:], ref.values[:, :, 1:]  # what the batcher assigns: adopted
    ref.keys, ref.values = ref.keys[:, :, 1:], ref.values[:, :, 1:]
    step(4, 1)
    ours.reset(), ref.reset()
    assert ours.keys is None and ours.get_seq_length() == 0
    step(1, 3)


def test_new_cache_holds_exact_copies_and_put_trims():
    big = new_cache()
    big.update(torch.randn(2, 1, 10, 3), torch.randn(2, 1, 10, 3), 0)
    row = big.layers[0].keys[1:2, :, 3:]  # contiguous though a view: must still be copied
    own = new_cache([(row, row)])
    want = row.clone()
    big.layers[0].keys.zero_()
    assert isinstance(own.layers[0], InPlaceLayer) and torch.equal(own.layers[0].keys, want)
    assert CachedPrefix(own).nbytes == 2 * 7 * 3 * 4  # exactly its length
    entry = CachedPrefix(new_cache())
    entry.cache.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    assert entry.nbytes == 2 * kvcache.BLOCK * 2 * 4  # the whole buffer counts, not only the filled part
    kv = PrefixCache()
    kv.put("a", entry)
    assert kv.nbytes == entry.nbytes == 2 * 5 * 2 * 4  # stored trimmed: no slack between turns
    entry.cache.crop(-2)
    keys, _ = entry.cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0)
    assert keys.shape[2] == 4 and keys[0, 0, 3].tolist() == [1.0, 1.0]


def read(batcher: Batcher, joining: list[Request]) -> tuple[list[list[int]], list[CachedPrefix]]:
    """Greedy ids (EOS kept) of requests joining a running batch one every other step, and their prefixes."""
    members: list = []
    got: list[list[int]] = [[] for _ in joining]
    done: set[int] = set()
    step = 0
    while len(members) < len(joining) or len(done) < len(members):
        if len(members) < len(joining) and step % 2 == 0:
            members.append(batcher.join(joining[len(members)]))
        for i, m in enumerate(members):
            if i not in done and (t := batcher.next(m)) is not None:
                got[i].append(t)
            elif i not in done:
                done.add(i)
        step += 1
    return got, [r.prefix for r in joining]


def every_path(chat: ChatModel, visual: torch.Tensor) -> tuple[list[list[int]], set[type]]:
    """Greedy ids through each decode path that touches the cache: one conversation alone, three joining a running
    batch, follow-up turns extending the prefixes they left in a `PrefixCache`, and questions sharing a computed
    prefix; and the layer classes their caches used."""
    batcher, kv = Batcher(chat, threading.RLock()), PrefixCache()
    questions = ["What is this?", "Describe the picture in a few words, please.", "Colour?"]
    prompts = [chat.tokenize(render([Turn(q)])) for q in questions]
    visuals = [visual, visual.flip(0), visual * 2]
    settings = [GenerationSettings(max_new_tokens=n) for n in (12, 7, 10)]
    ids, _ = read(batcher, [Request(prompts[0], visual, settings[0], "", "k0", kv.take("alone"))])
    first, prefixes = read(batcher, [Request(p, v, s, "", f"k{i}", kv.take(str(i)))
                                     for i, (p, v, s) in enumerate(zip(prompts, visuals, settings, strict=True))])
    for i, prefix in enumerate(prefixes):
        kv.put(str(i), prefix)
    follow = [chat.tokenize(render([Turn(q, chat.tokenizer.decode([t for t in a if t != chat.eos_id])),
                                    Turn("And the sky?")])) for q, a in zip(questions, first, strict=True)]
    resumed = [kv.take(str(i)) for i in range(3)]
    again, _ = read(batcher, [Request(f, v, s, "", f"k{i}", p) for i, (f, v, s, p)
                              in enumerate(zip(follow, visuals, settings, resumed, strict=True))])
    assert all(p.reused >= chat.prompt_length(q) for p, q in zip(resumed, prompts, strict=True))
    shared = prompts[0].index(IMAGE_TOKEN) + 1
    computed, = batcher.prefill([(prompts[0][:shared], visual, "k0")])
    rows: list[list[int]] = [[] for _ in prompts]
    for event in decode_run(batcher, [Request(p, visual, settings[0], "", "k0", shared=computed, shared_tokens=shared,
                                              keep_prefix=False) for p in prompts], eos_id=chat.eos_id):
        if isinstance(event, Token):
            rows[event.index].append(event.token)
    used = {type(layer) for p in [*prefixes, *resumed, computed] for layer in p.cache.layers}
    return ids + first + again + rows, used


def test_greedy_ids_equal_those_of_dynamic_cache(chat, visual, monkeypatch):
    ours, used = every_path(chat, visual)
    assert used == {InPlaceLayer} and sum(map(len, ours)) > 60
    with monkeypatch.context() as patch:
        patch.setattr(kvcache, "BLOCK", 8)  # buffers grow many times, in prefill and in decode
        small, _ = every_path(chat, visual)
    monkeypatch.setattr(kvcache, "InPlaceLayer", DynamicLayer)  # today's layers: a concatenation per step
    plain, used = every_path(chat, visual)
    assert used == {DynamicLayer}
    assert ours == small == plain


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_writes_in_place_growing_by_blocks(chat, visual, monkeypatch, rows):
    monkeypatch.setattr(kvcache, "BLOCK", 16)
    batcher = Batcher(chat, threading.RLock())
    settings = GenerationSettings(max_new_tokens=40, allowed_tokens=tuple(range(1, 40)))  # no EOS: 39 steps
    prompt = chat.tokenize(render([Turn("What is this?")]))
    members = batcher.join_many([Request(prompt, visual, settings, "", "k", CachedPrefix(new_cache()))
                                 for _ in range(rows)])
    seen = []
    while batcher.next(members[0]) is not None:
        for m in members[1:]:
            batcher.next(m)
        keys = batcher.cache.layers[0].keys
        seen.append((keys.data_ptr(), capacity(keys), keys.shape[2]))
    if rows > 1:  # rows admitted together are one copy, full until it first grows; one alone is its prefill's
        seen = seen[1:]
    assert len(seen) >= 39 and seen[-1][2] - seen[0][2] == len(seen) - 1
    assert all(cap % 16 == 0 and cap >= n for _, cap, n in seen)
    assert all((a[0] == b[0]) == (a[1] == b[1]) for a, b in zip(seen, seen[1:]))  # moved only when it grew
    assert len({cap for _, cap, _ in seen}) >= 3
