"""`ChatService`: everything the app does, per owner, with no Gradio in it (the UI and the API both call it).

Every method takes the owner first and only ever touches that owner's conversations: the store answers "not
found" for anyone else's. Errors a user can cause come out as `UserError` with a message meant for people.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from assistant.conversation import Conversation
from assistant.engine import Assistant, ReplyStream
from assistant.generation import GenerationSettings
from assistant.rle import decode as rle_decode
from tokenizer_tap.cache import BoundedCache
from tokenizer_tap.image_io import decode_image, load_image
from tokenizer_tap.predictor import Region
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.transforms import mask_bbox
from tokenizer_tap.visualize import anchor, annotate, colour, tint

from .config import AppConfig
from .errors import UserError, friendly

DEFAULT_TITLE = "New chat"
TITLE_CHARS = 48
MAX_NEW_TOKENS = 1024
EVERYTHING_REGIONS = 16
OVERLAY_CACHE = 8  # chats whose tinted overlay is kept (one image-sized array each)
REGION_CACHE = 1024  # decoded region masks and their label anchors (one image-sized bool array each)


@dataclass(frozen=True)
class RegionView:
    """A region as the page shows it: a numbered chip in the overlay's colour."""

    number: int
    concept: str
    prob: float
    caption: str
    box: list[int] | None
    area_percent: float
    colour: str

    @property
    def ref(self) -> str:
        return f"<region{self.number}>"

    def chip(self) -> str:
        text = f"{self.ref} {self.concept} {self.prob:.2f}"
        return f"{text} — {self.caption}" if self.caption else text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ref": self.ref}


@dataclass(frozen=True)
class MessageView:
    role: str
    text: str
    complete: bool = True
    regions: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChatSnapshot:
    """What it takes to redraw a conversation exactly."""

    conversation_id: str
    title: str
    image: np.ndarray | None
    regions: list[RegionView]
    messages: list[MessageView]

    def to_dict(self) -> dict[str, Any]:
        return {"conversation_id": self.conversation_id, "title": self.title,
                "image_size": None if self.image is None else [int(self.image.shape[1]), int(self.image.shape[0])],
                "regions": [r.to_dict() for r in self.regions], "messages": [asdict(m) for m in self.messages]}


