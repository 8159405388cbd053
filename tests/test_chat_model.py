"""ChatModel and the decode loop on tiny random models: splicing, masks, caches, batching, LoRA, 4/8-bit."""

from __future__ import annotations

import threading

import pytest
import torch

from assistant.batching import Batcher
from assistant.config import ChatConfig
from assistant.decoding import CachedPrefix, End, GenerationSettings, PrefixCache, Request, Token, next_tokens
from assistant.decoding import run as decode_run
from assistant.kvcache import new_cache
from assistant.llm import TINY_LLM, LoraSettings, TinyPhi, load_llm, load_tokenizer
from assistant.model import IMAGE_TOKEN, ChatModel, merge_checkpoint
from assistant.projector import ProjectorConfig
from assistant.template import Turn, render

GREEDY = GenerationSettings(max_new_tokens=12)


def tiny_config(**changes) -> ChatConfig:
    base = ChatConfig(mode="tapchat", tap_model="tap_tiny", llm=TINY_LLM,
                      projector=ProjectorConfig(in_dim=32, hidden_dim=16, out_dim=64, merge=2, grid=16),
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return base.with_(**changes)


@pytest.fixture(scope="module")
def chat() -> ChatModel:
    return ChatModel.create(tiny_config())


@pytest.fixture(scope="module")
def visual(chat: ChatModel) -> torch.Tensor:
    torch.manual_seed(3)
    return chat.visual_tokens(torch.randn(1, 32, 16, 16))[0]


def reference_greedy(chat: ChatModel, ids: list[int], vis, steps: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache: what every optimisation must reproduce."""
    seq, out = list(ids), []
    with torch.inference_mode():
        for _ in range(steps):
            e, m, p = chat.embed([seq], [vis])
            t = int(chat.llm(inputs_embeds=e, attention_mask=m, position_ids=p, use_cache=False).logits[0, -1].argmax())
            out.append(t)
            if t == chat.eos_id:
                break
            seq.append(t)
    return out


def run(chat, seqs, visuals, settings=GREEDY, *, shared: int = 0, cancel=None) -> list[list[int]]:
    """Prompts answered together through the one decode loop (EOS kept at the end of a row that reached it).

    `shared`: the first `shared` tokens (common to every row, one image) are prefilled once and each row extends
    a copy, as `Assistant.answer_batch` does."""
    batcher = Batcher(chat, threading.RLock())
    requests = [Request(s, v, settings, "", image_key="k" if v is not None else None,
                        cancel=cancel or threading.Event()) for s, v in zip(seqs, visuals)]
    if shared:
        prefix, = batcher.prefill([(seqs[0][:shared], visuals[0], "k")])
        for r in requests:
            r.shared, r.shared_tokens, r.keep_prefix = prefix, shared, False
    rows: list[list[int]] = [[] for _ in seqs]
    for event in decode_run(batcher, requests, eos_id=chat.eos_id):
        if isinstance(event, Token):
            rows[event.index].append(event.token)
        elif event.reason == "eos":
            rows[event.index].append(chat.eos_id)
    return rows


def test_visual_token_count_and_tokenize(chat, visual):
    assert visual.shape == (64, 64)  # (16/2)^2 tokens at the LLM width
    assert ProjectorConfig().num_tokens() == 1024
    ids = chat.tokenize(render([Turn("What is this?")]))
    assert ids.count(IMAGE_TOKEN) == 1
    assert chat.prompt_length(ids) == len(ids) - 1 + 64


def test_splice_positions_and_left_padding(chat, visual):
    a = chat.tokenize("USER: <image>\nhi ASSISTANT:")
    b = chat.tokenize("USER: <image>\nwhat colour is the dog on the left ASSISTANT:")
    embeds, mask, pos = chat.embed([a, b], [visual, visual])
    la, lb = chat.prompt_length(a), chat.prompt_length(b)
    assert embeds.shape[:2] == (2, lb) and mask.shape == (2, lb)
    assert mask[0].tolist() == [0] * (lb - la) + [1] * la and bool(mask[1].all())
    assert pos[0, lb - la:].tolist() == list(range(la)) and pos[1].tolist() == list(range(lb))
    k = a.index(IMAGE_TOKEN)
    start = lb - la + k
    torch.testing.assert_close(embeds[0, start:start + 64], visual)  # image tokens exactly at the placeholder
    torch.testing.assert_close(embeds[0, start - 1], chat.embedding.weight[a[k - 1]])
    torch.testing.assert_close(embeds[0, start + 64], chat.embedding.weight[a[k + 1]])
    with pytest.raises(ValueError, match="no image tokens"):
        chat.embed([a], [None])
    with pytest.raises(ValueError, match="one image"):
        chat.embed([a[:k + 1] + a], [visual])


def test_greedy_same_with_and_without_kv_cache(chat, visual):
    ids = chat.tokenize(render([Turn("What is this?")]))
    assert run(chat, [ids], [visual])[0] == reference_greedy(chat, ids, visual, 12)


def test_batched_equals_single(chat, visual):
    prompts = [chat.tokenize(render([Turn(q)])) for q in ("a?", "what is the colour of the big dog?", "count")]
    single = [run(chat, [p], [visual])[0] for p in prompts]
    assert run(chat, prompts, [visual] * 3) == single
    text_only = [chat.tokenize(render([Turn("hello there")], image=False))]
    assert run(chat, [prompts[0], text_only[0]], [visual, None]) == [single[0], run(chat, text_only, [None])[0]]
    # rows with no common start: plain left padding, no shared prefill
    plain = [chat.tokenize("a dog"), chat.tokenize("what colour is the cat on the table, and why?")]
    assert run(chat, plain, [None, None]) == [run(chat, [p], [None])[0] for p in plain]


def test_shared_prefix_is_computed_once(chat, visual, monkeypatch):
    prompts = [chat.tokenize(render([Turn(q)])) for q in ("first question?", "second, longer question here?")]
    alone = [run(chat, [p], [visual])[0] for p in prompts]
    lengths = []
    real = chat.forward_embeds
    monkeypatch.setattr(chat, "forward_embeds", lambda e, *a: lengths.append(tuple(e.shape[:2])) or real(e, *a))
    shared = prompts[0].index(IMAGE_TOKEN) + 1
    assert run(chat, prompts, [visual, visual], shared=shared) == alone
    assert lengths[0] == (1, shared - 1 + 64)  # system text + image, once
    assert lengths[1][0] == 2 and lengths[1][1] < 20 and len(lengths) == 2  # then both questions, one row each


def converse(chat, ids, vis, entry, key, settings=GREEDY) -> list[int]:
    """One conversation turn through the continuous batcher alone (the engine's path)."""
    lock = threading.RLock()
    batcher = Batcher(chat, lock)
    with lock:
        member = batcher.join(Request(ids, vis, settings, "", key, entry))
    out = []
    while (t := batcher.next(member)) is not None:
        out.append(t)
    return out


def test_prefix_reuse_matches_fresh_prefill(chat, visual):
    entry = CachedPrefix(new_cache())
    first = chat.tokenize(render([Turn("What is this?")]))
    out1 = converse(chat, first, visual, entry, "img")
    assert out1 == run(chat, [first], [visual])[0] == reference_greedy(chat, first, visual, GREEDY.max_new_tokens)
    assert entry.cache.get_seq_length() == len(entry.items) == chat.prompt_length(first) + len(out1) - 1
    answer = chat.tokenizer.decode([t for t in out1 if t != chat.eos_id])
    follow = chat.tokenize(render([Turn("What is this?", answer), Turn("And the sky?")]))
    out2 = converse(chat, follow, visual, entry, "img")
    assert entry.reused >= chat.prompt_length(first)  # the image prefix was not recomputed
    assert out2 == run(chat, [follow], [visual])[0]
    # a different image under the same text cannot reuse anything past the placeholder
    converse(chat, follow, visual * 2, entry, "other")
    assert entry.reused == follow.index(IMAGE_TOKEN)


def test_continuous_batch_rows_decode_as_if_alone(chat, visual):
    """Requests joining a running batch at different steps (different lengths, images, limits, a follow-up on a
    cached prefix) get exactly the greedy tokens they get alone, and each keeps a usable cache."""
    texts = ["What is this?", "Describe the picture in a few words, please.", "Colour?"]
    prompts = [chat.tokenize(render([Turn(q)])) for q in texts]
    visuals = [visual, visual.flip(0), None]
    prompts[2] = chat.tokenize("USER: what colour is the sky? ASSISTANT:")
    limits = [12, 7, 10]
    alone = [converse(chat, p, v, CachedPrefix(new_cache()), f"k{i}",
                      GenerationSettings(max_new_tokens=n))
             for i, (p, v, n) in enumerate(zip(prompts, visuals, limits))]
    lock = threading.RLock()
    batcher = Batcher(chat, lock)
    entries = [CachedPrefix(new_cache()) for _ in prompts]
    members, got = [], [[] for _ in prompts]
    for step in range(40):  # one reader thread interleaving: member i joins at step 2*i
        if step % 2 == 0 and len(members) < len(prompts):
            i = len(members)
            with lock:
                members.append(batcher.join(Request(prompts[i], visuals[i],
                                                    GenerationSettings(max_new_tokens=limits[i]), "", f"k{i}",
                                                    entries[i])))
        for i, m in enumerate(members):
            if not m.ended or m.ready:
                t = batcher.next(m)
                if t is not None:
                    got[i].append(t)
    assert batcher.largest == 3
    assert got == alone
    with lock:
        for i, m in enumerate(members):
            batcher.leave(m)
            assert entries[i].cache.get_seq_length() == len(entries[i].items)
            assert entries[i].cache.get_seq_length() == chat.prompt_length(prompts[i]) + len(got[i]) - 1
    assert batcher.members == [] and batcher.cache is None


def test_prefix_cache_is_bounded_lru():
    cache = PrefixCache(max_bytes=3 * 4 * 1000)
    for key in "abc":
        entry = CachedPrefix(new_cache())
        entry.cache.update(torch.zeros(1, 1, 500, 1), torch.zeros(1, 1, 500, 1), 0)  # 4000 bytes
        cache.put(key, entry)
        cache.take("a") if key == "c" else None  # "a" in use: taken out, not evicted under it
    assert len(cache) <= 3 and cache.nbytes <= 12000
    big = CachedPrefix(new_cache())
    big.cache.update(torch.zeros(1, 1, 5000, 1), torch.zeros(1, 1, 5000, 1), 0)
    cache.put("big", big)
    assert len(cache) == 0  # larger than the whole budget: not kept


def test_cancel_stops_within_one_token(chat, visual):
    ids = chat.tokenize(render([Turn("go")]))
    cancel = threading.Event()
    batcher = Batcher(chat, threading.RLock())
    events = decode_run(batcher, [Request(ids, visual, GenerationSettings(max_new_tokens=200), "", cancel=cancel)],
                        eos_id=chat.eos_id)
    got = [next(events) for _ in range(3)]
    cancel.set()
    rest = list(events)
    assert all(isinstance(e, Token) for e in got) and [type(e) for e in rest] == [End]
    assert rest[0].reason == "cancelled" and batcher.members == []


def test_sampling_settings():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    assert next_tokens(logits.clone(), [[]], GreedyLike := GenerationSettings(), None).item() == 1
    # repetition penalty pushes the seen best token below the runner-up
    penalised = GenerationSettings(repetition_penalty=1.5)
    assert next_tokens(logits.clone(), [[1]], penalised, None).item() == 2
    # top_p keeps only the smallest set reaching p: token 3 is never drawn
    g = torch.Generator().manual_seed(0)
    hot = GenerationSettings(temperature=1.0, top_p=0.9)
    draws = {next_tokens(logits.clone(), [[]], hot, g).item() for _ in range(200)}
    assert draws <= {1, 2} and GreedyLike.temperature == 0.0
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"repetition_penalty": 9}):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)


