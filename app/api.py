"""Named endpoints for `gradio_client` (`/segment`, `/find`, `/chat`, `/ask_region`, history operations).

The owner is the logged-in user with --auth; without it, each client session is its own anonymous owner, so two
clients never see each other's chats. Refusals arrive as `gradio_client` errors carrying the plain message.

    from gradio_client import Client, handle_file
    c = Client("http://127.0.0.1:7860")
    cid = c.predict(api_name="/new_chat")
    c.predict(cid, handle_file("photo.jpg"), api_name="/set_image")
    c.predict(cid, {"points": [[120, 340]]}, api_name="/segment")
    c.predict(cid, "cars", api_name="/find")  # every car: {"regions": [...], "found": {"car": 3}}
    for text in c.submit(cid, "What is <region1>?", api_name="/chat"):
        print(text)
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder

from tokenizer_tap.prompts import Prompt

from .errors import UserError, api_errors
from .owners import session_owner
from .render import region_json
from .service import ChatService


def uploaded_path(payload: Any) -> str:
    """The path of a file uploaded through Gradio; anything outside its upload folder is refused, so a crafted
    request cannot make the server read an arbitrary file."""
    path = payload.get("path") if isinstance(payload, dict) else None
    if isinstance(path, str) and path:
        resolved = Path(path).resolve()
        if resolved.is_relative_to(Path(get_upload_folder()).resolve()):
            return str(resolved)
    raise UserError("Send the image with gradio_client.handle_file(path).")


class ChatAPI:
    """The HTTP endpoints, one method each; their docstrings are what the API page shows."""

    def __init__(self, service: ChatService, auth: bool) -> None:
        self.service, self.auth = service, auth

    def who(self, request: gr.Request) -> str:
        """The logged-in user with --auth; else each client session is its own anonymous owner."""
        if self.auth:
            return request.username
        return session_owner(request.session_hash or "")

    @staticmethod
    def _stream(stream) -> Iterator[str]:
        text = ""
        try:
            for piece in stream:
                text += piece
                yield text
        finally:
            stream.cancel()

    @api_errors
    def new_chat(self, request: gr.Request) -> str:
        """Start an empty chat; returns its conversation id."""
        return self.service.new_chat(self.who(request))

    @api_errors
    def set_image(self, conversation_id: str, image: FileData, request: gr.Request) -> dict:
        """Make an image (sent with handle_file) the chat's current image; returns the chat."""
        return self.service.set_image(self.who(request), conversation_id, uploaded_path(image)).to_dict()

    @api_errors
    def segment(self, conversation_id: str, prompt: dict, request: gr.Request) -> dict:
        """Add a region from points/box/scribble in image pixels; returns it (number, concept, caption, box)."""
        return region_json(self.service.add_region(self.who(request), conversation_id, Prompt.from_dict(prompt)))

    @api_errors
    def find(self, conversation_id: str, query: str, request: gr.Request) -> dict:
        """Make every instance of what `query` names ("car", "cars and people") a numbered region; returns
        {"regions": [each as /segment returns it], "found": {"car": 3}} (an instance already a region keeps its
        number; a concept with no instance counts 0)."""
        return self.service.find(self.who(request), conversation_id, query).to_dict()

    @api_errors
    def remove_region(self, conversation_id: str, number: int, request: gr.Request) -> dict:
        """Remove a region (its number is never reused); returns the chat."""
        self.service.remove_region(self.who(request), conversation_id, int(number))
        return self.service.snapshot(self.who(request), conversation_id).to_dict()

    @api_errors
    def segment_everything(self, conversation_id: str, request: gr.Request) -> list[dict]:
        """TAP's top regions over the whole image, as candidates numbered from 1 (see /adopt)."""
        return [region_json(r) for r in self.service.segment_everything(self.who(request), conversation_id)]

    @api_errors
    def adopt(self, conversation_id: str, index: int, request: gr.Request) -> dict:
        """Make segment-everything candidate `index` a region of the chat."""
        return region_json(self.service.adopt(self.who(request), conversation_id, int(index)))

    @api_errors
    def chat(self, conversation_id: str, message: str, temperature: float = 0.0, max_new_tokens: int = 256,
             request: gr.Request = None) -> Iterator[str]:
        """Ask; streams the answer so far (mention regions as <region1>). /open gives its TAP check `note`."""
        owner = self.who(request)
        yield from self._stream(self.service.stream(owner, conversation_id, message, temperature, max_new_tokens))

    @api_errors
    def regenerate(self, conversation_id: str, temperature: float = 0.0, max_new_tokens: int = 256,
                   request: gr.Request = None) -> Iterator[str]:
        """Answer the last question again; streams the new answer."""
        owner = self.who(request)
        yield from self._stream(self.service.regenerate(owner, conversation_id, temperature, max_new_tokens))

    @api_errors
    def stop(self, conversation_id: str, request: gr.Request) -> bool:
        """Stop the chat's running answer (what was said is kept); false when none was running."""
        return self.service.stop(self.who(request), conversation_id)

    @api_errors
    def undo(self, conversation_id: str, request: gr.Request) -> str:
        """Forget the last question and answer; returns the question."""
        return self.service.undo(self.who(request), conversation_id)

    @api_errors
    def clear(self, conversation_id: str, request: gr.Request) -> dict:
        """Forget all questions and answers (image and regions stay); returns the chat."""
        self.service.clear(self.who(request), conversation_id)
        return self.service.snapshot(self.who(request), conversation_id).to_dict()

    @api_errors
    def ask_region(self, image: FileData, prompts: list, question: str, temperature: float = 0.0,
                   max_new_tokens: int = 256, request: gr.Request = None) -> dict:
        """One call: a new chat with this image and these region prompts, and the answer to one question (with
        `note`: where the answer disagrees with what TAP sees in a region it cites; "" when nothing does)."""
        if not isinstance(prompts, list):
            raise UserError("prompts must be a list of region prompts.")
        parsed = [Prompt.from_dict(p) for p in prompts]
        return self.service.ask_region(self.who(request), uploaded_path(image), parsed, question, temperature,
                                       max_new_tokens)

    @api_errors
    def history(self, query: str = "", request: gr.Request = None) -> list[dict]:
        """Your chats, newest first; with a query, those whose messages or title match it."""
        return self.service.history(self.who(request), query)

    @api_errors
    def open_chat(self, conversation_id: str, request: gr.Request) -> dict:
        """A chat's title, regions and messages."""
        return self.service.snapshot(self.who(request), conversation_id).to_dict()

    @api_errors
    def rename(self, conversation_id: str, title: str, request: gr.Request) -> dict:
        """Give the chat a new title (it cannot be empty); returns the chat."""
        self.service.rename(self.who(request), conversation_id, title)
        return self.service.snapshot(self.who(request), conversation_id).to_dict()

    @api_errors
    def delete(self, conversation_id: str, request: gr.Request) -> bool:
        """Delete the chat with its messages and regions; returns true."""
        self.service.delete(self.who(request), conversation_id)
        return True

    @api_errors
    def export(self, conversation_id: str, format: str = "json", request: gr.Request = None) -> dict:
        """The chat as fine-tuning records (`json`) or Markdown text (`markdown`)."""
        path = self.service.export(self.who(request), conversation_id, format)
        if format == "json":
            return {"format": "json", "records": json.loads(path.read_text())}
        with zipfile.ZipFile(path) as zf:
            return {"format": "markdown", "markdown": zf.read("chat.md").decode()}