class ChatService:
    """The app's behaviour over one shared `Assistant` (models loaded once, history in its store)."""

    def __init__(self, assistant: Assistant, config: AppConfig, max_open: int = 256) -> None:
        if assistant.store is None:
            raise ValueError("the app needs an Assistant with a history store")
        self.bot, self.store, self.config = assistant, assistant.store, config
        # Every cache of the page, with its bound (segment-everything results live as long as their open chat)
        self._everything: dict[tuple[str, str], tuple[str, list[Region]]] = {}
        self._open: BoundedCache[tuple[str, str], Conversation] = BoundedCache(
            "app.open_chats", max_open, on_evict=lambda key, _: self._everything.pop(key, None))
        self._masks: BoundedCache[tuple[str, int], tuple[str | None, np.ndarray]] = BoundedCache(
            "app.region_masks", REGION_CACHE)
        self._anchors: BoundedCache[tuple[str, int], tuple[np.ndarray, tuple[int, int] | None]] = BoundedCache(
            "app.label_anchors", REGION_CACHE)
        self._tinted: BoundedCache[str, tuple[str | None, list[np.ndarray], np.ndarray]] = BoundedCache(
            "app.tinted_overlays", OVERLAY_CACHE)
        self._images: BoundedCache[str, np.ndarray] = BoundedCache("app.decoded_images", OVERLAY_CACHE)
        self._running: dict[tuple[str, str], threading.Event] = {}  # chats with an answer being written
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------------- conversations
    @friendly
    def new_chat(self, owner: str) -> str:
        conv = self.bot.start(owner, title=DEFAULT_TITLE)
        self._remember(conv)
        return conv.id

    @friendly
    def history(self, owner: str, query: str = "", limit: int = 100) -> list[dict[str, Any]]:
        """The owner's conversations, newest activity first (search: words in messages or the title)."""
        infos = self.store.search(owner, query, limit) if query.strip() else self.store.list_conversations(owner, limit)
        return [{"id": i.id, "title": i.title, "updated": i.updated, "messages": i.message_count} for i in infos]

    @friendly
    def rename(self, owner: str, cid: str, title: str) -> None:
        title = (title or "").strip()
        if not title:
            raise UserError("A title cannot be empty.")
        self.store.rename(owner, cid, title)
        self.conversation(owner, cid).title = title

    @friendly
    def delete(self, owner: str, cid: str) -> None:
        self.store.delete(owner, cid)
        with self._lock:
            self._open.pop((owner, cid))
            self._everything.pop((owner, cid), None)
        self.bot.kv.drop(cid)

    @friendly
    def snapshot(self, owner: str, cid: str, image: bool = True) -> ChatSnapshot:
        """The chat as stored; `image=False` skips decoding the image (redrawing the chat while it streams)."""
        conv = self.conversation(owner, cid)
        pixels = None
        if image and conv.image_sha is not None:
            pixels = self._pixels(conv.image_sha)
        messages: list[MessageView] = []
        for turn in conv.turns:
            messages.append(MessageView("user", turn.text, True, tuple(turn.regions)))
            messages.append(MessageView("assistant", turn.answer, turn.complete, tuple(turn.regions)))
        return ChatSnapshot(conv.id, conv.title, pixels, self.regions(conv), messages)

    def conversation(self, owner: str, cid: str) -> Conversation:
        """The live conversation, restored from the store on first use (raises NotFoundError for others')."""
        if not isinstance(cid, str) or not cid:
            raise UserError("Start a chat first: upload an image or press New chat.")
        conv = self._open.get((owner, cid))
        if conv is not None:
            return conv
        return self._remember(self.bot.open(owner, cid))

    # -------------------------------------------------------------------------------------------- images
    @friendly
    def set_image(self, owner: str, cid: str, source: str | Path | bytes) -> ChatSnapshot:
        """Make an uploaded file the chat's current image (no `cid`: a new chat, made only if the file is good).

        Size and format are checked before the model sees the file, with messages a person can act on.
        """
        data = source if isinstance(source, bytes) else _read_upload(source, self.config.max_upload_mb)
        upload = decode_image(data, max_pixels=self.config.max_pixels)  # the only decode of this upload
        cid = cid or self.new_chat(owner)
        conv = self.conversation(owner, cid)
        self.bot.set_image(conv, upload)
        if conv.image_sha is not None:  # the page redraws it next: from these pixels, not the stored file
            upload.rgb.flags.writeable = False  # ours (decoded from bytes), shared by every redraw
            self._images.put(conv.image_sha, upload.rgb)
        return self.snapshot(owner, cid)

    # ------------------------------------------------------------------------------------------- regions
    @friendly
    def add_region(self, owner: str, cid: str, prompt: Prompt) -> RegionView:
        conv = self.conversation(owner, cid)
        entry = self.bot.add_region(conv, prompt)
        return self._view(conv, entry.number)

    @friendly
    def click(self, owner: str, cid: str, x: float, y: float, positive: bool = True) -> RegionView:
        """A positive click is a new region; a negative one carves the latest not-yet-asked-about region."""
        conv = self.conversation(owner, cid)
        if positive:
            return self.add_region(owner, cid, Prompt.point(x, y))
        latest = next((n for n in reversed(conv.new_regions) if not conv.regions[n].removed), None)
        if latest is None:
            raise UserError("A negative point refines the region you just added: click a positive point first.")
        old = conv.regions[latest].prompt
        prompt = Prompt(old.points + ((x, y),), old.labels + (0,), old.box, kind=old.kind or "point")
        self.bot.refine_region(conv, latest, prompt)
        return self._view(conv, latest)

    @friendly
    def remove_region(self, owner: str, cid: str, number: int) -> None:
        self.bot.remove_region(self.conversation(owner, cid), int(number))

    @friendly
    def segment_everything(self, owner: str, cid: str) -> list[RegionView]:
        """TAP's top regions for the whole image, numbered from 1 in this list (adopt one to make it a region)."""
        conv = self.conversation(owner, cid)
        if conv.image_key is None:
            raise UserError("Upload an image first.")
        found = self.bot.candidates(conv, EVERYTHING_REGIONS, points_per_side=self.config.everything_grid,
                                    iou_threshold=self.config.everything_min_iou)
        with self._lock:
            self._everything[(owner, cid)] = (conv.image_key, found)
        return [RegionView(i + 1, r.concept, round(r.concept_prob, 3), r.caption, _box(r.bbox),
                           round(100 * r.area, 2), _hex(colour(i))) for i, r in enumerate(found)]

    @friendly
    def everything_overlay(self, owner: str, cid: str) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]] | None:
        """The image and the segment-everything masks with labels, for `gr.AnnotatedImage`."""
        conv = self.conversation(owner, cid)
        found = self._everything.get((owner, cid))
        if found is None or found[0] != conv.image_key or conv.image_sha is None:
            return None
        image = self._pixels(conv.image_sha)
        return image, [(r.mask.astype(np.float32), f"{i + 1} {r.concept}") for i, r in enumerate(found[1])]

    @friendly
    def adopt(self, owner: str, cid: str, index: int) -> RegionView:
        """Make segment-everything candidate `index` (1-based) a region of the chat."""
        conv = self.conversation(owner, cid)
        found = self._everything.get((owner, cid))
        if found is None or found[0] != conv.image_key:
            raise UserError("Press Segment everything first.")
        if not 1 <= int(index) <= len(found[1]):
            raise UserError(f"There is no candidate {index}; pick one of 1-{len(found[1])}.")
        prompt = found[1][int(index) - 1].prompt
        return self.add_region(owner, cid, Prompt(prompt.points, prompt.labels, prompt.box, kind="everything"))

    @friendly
    def region_views(self, owner: str, cid: str) -> list[RegionView]:
        return self.regions(self.conversation(owner, cid))

    def regions(self, conv: Conversation) -> list[RegionView]:
        """The active regions of the current image, in number order."""
        return [self._view(conv, r.number) for r in conv.active_regions() if r.image_key == conv.image_key]

    @friendly
    def overlay(self, owner: str, cid: str, focus: int | None = None) -> Image.Image | None:
        """The current image with every active region tinted, outlined and numbered; `focus` stands out.

        The tinted image is kept per chat: a click that adds a region tints only the new mask onto it.
        """
        conv = self.conversation(owner, cid)
        if conv.image_sha is None:
            return None
        image = self._pixels(conv.image_sha)
        views = self.regions(conv)
        masks = [self._mask(conv, v.number) for v in views]
        cols = [colour(v.number - 1) for v in views]
        if focus in {v.number for v in views}:
            i = next(i for i, v in enumerate(views) if v.number == focus)
            rest = [j for j in range(len(views)) if j != i]
            base = tint(tint(image, [masks[j] for j in rest], [cols[j] for j in rest], alpha=0.15),
                        [masks[i]], [cols[i]], alpha=0.6)
        else:
            sha, drawn, base = self._tinted.pop(cid) or (None, [], None)
            if sha != conv.image_sha or len(drawn) > len(masks) or any(a is not b for a, b in zip(drawn, masks)):
                drawn, base = [], image
            base = tint(base, masks[len(drawn):], cols[len(drawn):])
            self._tinted.put(cid, (conv.image_sha, masks, base))
        anchors = [self._anchor(conv.id, v.number, m) for v, m in zip(views, masks)]
        # labels at 1/24 of the shorter side: still readable when the page shows the image scaled down
        return annotate(Image.fromarray(base), anchors, [f"{v.number} {v.concept}" for v in views], cols,
                        size=max(14, min(image.shape[:2]) // 24))

    # ------------------------------------------------------------------------------------------ chatting
    @friendly
    def stream(self, owner: str, cid: str, text: str, temperature: float = 0.0,
               max_new_tokens: int = 256) -> ReplyStream:
        """Start an answer (validation errors raise here); iterate the result for text pieces."""
        conv = self.conversation(owner, cid)
        settings = GenerationSettings(temperature=max(0.0, min(float(temperature), 2.0)),
                                      max_new_tokens=max(1, min(int(max_new_tokens), MAX_NEW_TOKENS)))
        cancel = threading.Event()
        stream = self.bot.stream(conv, text, settings, cancel=cancel)
        if conv.title == DEFAULT_TITLE and not conv.turns:
            self.rename(owner, cid, _title_from(text))
        key = (owner, cid)

        def pieces():
            with self._lock:
                if key in self._running:
                    raise UserError("An answer is already being written in this chat.")
                self._running[key] = cancel
            try:
                yield from stream
            finally:
                with self._lock:
                    self._running.pop(key, None)
        return ReplyStream(pieces(), stream.reply, cancel)

    def stop(self, owner: str, cid: str) -> bool:
        """Stop the chat's running answer (it keeps what was said); False when nothing was running."""
        with self._lock:
            cancel = self._running.get((owner, cid))
        if cancel is None or cancel.is_set():
            return False
        cancel.set()
        return True

    @friendly
    def undo(self, owner: str, cid: str) -> str:
        """Forget the last question and answer; returns the question (to edit and send again)."""
        conv = self.conversation(owner, cid)
        self._require_idle(owner, cid)
        return self.bot.undo(conv)[0].text

    @friendly
    def clear(self, owner: str, cid: str) -> None:
        """Forget every question and answer; the image and regions stay."""
        conv = self.conversation(owner, cid)
        self._require_idle(owner, cid)
        if conv.turns:
            self.bot.undo(conv, len(conv.turns))

    @friendly
    def regenerate(self, owner: str, cid: str, temperature: float = 0.0, max_new_tokens: int = 256) -> ReplyStream:
        """Answer the last question again."""
        return self.stream(owner, cid, self.undo(owner, cid), temperature, max_new_tokens)

    # ------------------------------------------------------------------------------------------- export
    @friendly
    def export(self, owner: str, cid: str, fmt: str) -> Path:
        """Write the chat as fine-tuning JSON (`json`) or a zip of Markdown and the annotated image (`markdown`)."""
        snap = self.snapshot(owner, cid)
        folder = self.config.export_dir / hashlib.sha256(owner.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "json":
            path = folder / f"tapchat-{cid[:8]}.json"
            path.write_text(json.dumps(self.store.export_llava(owner, cid), indent=2, ensure_ascii=False))
            return path
        if fmt != "markdown":
            raise UserError("Export as json or markdown.")
        path = folder / f"tapchat-{cid[:8]}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            overlay = self.overlay(owner, cid)
            if overlay is not None:
                buf = io.BytesIO()
                overlay.save(buf, format="PNG")
                zf.writestr("annotated.png", buf.getvalue())
            zf.writestr("chat.md", _markdown(snap, overlay is not None))
        return path

    # ------------------------------------------------------------------------------------------ one shot
    @friendly
    def ask_region(self, owner: str, image: str | Path | bytes, prompts: Sequence[Prompt], question: str,
                   temperature: float = 0.0, max_new_tokens: int = 256) -> dict[str, Any]:
        """New chat, image, regions and one answer in a single call (what scripts and evaluators want)."""
        cid = self.new_chat(owner)
        self.set_image(owner, cid, image)
        regions = [self.add_region(owner, cid, p).to_dict() for p in prompts]
        stream = self.stream(owner, cid, question, temperature, max_new_tokens)
        answer = stream.text()
        return {"conversation_id": cid, "regions": regions, "answer": answer, "complete": stream.reply.complete}

    # ------------------------------------------------------------------------------------------ internals
    def _remember(self, conv: Conversation) -> Conversation:
        with self._lock:  # the eviction callback edits _everything
            self._open.put((conv.owner, conv.id), conv)
        return conv

    def _require_idle(self, owner: str, cid: str) -> None:
        with self._lock:
            if (owner, cid) in self._running:
                raise UserError("An answer is still being written: stop it first.")

    def _pixels(self, sha: str) -> np.ndarray:
        """A stored image, decoded once and kept for the few most recent images (every redraw needs it)."""
        pixels = self._images.get(sha)
        if pixels is None:
            pixels = load_image(self.store.image_path(sha), max_pixels=1 << 40)
            pixels.flags.writeable = False  # shared by every redraw
            self._images.put(sha, pixels)
        return pixels

    def _anchor(self, cid: str, number: int, mask: np.ndarray) -> tuple[int, int] | None:
        cached = self._anchors.get((cid, number))
        if cached is None or cached[0] is not mask:
            cached = (mask, anchor(mask))
            self._anchors.put((cid, number), cached)
        return cached[1]

    def _mask(self, conv: Conversation, number: int) -> np.ndarray:
        entry = conv.regions[number]
        if entry.region is not None:
            return entry.region.mask
        cached = self._masks.get((conv.id, number))
        if cached is None or cached[0] != entry.image_key:
            rec = next(r for r in self.store.get_conversation(conv.owner, conv.id).regions if r.number == number)
            cached = (entry.image_key, rle_decode(rec.mask).astype(bool))
            self._masks.put((conv.id, number), cached)
        return cached[1]

    def _view(self, conv: Conversation, number: int) -> RegionView:
        g = conv.regions[number].grounded
        mask = self._mask(conv, number)
        box = mask_bbox(mask)
        box = None if box is None else list(box)
        return RegionView(number, g.concept, round(float(g.prob), 3), g.caption, box, round(float(g.area_percent), 2),
                          _hex(colour(number - 1)))


def _read_upload(path: str | Path, max_mb: int) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError:
        raise UserError("The upload did not arrive; try again.") from None
    if size > max_mb << 20:
        raise UserError(f"The file is {size / 2**20:.1f} MB; the limit is {max_mb} MB.")
    return p.read_bytes()


def _title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _box(bbox: tuple[int, int, int, int] | None) -> list[int] | None:
    return None if bbox is None else [int(v) for v in bbox]


def _markdown(snap: ChatSnapshot, annotated: bool) -> str:
    lines = [f"# {snap.title}", ""]
    if annotated:
        lines += ["![annotated image](annotated.png)", ""]
    if snap.regions:
        lines += ["## Regions", ""] + [f"- `{r.ref}` {r.concept} ({r.prob:.2f}): {r.caption}" for r in snap.regions]
        lines.append("")
    lines += ["## Conversation", ""]
    for m in snap.messages:
        who = "**You:**" if m.role == "user" else "**TAP-Chat:**"
        note = "" if m.complete else " *(stopped)*"
        lines += [f"{who} {m.text}{note}", ""]
    return "\n".join(lines)
