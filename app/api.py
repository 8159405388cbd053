"""Named endpoints for `gradio_client` (`/segment`, `/chat`, `/ask_region`, history operations).

The owner is the logged-in user with --auth; without it, each client session is its own anonymous owner, so two
clients never see each other's chats. Refusals arrive as `gradio_client` errors carrying the plain message.

    from gradio_client import Client, handle_file
    c = Client("http://127.0.0.1:7860")
    cid = c.predict(api_name="/new_chat")
    c.predict(cid, handle_file("photo.jpg"), api_name="/set_image")
    c.predict(cid, {"points": [[120, 340]]}, api_name="/segment")
    for text in c.submit(cid, "What is <region1>?", api_name="/chat"):
        print(text)
"""

from __future__ import annotations

import functools
import inspect
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder

from tokenizer_tap.errors import TapError
from tokenizer_tap.prompts import Prompt

from .owners import session_owner
from .service import ChatService, UserError


def _errors(fn: Callable) -> Callable:
    """Refusals become `gr.Error`s, whose message reaches the client (streaming endpoints included)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except (UserError, TapError) as exc:
                raise gr.Error(str(exc)) from None
        return streaming

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, TapError) as exc:
            raise gr.Error(str(exc)) from None
    return inner


def uploaded_path(payload: Any) -> str:
    """The path of a file uploaded through Gradio; anything outside its upload folder is refused, so a crafted
    request cannot make the server read an arbitrary file."""
    path = payload.get("path") if isinstance(payload, dict) else None
    if isinstance(path, str) and path:
        resolved = Path(path).resolve()
        if resolved.is_relative_to(Path(get_upload_folder()).resolve()):
            return str(resolved)
    raise UserError("Send the image with gradio_client.handle_file(path).")


def parse_prompt(spec: Any) -> Prompt:
    """`{"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x1, y1, x2, y2]}` or `{"scribble": [[x, y], ...]}`."""
    if not isinstance(spec, dict):
        raise UserError('A region prompt is an object such as {"points": [[120, 340]]} or {"box": [x1, y1, x2, y2]}.')
    unknown = set(spec) - {"points", "labels", "box", "scribble"}
    if unknown:
        raise UserError(f"Unknown region prompt field(s): {', '.join(sorted(unknown))}.")
    if spec.get("scribble") is not None:
        return Prompt.scribble(spec["scribble"])
    points = spec.get("points") or []
    labels = spec.get("labels") or [1] * len(points)
    kind = "box" if spec.get("box") is not None and not points else "point"
    return Prompt(points, labels, spec.get("box"), kind=kind)


def register(service: ChatService, *, auth: bool) -> None:
    """Add the endpoints to the Blocks being built."""

    def who(request: gr.Request) -> str:
        if auth:
            return request.username
        return session_owner(request.session_hash or "")

    def _stream(stream) -> Iterator[str]:
        text = ""
        try:
            for piece in stream:
                text += piece
                yield text
        finally:
            stream.cancel()

    @_errors
    def new_chat(request: gr.Request) -> str:
        """Start an empty chat; returns its conversation id."""
        return service.new_chat(who(request))

    @_errors
    def set_image(conversation_id: str, image: FileData, request: gr.Request) -> dict:
        """Make an image (sent with handle_file) the chat's current image; returns the chat."""
        return service.set_image(who(request), conversation_id, uploaded_path(image)).to_dict()

    @_errors
    def segment(conversation_id: str, prompt: dict, request: gr.Request) -> dict:
        """Add a region from points/box/scribble in image pixels; returns it (number, concept, caption, box)."""
        return service.add_region(who(request), conversation_id, parse_prompt(prompt)).to_dict()

    @_errors
    def remove_region(conversation_id: str, number: int, request: gr.Request) -> dict:
        """Remove a region (its number is never reused); returns the chat."""
        service.remove_region(who(request), conversation_id, int(number))
        return service.snapshot(who(request), conversation_id).to_dict()

    @_errors
    def segment_everything(conversation_id: str, request: gr.Request) -> list[dict]:
        """TAP's top regions over the whole image, as candidates numbered from 1 (see /adopt)."""
        return [r.to_dict() for r in service.segment_everything(who(request), conversation_id)]

    @_errors
    def adopt(conversation_id: str, index: int, request: gr.Request) -> dict:
        """Make segment-everything candidate `index` a region of the chat."""
        return service.adopt(who(request), conversation_id, int(index)).to_dict()

    @_errors
    def chat(conversation_id: str, message: str, temperature: float = 0.0, max_new_tokens: int = 256,
             request: gr.Request = None) -> Iterator[str]:
        """Ask; streams the answer so far (mention regions as <region1>)."""
        yield from _stream(service.stream(who(request), conversation_id, message, temperature, max_new_tokens))

    @_errors
    def regenerate(conversation_id: str, temperature: float = 0.0, max_new_tokens: int = 256,
                   request: gr.Request = None) -> Iterator[str]:
        """Answer the last question again; streams the new answer."""
        yield from _stream(service.regenerate(who(request), conversation_id, temperature, max_new_tokens))

    @_errors
    def stop(conversation_id: str, request: gr.Request) -> bool:
        """Stop the chat's running answer (what was said is kept); false when none was running."""
        return service.stop(who(request), conversation_id)

    @_errors
    def undo(conversation_id: str, request: gr.Request) -> str:
        """Forget the last question and answer; returns the question."""
        return service.undo(who(request), conversation_id)

    @_errors
    def clear(conversation_id: str, request: gr.Request) -> dict:
        """Forget all questions and answers (image and regions stay); returns the chat."""
        service.clear(who(request), conversation_id)
        return service.snapshot(who(request), conversation_id).to_dict()

    @_errors
    def ask_region(image: FileData, prompts: list, question: str, temperature: float = 0.0, max_new_tokens: int = 256,
                   request: gr.Request = None) -> dict:
        """One call: a new chat with this image and these region prompts, and the answer to one question."""
        if not isinstance(prompts, list):
            raise UserError("prompts must be a list of region prompts.")
        parsed = [parse_prompt(p) for p in prompts]
        return service.ask_region(who(request), uploaded_path(image), parsed, question, temperature, max_new_tokens)

    @_errors
    def history(query: str = "", request: gr.Request = None) -> list[dict]:
        """Your chats, newest first; with a query, those whose messages or title match it."""
        return service.history(who(request), query)

    @_errors
    def open_chat(conversation_id: str, request: gr.Request) -> dict:
        """A chat's title, regions and messages."""
        return service.snapshot(who(request), conversation_id).to_dict()

    @_errors
    def rename(conversation_id: str, title: str, request: gr.Request) -> dict:
        service.rename(who(request), conversation_id, title)
        return service.snapshot(who(request), conversation_id).to_dict()

    @_errors
    def delete(conversation_id: str, request: gr.Request) -> bool:
        service.delete(who(request), conversation_id)
        return True

    @_errors
    def export(conversation_id: str, format: str = "json", request: gr.Request = None) -> dict:
        """The chat as fine-tuning records (`json`) or Markdown text (`markdown`)."""
        path = service.export(who(request), conversation_id, format)
        if format == "json":
            return {"format": "json", "records": json.loads(path.read_text())}
        with zipfile.ZipFile(path) as zf:
            return {"format": "markdown", "markdown": zf.read("chat.md").decode()}

    model = {"concurrency_id": "model"}
    for fn, extra in [(new_chat, {}), (set_image, model), (segment, model), (remove_region, {}),
                      (segment_everything, model), (adopt, model), (chat, model), (regenerate, model),
                      (stop, {"queue": False}), (undo, {}), (clear, {}), (ask_region, model), (history, {}),
                      (open_chat, {}), (rename, {}), (delete, {}), (export, {})]:
        name = "open" if fn is open_chat else fn.__name__
        gr.api(fn, api_name=name, **extra)
