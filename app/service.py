"""`ChatService`: everything the app does, per owner, with no Gradio in it (the UI and the API both call it).

Every method takes the owner first and only ever touches that owner's conversations: the store answers "not
found" for anyone else's. Errors a user can cause come out as `UserError` with a message meant for people.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from assistant.decoding import GenerationSettings
from assistant.engine import Assistant
from assistant.reply import ReplyStream
from assistant.session import Session
from assistant.template import Turn, counts_text
from tokenizer_tap.image_io import decode_image
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.region import Region

from .config import AppConfig
from .errors import UserError, friendly
from .render import region_json

DEFAULT_TITLE = "New chat"
TITLE_CHARS = 48
MAX_NEW_TOKENS = 1024
EVERYTHING_REGIONS = 16


@dataclass(frozen=True)
class ChatSnapshot:
    """What it takes to redraw a conversation exactly."""

    conversation_id: str
    title: str
    image: np.ndarray | None
    regions: list[Region]
    turns: list[Turn]

    def to_dict(self) -> dict[str, Any]:
        """JSON for the API: image size (not pixels), regions as `region_json`, each turn as two messages (the answer
        with its `note`: where it disagrees with TAP, "" when nothing does)."""
        messages = []
        for t in self.turns:
            messages += [{"role": "user", "text": t.text, "complete": True, "regions": list(t.regions)},
                         {"role": "assistant", "text": t.answer or "", "complete": t.complete,
                          "regions": list(t.regions), "note": t.note}]
        return {"conversation_id": self.conversation_id, "title": self.title,
                "image_size": None if self.image is None else [int(self.image.shape[1]), int(self.image.shape[0])],
                "regions": [region_json(r) for r in self.regions], "messages": messages}


@dataclass(frozen=True)
class Found:
    """What a Find turned up: every instance as a numbered region of the chat, and how many of each concept."""

    regions: list[Region]
    counts: dict[str, int]

    @property
    def summary(self) -> str:
        """'3 × car, 0 × dog': the page's status line."""
        return counts_text(self.counts)

    def to_dict(self) -> dict[str, Any]:
        """JSON for the API: the regions as `/segment` returns one, and the count per concept."""
        return {"regions": [region_json(r) for r in self.regions], "found": dict(self.counts)}