def test_lora_save_load_merge_same_logits(tmp_path, visual):
    chat = ChatModel.create(tiny_config(), seed=1)
    with torch.no_grad():  # make the adapters non-trivial (fresh LoRA is an exact no-op)
        for name, p in chat.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        for p in chat.projector.parameters():
            p.add_(0.01)
    ids = chat.tokenize(render([Turn("What is this?")]))

    def logits(model):
        e, m, p = model.embed([ids], [model.visual_tokens(torch.ones(1, 32, 16, 16))[0]])
        with torch.inference_mode():
            return model.llm(inputs_embeds=e, attention_mask=m, position_ids=p).logits

    ref = logits(chat)
    chat.save_pretrained(tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["adapter", "config.json", "llm", "projector.safetensors"]
    assert str(tmp_path) not in (tmp_path / "ckpt" / "config.json").read_text()  # no absolute paths
    loaded = ChatModel.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(logits(loaded), ref)
    merged_dir = merge_checkpoint(tmp_path / "ckpt", tmp_path / "merged")
    merged = ChatModel.from_pretrained(merged_dir)
    assert merged.config.lora is None and not (merged_dir / "adapter").exists()
    torch.testing.assert_close(logits(merged), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(FileExistsError):
        merge_checkpoint(tmp_path / "ckpt", tmp_path / "merged")


def test_config_round_trip_and_errors(tmp_path):
    cfg = tiny_config()
    assert ChatConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="projector"):
        ChatConfig(mode="tapchat")
    with pytest.raises(ValueError, match="unknown config keys"):
        ChatConfig.from_dict({**cfg.to_dict(), "mm_vision_tower": "/abs/path"})
    with pytest.raises(ValueError, match="newer"):
        ChatConfig.from_dict({**cfg.to_dict(), "version": 99})
    with pytest.raises(FileNotFoundError, match="not a TAP-Chat checkpoint"):
        ChatConfig.load(tmp_path)
    assert ChatConfig().num_scene_regions == 5 and cfg.num_scene_regions == 0
    (tmp_path / "tap").mkdir(), (tmp_path / "chat").mkdir()  # a TAP folder named relative to a checkpoint
    assert cfg.with_(tap_model="../tap").tap_location(tmp_path / "chat") == str(tmp_path / "chat" / "../tap")
    assert cfg.with_(tap_model="../gone").tap_location(tmp_path / "chat") == "../gone"
    assert cfg.tap_location(tmp_path) == "tap_tiny"


def test_tiny_llm_shapes_and_tokenizer_files_are_checked(tmp_path):
    with pytest.raises(ValueError, match="rotary"):
        TinyPhi(hidden_size=256, num_attention_heads=4)  # head 64: a rotary part of 25.6 dims
    TinyPhi(hidden_size=320, num_attention_heads=4)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_tiny_llm_runs_on_cpu(kind):
    ref_model = load_llm(TINY_LLM, vocab_size=576)
    q = load_llm(TINY_LLM, vocab_size=576, quantization=kind)
    assert "bit" in type(q.model.layers[0].mlp.fc1).__name__  # really bitsandbytes layers
    x = torch.randint(0, 576, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = ref_model(x).logits, q(x).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.3 * ref.abs().max()  # close to the full-precision model, not equal
    with pytest.raises(ValueError, match="unknown quantization"):
        load_llm(TINY_LLM, quantization="3bit")


def test_missing_phi2_weights_named_offline():
    from tokenizer_tap.errors import WeightsNotFoundError
    with pytest.raises(WeightsNotFoundError) as err:
        load_llm("microsoft/phi-2")
    message = str(err.value)
    assert "model-00001-of-00002.safetensors" in message and "--tiny" in message