# Model work queues in two lanes: TAP (images, clicks; one at a time) and the LLM (answers; up to
# `AppConfig.answers_at_once`, which the engine decodes as one batch). A click never waits behind someone's answer;
# the engine's fair lock interleaves the two at token granularity.
TAP = {"concurrency_id": "tap"}
LLM = {"concurrency_id": "llm"}


def lane(options: dict[str, Any], service: ChatService) -> dict[str, Any]:
    """Queue settings of an event: the LLM lane gets its limit from the config (Gradio applies the lowest limit
    set on a lane, so every event in it must carry the same one)."""
    if options.get("concurrency_id") == LLM["concurrency_id"]:
        return {**options, "concurrency_limit": service.config.answers_at_once}
    return options
#: The API at a glance: endpoint name, method, and its queue settings.
ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("new_chat", "new_chat", {}), ("set_image", "set_image", TAP), ("segment", "segment", TAP),
    ("find", "find", TAP), ("remove_region", "remove_region", {}), ("segment_everything", "segment_everything", TAP),
    ("adopt", "adopt", TAP), ("chat", "chat", LLM), ("regenerate", "regenerate", LLM),
    ("stop", "stop", {"queue": False}), ("undo", "undo", {}), ("clear", "clear", {}),
    ("ask_region", "ask_region", LLM), ("history", "history", {}), ("open", "open_chat", {}),
    ("rename", "rename", {}), ("delete", "delete", {}), ("export", "export", {}),
]


def register(service: ChatService, *, auth: bool) -> None:
    """Add the endpoints to the Blocks being built."""
    endpoints = ChatAPI(service, auth)
    for name, method, queue in ENDPOINTS:
        gr.api(getattr(endpoints, method), api_name=name, **lane(queue, service))