class ChatService:
    """The app's behaviour over one shared `Assistant`: owner checks and the page's data, nothing more.

    Each chat is a `Session` (assistant/session.py), which owns its state, its store writes and its caches.
    """

    def __init__(self, assistant: Assistant, config: AppConfig) -> None:
        if assistant.store is None:
            raise ValueError("the app needs an Assistant with a history store")
        self.bot, self.config = assistant, config

    # -------------------------------------------------------------------------------------- conversations
    @friendly
    def new_chat(self, owner: str) -> str:
        """Create an empty stored chat for `owner`; returns its id."""
        return self.bot.start(owner, title=DEFAULT_TITLE).id

    @friendly
    def history(self, owner: str, query: str = "", limit: int = 100) -> list[dict[str, Any]]:
        """The owner's conversations, newest activity first (search: words in messages or the title)."""
        return [{"id": i.id, "title": i.title, "updated": i.updated, "messages": i.message_count}
                for i in self.bot.conversations(owner, query, limit)]

    @friendly
    def rename(self, owner: str, cid: str, title: str) -> None:
        """Retitle the chat; an empty title is a UserError."""
        if not (title or "").strip():
            raise UserError("A title cannot be empty.")
        self.session(owner, cid).rename(title)

    @friendly
    def delete(self, owner: str, cid: str) -> None:
        """Delete the chat from the store and drop its live session and KV cache."""
        self.bot.delete(owner, cid)

    @friendly
    def snapshot(self, owner: str, cid: str, image: bool = True) -> ChatSnapshot:
        """The chat as stored; `image=False` skips decoding the image (redrawing the chat while it streams)."""
        chat = self.session(owner, cid)
        return ChatSnapshot(chat.id, chat.title, chat.pixels() if image else None, chat.current_regions(),
                            [replace(t) for t in chat.turns])

    def session(self, owner: str, cid: str) -> Session:
        """The live chat, restored from the store on first use (raises NotFoundError for others')."""
        if not isinstance(cid, str) or not cid:
            raise UserError("Start a chat first: upload an image or press New chat.")
        return self.bot.open(owner, cid)

    # -------------------------------------------------------------------------------------------- images
    @friendly
    def set_image(self, owner: str, cid: str, source: str | Path | bytes) -> ChatSnapshot:
        """Make an uploaded file the chat's current image (no `cid`: a new chat, made only if the file is good).

        Size and format are checked before the model sees the file, with messages a person can act on.
        """
        data = source if isinstance(source, bytes) else _read_upload(source, self.config.max_upload_mb)
        upload = decode_image(data, max_pixels=self.config.max_pixels)  # the only decode of this upload
        cid = cid or self.new_chat(owner)
        self.session(owner, cid).set_image(upload)
        return self.snapshot(owner, cid)

    # ------------------------------------------------------------------------------------------- regions
    @friendly
    def add_region(self, owner: str, cid: str, prompt: Prompt) -> Region:
        """Segment `prompt` on the chat's current image; the region gets the chat's next number."""
        return self.session(owner, cid).add_region(prompt)

    @friendly
    def click(self, owner: str, cid: str, x: float, y: float, positive: bool = True) -> Region:
        """A positive click is a new region; a negative one carves the latest not-yet-asked-about region."""
        return self.session(owner, cid).click(x, y, positive)

    @friendly
    def remove_region(self, owner: str, cid: str, number: int) -> None:
        """Remove region `number`; it is not reused, and turns that mentioned it stay."""
        self.session(owner, cid).remove_region(int(number))

    @friendly
    def remove_regions(self, owner: str, cid: str) -> list[int]:
        """Remove every region of the current image (turns that mentioned them stay); returns their numbers."""
        chat = self.session(owner, cid)
        numbers = [r.number for r in chat.current_regions()]
        for number in numbers:
            chat.remove_region(number)
        return numbers

    @friendly
    def find(self, owner: str, cid: str, query: str) -> Found:
        """Every instance of the concepts `query` names ("car", "cars and people") as regions of the chat, numbered
        like clicked ones (an instance already a region keeps its number), with the count per concept."""
        chat = self.session(owner, cid)
        if chat.image_key is None:
            raise UserError("Upload an image first.")
        regions = chat.find(query)
        return Found(regions, self.bot.find_counts(query, regions))

    @friendly
    def segment_everything(self, owner: str, cid: str) -> list[Region]:
        """TAP's top regions for the whole image, numbered from 1 in this list (adopt one to make it a region)."""
        chat = self.session(owner, cid)
        if chat.image_key is None:
            raise UserError("Upload an image first.")
        return chat.candidates(EVERYTHING_REGIONS, points_per_side=self.config.everything_grid,
                               iou_threshold=self.config.everything_min_iou)

    @friendly
    def everything_overlay(self, owner: str, cid: str) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]] | None:
        """The image and the segment-everything masks with labels, for `gr.AnnotatedImage`."""
        chat = self.session(owner, cid)
        found = chat.current_candidates()
        if found is None or chat.image_sha is None:
            return None
        return chat.pixels(), [(r.mask.astype(np.float32), f"{i + 1} {r.concept}") for i, r in enumerate(found)]

    @friendly
    def adopt(self, owner: str, cid: str, index: int) -> Region:
        """Make segment-everything candidate `index` (1-based) a region of the chat."""
        chat = self.session(owner, cid)
        if chat.current_candidates() is None:
            raise UserError("Press Segment everything first.")
        return chat.adopt(int(index))

    @friendly
    def region_views(self, owner: str, cid: str) -> list[Region]:
        """The active regions of the current image, in number order."""
        return self.session(owner, cid).current_regions()

    @friendly
    def overlay(self, owner: str, cid: str, focus: int | Collection[int] | None = None) -> Image.Image | None:
        """The current image with every active region tinted, outlined and numbered; `focus` (one or several)
        stands out."""
        return self.session(owner, cid).overlay(focus)

    # ------------------------------------------------------------------------------------------ chatting
    @friendly
    def stream(self, owner: str, cid: str, text: str, temperature: float = 0.0,
               max_new_tokens: int = 256) -> ReplyStream:
        """Start an answer (validation errors raise here); iterate the result for text pieces."""
        chat = self.session(owner, cid)
        settings = GenerationSettings(temperature=max(0.0, min(float(temperature), 2.0)),
                                      max_new_tokens=max(1, min(int(max_new_tokens), MAX_NEW_TOKENS)))
        stream = chat.stream(text, settings)
        if chat.title == DEFAULT_TITLE and not chat.turns:
            chat.rename(_title_from(text))
        return stream

    def stop(self, owner: str, cid: str) -> bool:
        """Stop the chat's running answer (it keeps what was said); False when nothing was running."""
        chat = self.bot.live(owner, cid)
        return chat is not None and chat.stop()

    @friendly
    def undo(self, owner: str, cid: str) -> str:
        """Forget the last question and answer; returns the question (to edit and send again)."""
        return self.session(owner, cid).undo()[0].text

    @friendly
    def clear(self, owner: str, cid: str) -> None:
        """Forget every question and answer; the image and regions stay."""
        self.session(owner, cid).clear()

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
            path.write_text(json.dumps(self.session(owner, cid).export(), indent=2, ensure_ascii=False))
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
        regions = [region_json(self.add_region(owner, cid, p)) for p in prompts]
        stream = self.stream(owner, cid, question, temperature, max_new_tokens)
        answer = stream.text()
        return {"conversation_id": cid, "regions": regions, "answer": answer, "note": stream.reply.note,
                "complete": stream.reply.complete}


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


def _markdown(snap: ChatSnapshot, annotated: bool) -> str:
    lines = [f"# {snap.title}", ""]
    if annotated:
        lines += ["![annotated image](annotated.png)", ""]
    if snap.regions:
        lines += ["## Regions", ""] + [f"- `{r.ref}` {r.concept} ({round(r.concept_prob, 3):.2f}): {r.caption}"
                                       for r in snap.regions]
        lines.append("")
    lines += ["## Conversation", ""]
    for t in snap.turns:
        note = "" if t.complete else " *(stopped)*"
        lines += [f"**You:** {t.text}", "", f"**TAP-Chat:** {t.answer or ''}{note}", ""]
        lines += [f"> ⚠ {t.note}", ""] if t.note else []
    return "\n".join(lines)
