"""`Assistant`: the one façade the CLI, the app, LangChain and the benchmark harness use.

It owns the TAP predictor (regions, image features), the chat model, per-conversation KV caches and, optionally,
the history store. Model work is serialised by one first-come-first-served lock, taken per decode step; answers
being written at the same time decode together as one batch (`batching.Batcher`).
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokenizer_tap.build import resolve_device, resolve_dtype
from tokenizer_tap.cache import BoundedCache
from tokenizer_tap.errors import TapError, WeightsNotFoundError
from tokenizer_tap.hub import require_demo_models
from tokenizer_tap.image_io import DecodedImage, ImageSource, decode_image
from tokenizer_tap.predictor import Region, TapPredictor
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.transforms import mask_bbox

from . import rle
from .batching import Batcher
from .config import ChatConfig
from .conversation import (
    Conversation,
    ConversationError,
    RegionEntry,
    TurnEntry,
    clean_message,
    plan_prompt,
    turn_regions,
)
from .fairlock import FairRLock
from .generation import GenerationSettings, PrefixCache, decode
from .grounding import GroundedRegion
from .llm import TINY_LLM, LoraSettings, TinyPhi
from .model import ChatModel
from .projector import ProjectorConfig
from .remote import ServerError, ServerLLM

SAVE_EVERY_S = 1.0  # how often a streaming answer is written to the store


class GenerationError(RuntimeError):
    """The model failed mid-answer; the partial answer was kept (marked incomplete)."""


@dataclass
class Reply:
    """One answer and what it cost."""

    text: str = ""
    complete: bool = False
    cancelled: bool = False
    dropped_turns: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    regions: list[int] = field(default_factory=list)


class ReplyStream:
    """Iterate for text pieces as they are generated; `reply` holds the result; `cancel()` works from any thread."""

    def __init__(self, pieces: Iterator[str], reply: Reply, cancel: threading.Event) -> None:
        self._pieces, self.reply, self._cancel = pieces, reply, cancel

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def cancel(self) -> None:
        self._cancel.set()

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        for _ in self._pieces:
            pass
        return self.reply.text


@dataclass(frozen=True)
class BatchItem:
    """One benchmark question: an image (or None), the question, optional region prompts."""

    image: ImageSource | None
    question: str
    prompts: Sequence[Prompt] = ()


class Assistant:
    """Chat about images region by region.

    Example:
        bot = Assistant.tiny()              # or Assistant.from_pretrained("checkpoints/tapchat")
        conv = bot.start(image="photo.jpg")
        bot.add_region(conv, Prompt.point(120, 340))
        print(bot.ask(conv, "What is <region1> doing?").text)
    """

    def __init__(self, predictor: TapPredictor, chat: ChatModel, store=None, *,
                 cache_bytes: int = 2 << 30, model_id: str = "", llm_server: ServerLLM | None = None) -> None:
        self.predictor, self.chat, self.store = predictor, chat, store
        self.config: ChatConfig = chat.config
        self.model_id = model_id or f"{self.config.mode}:{self.config.tap_model}+{self.config.llm}"
        self.kv = PrefixCache(cache_bytes)
        self._lock = FairRLock()  # per decode step; a click waits for one step, not for the whole answer
        # concurrent answers decode together, here or on an LLM server
        self.decoder: Batcher | ServerLLM = llm_server or Batcher(chat, self._lock)
        self._visual: BoundedCache[str, torch.Tensor] = BoundedCache("assistant.visual_tokens", 8)
        self._scene: BoundedCache[str, list[GroundedRegion]] = BoundedCache("assistant.scene_regions", 8)
        self._last_tokens: tuple[str, list[int]] | None = None
        if chat.encoder_state:
            _load_encoder_blocks(predictor, chat.encoder_state)

    # ---------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, *, tap_model: str | None = None,
                        tap_checkpoint: str | Path | None = None, llm: str | None = None, device: str = "auto",
                        dtype: str = "auto", quantization: str = "none", store=None, llm_server: str | None = None,
                        llm_server_model: str | None = None, **tap_kwargs) -> Assistant:
        """A checkpoint folder (tapchat or grounded), or with no folder, grounded mode on public weights.

        With `llm_server` (an OpenAI-compatible vLLM URL) the LLM runs there and only its tokenizer and embedding
        table are loaded here; `llm_server_model` names the served model (default: the LoRA adapter or the base).
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if checkpoint is not None:
            config = ChatConfig.load(checkpoint)
        else:
            config = ChatConfig(mode="grounded", **({"llm": llm} if llm else {}))
        parts, missing = {}, []
        tap_name = tap_model or (config.tap_location(checkpoint) if checkpoint is not None else config.tap_model)

        def predictor() -> TapPredictor:
            if tap_name == "tap_tiny" and tap_checkpoint is None:  # no public weights: the seed-0 random model
                return TapPredictor.random("tap_tiny", seed=0, device=str(dev))
            return TapPredictor.from_pretrained(tap_name, tap_checkpoint, device=str(dev), **tap_kwargs)

        def chat() -> ChatModel:
            if llm_server:
                return ChatModel.for_server(checkpoint, llm=llm, dtype=dt, device=dev)
            if checkpoint is not None:
                return ChatModel.from_pretrained(checkpoint, dtype=dt, device=dev, quantization=quantization, llm=llm)
            return ChatModel.create(config, dtype=dt, device=dev, quantization=quantization)

        loaders = {"predictor": predictor, "chat": chat}
        for name, load in loaders.items():  # try both, so one message names every missing file
            try:
                parts[name] = load()
            except WeightsNotFoundError as exc:
                missing.append(str(exc))
        if missing:
            raise WeightsNotFoundError("\n".join(missing))
        server = ServerLLM(parts["chat"], llm_server, llm_server_model) if llm_server else None
        return cls(parts["predictor"], parts["chat"], store, llm_server=server)

    @classmethod
    def from_options(cls, options: Any, store=None) -> Assistant:
        """The models named by `assistant.options.add_model_options` (an argparse Namespace, or any object with the
        same attribute names such as the app's AppConfig); `--tiny` gives the random ones, in `options.mode`."""
        server = getattr(options, "llm_server", None)
        if options.tiny:
            if server:
                raise ValueError("--tiny runs random models in this process; --llm-server needs a checkpoint folder "
                                 "(--chat-checkpoint) whose llm/ the server serves")
            return cls.tiny(getattr(options, "mode", "tapchat"), store=store)
        if getattr(options, "demo", False):
            return cls.demo(store=store, device=options.device)
        return cls.from_pretrained(options.chat_checkpoint, tap_model=options.tap_model,
                                   tap_checkpoint=options.tap_checkpoint, llm=options.llm, device=options.device,
                                   dtype=getattr(options, "dtype", "auto"), quantization=options.quantization,
                                   store=store, llm_server=server,
                                   llm_server_model=getattr(options, "llm_server_model", None))

    @classmethod
    def demo(cls, *, store=None, device: str = "auto") -> Assistant:
        """The bundled demo models (`make demo-models`): TAP and a small chat model trained on synthetic scenes."""
        return cls.from_pretrained(require_demo_models() / "chat", device=device, dtype="float32", store=store)

    @classmethod
    def tiny(cls, mode: str = "tapchat", *, store=None, seed: int = 0, lora: bool = True,
             tiny_llm: TinyPhi | None = None, **kwargs) -> Assistant:
        """Small random models (no download): for tests, development and `--tiny`. Answers are gibberish."""
        predictor = TapPredictor.random("tap_tiny", seed=seed, device="cpu")
        llm_cfg = tiny_llm or TinyPhi()
        config = ChatConfig(mode=mode, tap_model="tap_tiny", llm=TINY_LLM,
                            projector=(ProjectorConfig(in_dim=predictor.model.config.encoder_embed_dim, hidden_dim=64,
                                                       out_dim=llm_cfg.hidden_size) if mode == "tapchat" else None),
                            lora=LoraSettings(r=8, alpha=16) if (lora and mode == "tapchat") else None)
        chat = ChatModel.create(config, seed=seed, tiny=llm_cfg)
        return cls(predictor, chat, store, **kwargs)

    @property
    def mode(self) -> str:
        return self.config.mode

    # ------------------------------------------------------------------------------------- conversations
    def start(self, owner: str = "local", image: ImageSource | None = None, title: str = "New chat") -> Conversation:
        conv_id = self.store.create_conversation(owner, title) if self.store else uuid.uuid4().hex
        conv = Conversation(conv_id, owner, title)
        if image is not None:
            self.set_image(conv, image)
        return conv

    def open(self, owner: str, conv_id: str) -> Conversation:
        """Restore a stored conversation: image, regions and turns (region masks are re-read from the store)."""
        if self.store is None:
            raise ConversationError("no history store is attached")
        rec = self.store.get_conversation(owner, conv_id)
        conv = Conversation(conv_id, owner, rec.info.title)
        sha = next((m.image_sha for m in reversed(rec.messages) if m.image_sha), None)
        sha = sha or next((r.image_sha for r in reversed(rec.regions) if r.image_sha), None)
        if sha:
            conv.image_key, conv.image_sha = self.predictor.set_image(self.store.image_path(sha)), sha

        def key(image_sha: str | None) -> str | None:
            """Earlier images keep their sha as key: they are not encoded unless made current again."""
            return conv.image_key if image_sha is not None and image_sha == sha else image_sha

        for r in rec.regions:
            conv.regions[r.number] = RegionEntry(r.number, key(r.image_sha), Prompt.from_dict(r.prompt),
                                                 _grounded_from_record(r), None, r.removed)
        pending: TurnEntry | None = None
        for m in rec.messages:
            if m.role == "user":
                pending = TurnEntry(m.text, m.prompt or m.text, key(m.image_sha), list(m.regions))
                conv.turns.append(pending)
            elif pending is not None:
                pending.answer, pending.complete, pending.message_id = m.text, m.complete, m.id
                pending = None
        return conv

    def set_image(self, conv: Conversation, image: ImageSource) -> str:
        """Make `image` the conversation's current image (later turns refer to it)."""
        image = decode_image(image, self.predictor.max_pixels)  # once: the encoder and the store share it
        with self._lock:
            key = self.predictor.set_image(image)
        sha = None
        if self.store is not None:
            data, fmt = _image_bytes(image)
            w, h = self.predictor.size_of(key)
            sha = self.store.add_image(conv.owner, data, width=w, height=h, format=fmt)
        with conv.lock:
            if key != conv.image_key:
                conv.new_regions.clear()
            conv.image_key, conv.image_sha = key, sha
        return key

    def add_region(self, conv: Conversation, prompt: Prompt) -> RegionEntry:
        """Segment, label and caption a region of the current image; it gets the next `<regionN>` id."""
        region, grounded_at = self._segment(conv, prompt)
        with conv.lock:
            number = conv.next_number()
            if self.store is not None:
                number = self.store.add_region(conv.owner, conv.id, **_region_fields(conv, prompt, region))
            entry = RegionEntry(number, conv.image_key, prompt, grounded_at(number), region)
            conv.regions[number] = entry
            conv.new_regions.append(number)
        return entry

    def refine_region(self, conv: Conversation, number: int, prompt: Prompt) -> RegionEntry:
        """Re-segment a region with a new prompt (say, plus a negative point), keeping its number.

        Only regions no question has used yet: a sent turn's grounding lines are frozen.
        """
        with conv.lock:
            entry = conv.regions.get(number)
            if entry is None or entry.removed:
                raise ConversationError(f"unknown region <region{number}>")
            if number not in conv.new_regions:
                raise ConversationError(f"<region{number}> was already used in a question; add a new region instead")
        region, grounded_at = self._segment(conv, prompt)
        with conv.lock:
            if self.store is not None:
                self.store.update_region(conv.owner, conv.id, number, **_region_fields(conv, prompt, region))
            entry = RegionEntry(number, conv.image_key, prompt, grounded_at(number), region)
            conv.regions[number] = entry
        return entry

    def _segment(self, conv: Conversation, prompt: Prompt):
        """TAP's region for `prompt` on the current image, and a function giving its grounding line for a number."""
        if conv.image_key is None:
            raise ConversationError("add an image before adding regions")
        if not isinstance(prompt, Prompt):
            raise ConversationError("a region needs a Prompt (point, box or scribble)")
        with self._lock:
            self._ensure_image(conv)
            region, = self.predictor.predict([prompt], image=conv.image_key)
            w, h = self.predictor.size_of(conv.image_key)
        if not region.mask.any():
            raise ConversationError("TAP found no region there; try another point or a box")
        return region, lambda number: GroundedRegion.from_pixels(number, region.concept, region.concept_prob,
                                                                 region.bbox, region.area, region.caption, w, h)

    def remove_region(self, conv: Conversation, number: int) -> None:
        with conv.lock:
            if number not in conv.regions:
                raise ConversationError(f"unknown region <region{number}>")
            if self.store is not None:
                self.store.remove_region(conv.owner, conv.id, number)
            conv.regions[number].removed = True
            if number in conv.new_regions:
                conv.new_regions.remove(number)

    def undo(self, conv: Conversation, turns: int = 1) -> list[TurnEntry]:
        """Forget the last `turns` questions and answers (in the store too); their regions count as new again."""
        with conv.lock:
            if turns < 1 or not conv.turns:
                raise ConversationError("there is nothing to undo")
            keep = max(0, len(conv.turns) - turns)
            gone = conv.turns[keep:]
            if self.store is not None:
                users = [m for m in self.store.get_conversation(conv.owner, conv.id).messages if m.role == "user"]
                if keep < len(users):
                    self.store.truncate(conv.owner, conv.id, users[keep].idx)
            del conv.turns[keep:]
            live = {r.number for r in conv.active_regions() if r.image_key == conv.image_key}
            back = {n for t in gone for n in t.regions if n in live}
            conv.new_regions[:] = sorted(set(conv.new_regions) | back)
        self.kv.drop(conv.id)
        return gone

    # ------------------------------------------------------------------------------------------ answering
    def ask(self, conv: Conversation, text: str, settings: GenerationSettings | None = None) -> Reply:
        stream = self.stream(conv, text, settings)
        stream.text()
        return stream.reply

    def stream(self, conv: Conversation, text: str, settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> ReplyStream:
        """Start answering; validation errors raise here, before anything is stored."""
        settings = settings or GenerationSettings()
        cancel = cancel or threading.Event()
        text = clean_message(text)
        with conv.lock:
            numbers = turn_regions(conv, text)
            stale = [n for n in numbers if conv.regions[n].image_key != conv.image_key]
            if stale:
                raise ConversationError(f"<region{stale[0]}> belongs to an earlier image; add it again on this one")
            grounded = [conv.regions[n].grounded for n in numbers]
        if not grounded and conv.image_key is not None:
            grounded = self.scene_regions(conv)
        visual = self.mode == "tapchat" and conv.image_key is not None
        plan = plan_prompt(conv, text, grounded, visual=visual, count=self._count,
                           max_context=self.config.max_context, max_new_tokens=settings.max_new_tokens)
        reply = Reply(dropped_turns=plan.dropped_turns, regions=plan.region_numbers)
        run = GenerationSettings(**{**settings.to_dict(), "max_new_tokens": plan.max_new_tokens})
        return ReplyStream(self._generate(conv, text, plan, run, settings, reply, cancel, visual), reply, cancel)

    def _generate(self, conv, text, plan, run, settings, reply: Reply, cancel, visual) -> Iterator[str]:
        with conv.lock:
            turn = TurnEntry(text, plan.user_prompt, conv.image_key, plan.region_numbers)
            conv.turns.append(turn)
            conv.new_regions.clear()
            if self.store is not None:
                self.store.append_message(conv.owner, conv.id, "user", text, prompt=plan.user_prompt,
                                          image_sha=conv.image_sha, regions=plan.region_numbers)
                turn.message_id = self.store.append_message(
                    conv.owner, conv.id, "assistant", "", image_sha=conv.image_sha, regions=plan.region_numbers,
                    model=self.model_id, settings=settings.to_dict(), complete=False)
        ids: list[int] = []
        emitted, saved_at, start = "", time.monotonic(), time.monotonic()
        member = None
        try:
            with self._lock:
                self._ensure_image(conv)
                tokens = self._tokenize(plan.text)
                vis = self._visual_tokens(conv.image_key) if visual else None
                entry = self.kv.take(conv.id)
                reply.prompt_tokens = self.chat.prompt_length(tokens)
            member = self.decoder.join(tokens, vis, run, prefix=entry, image_key=conv.image_key, cancel=cancel,
                                       max_context=self.config.max_context, text=plan.text)
            # The lock is taken per step inside `next`, never held across a yield: the reader may resume this
            # generator from another thread (Gradio does), and other requests get the model between tokens.
            while True:
                t = self.decoder.next(member)
                if t is None:  # max_new_tokens or cancelled: complete (if cut) unless cancelled
                    reply.complete = not cancel.is_set()
                    break
                if reply.first_token_s is None:
                    reply.first_token_s = time.monotonic() - start
                    reply.reused_tokens = entry.reused
                if t == self.chat.eos_id:
                    reply.complete = True
                    break
                ids.append(t)
                piece = self._new_text(ids, emitted)
                if piece:
                    emitted += piece
                    turn.answer = emitted
                    yield piece
                if self.store is not None and time.monotonic() - saved_at > SAVE_EVERY_S:
                    self.store.update_message(conv.owner, turn.message_id, emitted.strip(), complete=False)
                    saved_at = time.monotonic()
            with self._lock:
                self.kv.put(conv.id, self.decoder.leave(member))
        except GeneratorExit:  # the caller stopped reading: keep what was said, marked incomplete
            if member is not None:
                with self._lock:
                    self.decoder.leave(member)
            self._finish(conv, turn, reply, ids)
            raise
        except Exception as exc:
            if member is not None:
                with self._lock:
                    self.decoder.leave(member)
            self.kv.drop(conv.id)
            self._finish(conv, turn, reply, ids)
            cause = str(exc) if isinstance(exc, ServerError) else \
                f"the model failed while answering ({type(exc).__name__}: {exc})"
            raise GenerationError(f"{cause}; the partial answer was kept") from exc
        reply.cancelled = cancel.is_set() and not reply.complete
        reply.total_s = time.monotonic() - start
        self._finish(conv, turn, reply, ids)

    def _finish(self, conv: Conversation, turn: TurnEntry, reply: Reply, ids: list[int]) -> None:
        """Record the answer (complete or not) in the reply, the conversation and the store."""
        reply.new_tokens = len(ids)
        reply.text = turn.answer = self.chat.tokenizer.decode(ids, skip_special_tokens=True).strip()
        turn.complete = reply.complete
        if self.store is not None and turn.message_id is not None:
            self.store.update_message(conv.owner, turn.message_id, reply.text, complete=reply.complete)

    def _new_text(self, ids: list[int], emitted: str) -> str:
        """Text added by the latest token; held back while it ends in an incomplete UTF-8 sequence."""
        text = self.chat.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        return "" if text.endswith("\ufffd") else text[len(emitted):]

    # -------------------------------------------------------------------------------------------- batches
    def answer_batch(self, items: Sequence[BatchItem], settings: GenerationSettings | None = None, *,
                     batch_size: int = 16) -> list[str]:
        """Single-turn answers to many questions, generated `batch_size` at a time (left padding)."""
        settings = settings or GenerationSettings()
        prepared, keys = [], {}
        for item in items:
            conv = Conversation(uuid.uuid4().hex, "batch")  # never stored
            if item.image is not None:
                with self._lock:  # the same image object is hashed and loaded once per call
                    if id(item.image) not in keys or not self.predictor.is_cached(keys[id(item.image)]):
                        keys[id(item.image)] = self.predictor.set_image(item.image)
                    conv.image_key = keys[id(item.image)]
            regions = [self._region_only(conv, p, n + 1) for n, p in enumerate(item.prompts)]
            grounded = regions or (self.scene_regions(conv) if conv.image_key else [])
            visual = self.mode == "tapchat" and conv.image_key is not None
            plan = plan_prompt(conv, clean_message(item.question), grounded, visual=visual, count=self._count,
                               max_context=self.config.max_context, max_new_tokens=settings.max_new_tokens)
            with self._lock:
                vis = self._visual_tokens(conv.image_key) if visual else None
            prepared.append((self._tokenize(plan.text), vis, plan.max_new_tokens, plan.text))
        if isinstance(self.decoder, ServerLLM):
            return self._answer_on_server(prepared, settings, batch_size)
        answers: list[str] = [""] * len(prepared)
        # same image together (their shared prefix is computed once), then similar lengths (least padding)
        order = sorted(range(len(prepared)), key=lambda i: (id(prepared[i][1]), len(prepared[i][0])))
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            run = GenerationSettings(**{**settings.to_dict(),
                                        "max_new_tokens": min(prepared[i][2] for i in idx)})
            with self._lock:
                steps = list(decode(self.chat, [prepared[i][0] for i in idx], [prepared[i][1] for i in idx], run,
                                    max_context=self.config.max_context))
            for r, i in enumerate(idx):
                row = [int(step[r]) for step in steps]
                row = row[:row.index(self.chat.eos_id)] if self.chat.eos_id in row else row
                answers[i] = self.chat.tokenizer.decode(row, skip_special_tokens=True).strip()
        return answers

    def _answer_on_server(self, prepared: list, settings: GenerationSettings, concurrency: int) -> list[str]:
        """Benchmark answers from the LLM server: `concurrency` requests in flight, batched there."""
        def one(item) -> str:
            ids, vis, limit, text = item
            run = GenerationSettings(**{**settings.to_dict(), "max_new_tokens": limit})
            request = self.decoder.join(ids, vis, run, image_key=None, cancel=threading.Event(),
                                        max_context=self.config.max_context, text=text)
            row = []
            while (t := self.decoder.next(request)) is not None and t != self.chat.eos_id:
                row.append(t)
            return self.chat.tokenizer.decode(row, skip_special_tokens=True).strip()

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(one, prepared))

    # ------------------------------------------------------------------------------------------- internals
    def _count(self, text: str) -> int:
        return self.chat.prompt_length(self._tokenize(text))

    def _tokenize(self, text: str) -> list[int]:
        """Tokenize, remembering the last text: planning counts the prompt it then runs."""
        last = self._last_tokens
        if last is None or last[0] != text:
            last = self._last_tokens = (text, self.chat.tokenize(text))
        return list(last[1])

    def _ensure_image(self, conv: Conversation) -> None:
        """Re-encode the conversation's image if the predictor's feature cache evicted it."""
        if conv.image_key is None or self.predictor.is_cached(conv.image_key):
            return
        if self.store is None or conv.image_sha is None:
            raise ConversationError("the image is no longer cached; set it again")
        conv.image_key = self.predictor.set_image(self.store.image_path(conv.image_sha))

    def _region_only(self, conv: Conversation, prompt: Prompt, number: int) -> GroundedRegion:
        with self._lock:
            region, = self.predictor.predict([prompt], image=conv.image_key)
            w, h = self.predictor.size_of(conv.image_key)
        return GroundedRegion.from_pixels(number, region.concept,
                                          region.concept_prob, region.bbox, region.area, region.caption, w, h)

    def _visual_tokens(self, key: str) -> torch.Tensor:
        tokens = self._visual.get(key)
        if tokens is None:
            tokens = self._visual.put(key, self.chat.visual_tokens(self.predictor.trunk_features(key))[0])
        return tokens

    def candidates(self, conv: Conversation, max_regions: int = 16, **options) -> list[Region]:
        """TAP's segment-everything regions of the current image (masks included), best first.

        `options` go to `TapPredictor.segment_everything` (grid size, thresholds).
        """
        if conv.image_key is None:
            raise ConversationError("add an image first")
        with self._lock:
            self._ensure_image(conv)
            return self.predictor.segment_everything(key=conv.image_key, max_regions=max_regions, **options)

    def scene_regions(self, conv: Conversation) -> list[GroundedRegion]:
        """TAP's top segment-everything regions as `<sceneN>` lines (cached per image); none if disabled."""
        k = self.config.num_scene_regions
        if k <= 0 or conv.image_key is None:
            return []
        key = conv.image_key
        with self._lock:
            scene = self._scene.get(key)
            if scene is None:
                regions = self.candidates(conv, k)
                w, h = self.predictor.size_of(key)
                scene = self._scene.put(key, [GroundedRegion.from_pixels(i + 1, r.concept, r.concept_prob, r.bbox,
                                                                         r.area, r.caption, w, h, kind="scene")
                                              for i, r in enumerate(regions)])
            return scene


