"""`Assistant`: the loaded models that the CLI, the app, LangChain and the benchmark harness share.

It holds the TAP predictor (regions, image features), the chat model, the decode lane, the caches shared across
conversations (visual tokens, scene regions, KV prefixes) and, optionally, the history store. Each conversation is
a `Session` (session.py) that borrows them. Model work is serialised by one first-come-first-served lock, taken
per decode step; answers being written at the same time decode together as one batch (`batching.Batcher`).
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokenizer_tap.cache import BoundedCache
from tokenizer_tap.errors import TapError
from tokenizer_tap.image_io import DecodedImage, ImageSource, load_image
from tokenizer_tap.predictor import TapPredictor
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.region import Region
from tokenizer_tap.vocabulary import concepts_in, match_query

from . import loading
from .batching import Batcher
from .config import ChatConfig
from .decoding import End, GenerationSettings, PrefixCache, Request, Token, run
from .fairlock import FairRLock
from .model import ChatModel
from .remote import ServerLLM
from .reply import Reply, ReplyStream
from .session import Session
from .template import ConversationError, Turn, clean_message, plan_prompt
from .warmup import Warmup


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
        chat = bot.start(image="photo.jpg")  # a Session: one conversation
        chat.add_region(Prompt.point(120, 340))
        print(chat.ask("What is <region1> doing?").text)
    """

    def __init__(self, predictor: TapPredictor, chat: ChatModel, store=None, *,
                 cache_bytes: int = 2 << 30, model_id: str = "", llm_server: ServerLLM | None = None,
                 warm_image_prefix: bool = True) -> None:
        self.predictor, self.chat, self.store = predictor, chat, store
        self.config: ChatConfig = chat.config
        self.model_id = model_id or f"{self.config.mode}:{self.config.tap_model}+{self.config.llm}"
        self.kv = PrefixCache(cache_bytes)
        self._lock = FairRLock()  # per decode step; a click waits for one step, not for the whole answer
        # concurrent answers decode together, here or on an LLM server
        self.decoder: Batcher | ServerLLM = llm_server or Batcher(chat, self._lock)
        self._visual: BoundedCache[str, torch.Tensor] = BoundedCache("assistant.visual_tokens", 8)
        self._scene: BoundedCache[str, list[Region]] = BoundedCache("assistant.scene_regions", 8)
        self._last_tokens: tuple[str, list[int]] | None = None
        self._sessions: BoundedCache[tuple[str, str], Session] = BoundedCache("assistant.open_sessions", 256)
        self._pixels: BoundedCache[str, np.ndarray] = BoundedCache("assistant.decoded_images", 8)
        # a new image's prompt start is computed while the user clicks or types (tapchat mode, local decoding)
        self.warm_image_prefix = warm_image_prefix
        self.warmup = Warmup(chat, self._lock, self.kv, self._visual_tokens)
        if chat.encoder_state:
            _load_encoder_blocks(predictor, chat.encoder_state)

    # ---------------------------------------------------------------------------------------- construction
    # Aliases of assistant/loading.py, where every front end loads the models (the README shows these names).
    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, **options: Any) -> Assistant:
        """A checkpoint folder (tapchat or grounded), or with none, grounded mode on public weights; `options` as
        `loading.from_pretrained` takes them (tap_model, llm, device, dtype, store, llm_server ...)."""
        return loading.from_pretrained(cls, checkpoint, **options)

    @classmethod
    def from_options(cls, options: Any, store=None) -> Assistant:
        """The models `add_model_options` names (a Namespace, the app's AppConfig): `loading.load`, no fallback."""
        return loading.load(cls, options, store).assistant

    @classmethod
    def demo(cls, **options: Any) -> Assistant:
        """The demo models, trained on synthetic scenes (`loading.demo`: store, device, folder)."""
        return loading.demo(cls, **options)

    @classmethod
    def tiny(cls, mode: str = "tapchat", **options: Any) -> Assistant:
        """Small random models, no download, gibberish answers (`loading.tiny`: store, seed, lora, tiny_llm ...)."""
        return loading.tiny(cls, mode, **options)

    @property
    def mode(self) -> str:
        """`grounded` or `tapchat` (from the checkpoint): whether prompts carry visual tokens."""
        return self.config.mode

    # ------------------------------------------------------------------------------------------- sessions
    def start(self, owner: str = "local", image: ImageSource | None = None, title: str = "New chat") -> Session:
        """A new conversation (stored, when a store is attached), optionally with its first image."""
        conv_id = self.store.create_conversation(owner, title) if self.store else uuid.uuid4().hex
        session = self._sessions.put((owner, conv_id), Session(self, conv_id, owner, title))
        if image is not None:
            session.set_image(image)
        return session

    def open(self, owner: str, conv_id: str) -> Session:
        """A stored conversation, live: the open session, or restored (image, regions, turns) from the store."""
        session = self._sessions.get((owner, conv_id))
        if session is not None:
            return session
        rec = self._require_store().get_conversation(owner, conv_id)
        session = Session(self, conv_id, owner, rec.info.title)
        sha = next((m.image_sha for m in reversed(rec.messages) if m.image_sha), None)
        sha = sha or next((r.image for r in reversed(rec.regions) if r.image), None)
        if sha:
            session.image_key, session.image_sha = self.predictor.set_image(self.store.image_path(sha)), sha

        def key(image_sha: str | None) -> str | None:
            """Earlier images keep their sha as key: they are not encoded unless made current again."""
            return session.image_key if image_sha is not None and image_sha == sha else image_sha

        for region in rec.regions:  # their masks stay encoded until something draws them
            region.image = key(region.image)
            session.regions[region.number] = region
        for turn in rec.turns():
            turn.image = key(turn.image)
            session.turns.append(turn)
        return self._sessions.put((owner, conv_id), session)

    def live(self, owner: str, conv_id: str) -> Session | None:
        """The conversation's session if it is open (never restores one)."""
        return self._sessions.get((owner, conv_id))

    def conversations(self, owner: str, query: str = "", limit: int = 100) -> list:
        """The owner's stored conversations, newest activity first; with `query`, those matching it."""
        store = self._require_store()
        return store.search(owner, query, limit) if query.strip() else store.list_conversations(owner, limit)

    def delete(self, owner: str, conv_id: str) -> None:
        """Delete a stored conversation, and its live session and KV prefix."""
        self._require_store().delete(owner, conv_id)
        self._sessions.pop((owner, conv_id))
        self.warmup.forget(conv_id)

    def pixels(self, sha: str) -> np.ndarray:
        """A stored image, decoded once and kept for the few most recent images (every redraw needs it)."""
        pixels = self._pixels.get(sha)
        if pixels is None:
            pixels = load_image(self._require_store().image_path(sha), max_pixels=1 << 40)
            pixels.flags.writeable = False  # shared by every redraw
            self._pixels.put(sha, pixels)
        return pixels

    def forget(self, session: Session) -> None:
        """Drop a deleted conversation's live session and its KV prefix."""
        self._sessions.pop((session.owner, session.id))
        self.warmup.forget(session.id)

    # Thin aliases of the session's own methods (the README's first examples call them on the Assistant).
    def set_image(self, conv: Session, image: ImageSource) -> str:
        """Same as `conv.set_image(image)`: later questions refer to this image; returns its content key."""
        return conv.set_image(image)

    def add_region(self, conv: Session, prompt: Prompt) -> Region:
        """Same as `conv.add_region(prompt)`: the region, numbered `<regionN>` for the whole conversation."""
        return conv.add_region(prompt)

    def refine_region(self, conv: Session, number: int, prompt: Prompt) -> Region:
        """Same as `conv.refine_region`: only a region that no question has used yet can be re-segmented."""
        return conv.refine_region(number, prompt)

    def remove_region(self, conv: Session, number: int) -> None:
        """Same as `conv.remove_region`: the number stays taken and later turns no longer carry the region."""
        conv.remove_region(number)

    def undo(self, conv: Session, turns: int = 1) -> list[Turn]:
        """Same as `conv.undo`: forget the last `turns` exchanges (in the store too) and return them."""
        return conv.undo(turns)

    def ask(self, conv: Session, text: str, settings: GenerationSettings | None = None,
            find: bool | None = None) -> Reply:
        """Same as `conv.ask`: blocks until the whole answer is written; the `Reply` has the text and its costs."""
        return conv.ask(text, settings, find)

    def stream(self, conv: Session, text: str, settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, find: bool | None = None) -> ReplyStream:
        """Same as `conv.stream`: iterate for text pieces; set `cancel` (or call `cancel()`) to stop early."""
        return conv.stream(text, settings, cancel, find)

    def candidates(self, conv: Session, max_regions: int = 16, **options) -> list[Region]:
        """Same as `conv.candidates`: the current image's segment-everything regions, to `adopt` from."""
        return conv.candidates(max_regions, **options)

    # ------------------------------------------------------------------------- what sessions borrow (models)
    def encode_image(self, image: DecodedImage, owner: str) -> tuple[str, str | None]:
        """Encode `image` (features cached by content) and store its file; returns (content key, stored sha)."""
        with self._lock:
            key = self.predictor.set_image(image)
        if self.store is None:
            return key, None
        data, fmt = _image_bytes(image)
        w, h = self.predictor.size_of(key)
        sha = self.store.add_image(owner, data, width=w, height=h, format=fmt)
        if image.data is not None:  # decoded here from file bytes, so ours: the page's redraws share it
            image.rgb.flags.writeable = False
            self._pixels.put(sha, image.rgb)
        return key, sha

    def predict(self, session: Session, prompt: Prompt) -> Region:
        """TAP's region for one prompt on the session's image."""
        with self._lock:
            self._ensure_image(session)
            region, = self.predictor.predict([prompt], image=session.image_key)
            return region

    def segment_everything(self, session: Session, max_regions: int = 16, **options) -> list[Region]:
        """TAP's segment-everything regions of the session's image (masks included), best first.

        `options` go to `TapPredictor.segment_everything` (grid size, thresholds).
        """
        with self._lock:
            self._ensure_image(session)
            return self.predictor.segment_everything(key=session.image_key, max_regions=max_regions, **options)

    def find(self, session: Session, query: str, **options: Any) -> list[Region]:
        """TAP's instances of the concepts `query` names on the session's image, best first (`TapPredictor.find`:
        the image's grid is decoded once, later queries only rank it)."""
        with self._lock:
            self._ensure_image(session)
            return self.predictor.find(query, key=session.image_key, **options)

    def concepts_in(self, text: str) -> list[str]:
        """The vocabulary concepts a question names: what a find-grounded turn looks for."""
        projector = self.predictor.model.concept_projector
        return concepts_in(text, projector.names) if projector.loaded else []

    def find_counts(self, query: str, found: Sequence[Region]) -> dict[str, int]:
        """Instances per concept `query` names, in query order, zeros included ("0 × dog" says it was looked for);
        UnknownConceptError as `find` for a query naming nothing known."""
        names = match_query(query, self.predictor.model.concept_projector.names)
        return {name: sum(r.concept == name for r in found) for name in names}

    def scene_regions(self, session: Session) -> list[Region]:
        """TAP's top segment-everything regions as `<sceneN>` lines (cached per image); none if disabled."""
        k = self.config.num_scene_regions
        key = session.image_key
        if k <= 0 or key is None:
            return []
        with self._lock:
            scene = self._scene.get(key)
            if scene is None:
                self._ensure_image(session)
                scene = self.predictor.segment_everything(key=key, max_regions=k)
                for rank, region in enumerate(scene, 1):
                    region.number, region.kind, region.image = rank, "scene", key
                self._scene.put(key, scene)
            return scene

    def prepare(self, session: Session, text: str, visual: bool, settings: GenerationSettings,
                cancel: threading.Event) -> Request:
        """The decode request for a session's planned prompt, extending the KV prefix of its last turn (or of its
        image's warm-up, waited for here: outside the lock, which the warm-up takes per chunk)."""
        self.warmup.wait(session)
        with self._lock:
            self._ensure_image(session)
            return Request(self._tokenize(text), self._visual_tokens(session.image_key) if visual else None,
                           settings, text, session.image_key, self.kv.take(session.id), cancel,
                           self.config.max_context)

    def warm(self, session: Session) -> None:
        """Start computing the prompt start every first question about the session's image shares, in the background
        (`warmup.Warmup`), so that the question prefills only its own tokens. Only where it pays: tapchat mode
        (grounded prompts have no image tokens) and local decoding (an LLM server caches prefixes itself)."""
        if self.warm_image_prefix and self.mode == "tapchat" and isinstance(self.decoder, Batcher):
            self.warmup.start(session)

    def decode(self, requests: Sequence[Request], window: int | None = None) -> Iterator[Token | End]:
        """The one decode loop (`decoding.run`) on this assistant's lane: local batching or the LLM server."""
        return run(self.decoder, requests, eos_id=self.chat.eos_id, lock=self._lock, window=window)

    def new_text(self, ids: list[int], emitted: str) -> str:
        """Text added by the latest token; held back while it ends in an incomplete UTF-8 sequence."""
        text = self.chat.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        return "" if text.endswith("\ufffd") else text[len(emitted):]

    def count(self, text: str) -> int:
        """The positions a rendered prompt occupies (visual tokens included)."""
        return self.chat.prompt_length(self._tokenize(text))

    # -------------------------------------------------------------------------------------------- batches
    def answer_batch(self, items: Sequence[BatchItem], settings: GenerationSettings | None = None, *,
                     batch_size: int = 16, find: bool = False) -> list[str]:
        """Single-turn answers to many questions, `batch_size` in flight at a time, through the one decode loop.

        Questions about the same image share their prefix (system text, template, image): it is computed once, and
        the questions are prefilled on top of it as one block. `find` grounds each question's concepts with every
        instance TAP finds; off by default, so benchmark prompts stay as the paper's.
        """
        settings = settings or GenerationSettings()
        keys: dict[int, str] = {}  # image object -> content key: each image is hashed and encoded once per call
        requests = [self._single_turn(item, settings, keys, find) for item in items]
        # same image together (their shared prefix is computed once), then similar lengths (least padding)
        order = sorted(range(len(requests)), key=lambda i: (id(requests[i].visual), len(requests[i].ids)))
        if isinstance(self.decoder, Batcher):
            self._share_prefixes([requests[i] for i in order])
        rows: list[list[int]] = [[] for _ in requests]
        for event in self.decode([requests[i] for i in order], window=batch_size):
            if isinstance(event, Token):
                rows[order[event.index]].append(event.token)
        return [self.chat.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]

    def _single_turn(self, item: BatchItem, settings: GenerationSettings, keys: dict[int, str],
                     find: bool) -> Request:
        """A benchmark question as a decode request (a conversation of one turn, never stored)."""
        conv = Session(self, uuid.uuid4().hex, "batch")  # never stored or registered
        if item.image is not None:
            with self._lock:  # the same image object is hashed and loaded once per call
                if id(item.image) not in keys or not self.predictor.is_cached(keys[id(item.image)]):
                    keys[id(item.image)] = self.predictor.set_image(item.image)
                conv.image_key = keys[id(item.image)]
        regions = [conv.keep(self.predict(conv, p)) for p in item.prompts]  # numbered as a chat numbers them
        question = clean_message(item.question)  # may carry its own region lines: its mentions are not checked
        grounded, found = conv.add_found(question, regions, find)
        visual = self.mode == "tapchat" and conv.image_key is not None
        plan = plan_prompt([], conv.image_key, question, grounded, visual=visual, count=self.count,
                           max_context=self.config.max_context, max_new_tokens=settings.max_new_tokens, found=found)
        with self._lock:
            vis = self._visual_tokens(conv.image_key) if visual else None
        run_settings = GenerationSettings(**{**settings.to_dict(), "max_new_tokens": plan.max_new_tokens})
        return Request(self._tokenize(plan.text), vis, run_settings, plan.text, conv.image_key,
                       max_context=self.config.max_context, keep_prefix=False)

    def _share_prefixes(self, requests: list[Request]) -> None:
        """Give each run of requests about the same image one computed prefix, shared (not copied) by them; the
        prefixes of all runs are computed together where they have the same length (one forward, a row each)."""
        runs, start = [], 0
        while start < len(requests):
            end = start
            while end < len(requests) and requests[end].visual is requests[start].visual:
                end += 1
            group, first, n = requests[start:end], requests[start].ids, 0
            while len(group) > 1 and all(len(r.ids) > n + 1 and r.ids[n] == first[n] for r in group):
                n += 1  # leave >= 1 token per request
            if n >= 16:  # not worth a separate forward below that
                runs.append((group, n))
            start = end
        by_length: dict[int, list[tuple[list[Request], int]]] = {}
        for group, n in runs:
            by_length.setdefault(n, []).append((group, n))
        for same in by_length.values():
            with self._lock:
                shared = self.decoder.prefill([(g[0].ids[:n], g[0].visual, g[0].image_key) for g, n in same])
            for (group, n), prefix in zip(same, shared, strict=True):
                for r in group:
                    r.shared, r.shared_tokens = prefix, n

    # ------------------------------------------------------------------------------------------- internals
    def _require_store(self):
        if self.store is None:
            raise ConversationError("no history store is attached")
        return self.store

    def _tokenize(self, text: str) -> list[int]:
        """Tokenize, remembering the last text: planning counts the prompt it then runs."""
        last = self._last_tokens
        if last is None or last[0] != text:
            last = self._last_tokens = (text, self.chat.tokenize(text))
        return list(last[1])

    def _ensure_image(self, conv: Session) -> None:
        """Re-encode the conversation's image if the predictor's feature cache evicted it."""
        if conv.image_key is None or self.predictor.is_cached(conv.image_key):
            return
        if self.store is None or conv.image_sha is None:
            raise ConversationError("the image is no longer cached; set it again")
        conv.image_key = self.predictor.set_image(self.store.image_path(conv.image_sha))

    def _visual_tokens(self, key: str) -> torch.Tensor:
        tokens = self._visual.get(key)
        if tokens is None:
            tokens = self._visual.put(key, self.chat.visual_tokens(self.predictor.trunk_features(key))[0])
        return tokens


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