def _region_fields(conv: Conversation, prompt: Prompt, region) -> dict:
    return {"image_sha": conv.image_sha, "prompt": prompt.to_dict(), "mask": rle.encode(region.mask),
            "box": list(region.bbox), "concept": region.concept, "prob": region.concept_prob, "iou": region.iou,
            "caption": region.caption}


def _grounded_from_record(rec) -> GroundedRegion:
    mask = rle.decode(rec.mask) if rec.mask else np.zeros((1, 1), bool)
    h, w = mask.shape
    return GroundedRegion.from_pixels(rec.number, rec.concept or "", rec.prob or 0.0, mask_bbox(mask),
                                      float(mask.mean()), rec.caption or "", w, h)


def _image_bytes(image: DecodedImage) -> tuple[bytes, str]:
    """The original file bytes when we have them (kept as uploaded), else a PNG encoding."""
    if image.data is not None:
        return image.data, image.format
    buf = io.BytesIO()
    Image.fromarray(image.rgb).save(buf, format="PNG")
    return buf.getvalue(), "png"


def _load_encoder_blocks(predictor: TapPredictor, state: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's tuned image-encoder weights into TAP (keys relative to the image encoder)."""
    encoder = predictor.model.image_encoder
    own = encoder.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise TapError(f"tuned encoder weights do not fit {predictor.model.config.name}: {', '.join(bad[:5])}")
    encoder.load_state_dict(state, strict=False)
    predictor.clear_cache()
