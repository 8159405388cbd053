"""An OpenAI-compatible vLLM server as the language model (`--llm-server URL`).

TAP, the projector and the token-embedding table stay in this process; the server runs the LLM, batches users
continuously and scales out (tensor parallel, multi-node: vLLM's own, see docs/deployment.md).

- A prompt with an image goes as `prompt_embeds` (the text-token embeddings with the visual tokens spliced in, as
  a torch.save'd tensor in base64; the server needs `--enable-prompt-embeds`).
- A prompt without one goes as text with `add_special_tokens: false`; the server must tokenize it exactly as we do,
  and the first streamed chunk's `prompt_token_ids` is checked against ours.
- A chat checkpoint's LoRA adapter is a model name on the server (`--enable-lora --lora-modules NAME=DIR`), except
  in tapchat mode, whose checkpoints are served merged (`assistant merge`; see `ServerLLM._pick_model` for why).

The interface is the continuous batcher's (`join` / `next` / `leave`), so the engine's loop, its store writes and
Stop are the same: Stop closes the stream, and vLLM aborts a request whose client went away.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import torch

from .decoding import CachedPrefix, GenerationSettings, Request
from .model import IMAGE_TOKEN, ChatModel


class ServerError(ConnectionError):
    """The LLM server is unreachable, refused a request or stopped mid-answer; the message says which, plainly.

    An OSError (as a network failure is), so every CLI reports it as a plain error."""


@dataclass(eq=False)
class Stream:
    """One streaming completion: the token ids not yet read, and the open response."""

    cancel: threading.Event
    prefix: CachedPrefix | None  # the engine's (unused) local KV entry, handed back by `leave`
    response: httpx.Response | None = None
    lines: Iterator[str] | None = None
    ready: deque[int] = field(default_factory=deque)
    expected_prompt: list[int] | None = None  # a text prompt's ids as we tokenize it
    ended: bool = False


class ServerLLM:
    """Completions from a vLLM (or any OpenAI-compatible, prompt-embeds capable) server at `url`."""

    def __init__(self, chat: ChatModel, url: str, model: str | None = None, *, timeout_s: float = 600.0) -> None:
        self.chat, self.url = chat, url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model = model or self._pick_model()
        self.largest = 0  # interface parity with `Batcher`: batching happens on the server

    def _pick_model(self) -> str:
        """The served name to ask: the base model, or for a grounded-mode checkpoint with LoRA, its adapter.

        A tapchat checkpoint with LoRA is refused: vLLM 0.32 cannot batch prompt embeddings with a LoRA adapter
        (two such requests at once kill its engine: `einsum(): subscript b has size ...` in punica_cpu's
        `add_lora_embedding`), so such a checkpoint is served merged. Naming the adapter with `--llm-server-model`
        overrides this (for a vLLM build where it works).
        """
        data = self._json(self._call("GET", "/v1/models"), "/v1/models").get("data")
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise ServerError(f"the server at {self.url} lists its models without a `data` list of {{id}}: is it an "
                              "OpenAI-compatible server?")
        adapters = [m["id"] for m in data if m.get("parent")]
        bases = [m["id"] for m in data if not m.get("parent")]
        if self.chat.config.lora is None:
            if not bases:
                raise ServerError(f"the server at {self.url} serves no base model")
            return bases[0]
        if self.chat.config.mode == "tapchat":
            raise ServerError("a tapchat checkpoint with a LoRA adapter is served merged (vLLM cannot batch prompt "
                              "embeddings with LoRA): run `python -m assistant merge CHECKPOINT MERGED`, serve "
                              "MERGED/llm with --enable-prompt-embeds, and pass --chat-checkpoint MERGED")
        if len(adapters) != 1:
            raise ServerError(f"the checkpoint has a LoRA adapter; the server at {self.url} serves "
                              f"{len(adapters)} adapters ({', '.join(adapters) or 'none'}): serve it with "
                              "--enable-lora --lora-modules NAME=CHECKPOINT/adapter, or name one with "
                              "--llm-server-model")
        return adapters[0]

    # ------------------------------------------------------------------------------ the batcher's interface
    def join(self, req: Request) -> Stream:
        """Start streaming the answer to `req.ids` (or to `req.text`, which must tokenize to them, when no image)."""
        ids, settings = req.ids, req.settings
        limit = settings.max_new_tokens
        if req.max_context is not None:
            limit = min(limit, req.max_context - self.chat.prompt_length(ids))
        request = Stream(req.cancel, req.prefix)
        if limit <= 0 or req.cancel.is_set():
            request.ended = True
            return request
        body = {"model": self.model, "max_tokens": limit, "stream": True, "return_token_ids": True,
                **_sampling(settings)}
        if IMAGE_TOKEN in ids:
            with torch.inference_mode():
                embeds = self.chat.embed_sequence(ids, req.visual)
            body["prompt_embeds"] = encode_embeds(embeds)
        elif req.text:
            body |= {"prompt": req.text, "add_special_tokens": False}
            request.expected_prompt = ids
        else:
            body["prompt"] = ids
        request.response = self._call("POST", "/v1/completions", json=body, stream=True)
        request.lines = request.response.iter_lines()
        return request

    def join_many(self, requests: list[Request]) -> list[Stream]:
        """Start every request's stream (the server batches them)."""
        return [self.join(r) for r in requests]

    def next(self, request: Stream) -> int | None:
        """The next token id; None once the answer ended or Stop was pressed."""
        while True:
            if request.cancel.is_set():  # checked first: nothing more is read after Stop
                self.leave(request)
                return None
            if request.ready:
                return request.ready.popleft()
            if request.ended:
                self.leave(request)
                return None
            self._read(request)

    def leave(self, request: Stream) -> CachedPrefix | None:
        """Close the stream (the server aborts the request); the KV cache lives on the server, not here."""
        request.ended = True
        if request.response is not None:
            request.response.close()
            request.response = None
        return request.prefix

    # ------------------------------------------------------------------------------------------- internals
    def _read(self, request: Stream) -> None:
        """Read one server-sent event into `request.ready`."""
        try:
            line = next(request.lines, None)
        except httpx.HTTPError as exc:
            self.leave(request)
            raise ServerError(f"the language model server at {self.url} stopped answering mid-reply "
                              f"({type(exc).__name__})") from None
        if line is None:
            self.leave(request)
            raise ServerError(f"the language model server at {self.url} closed the answer before it ended")
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            request.ended = True
            return
        try:
            choice = self._choice(data)
        except ServerError:
            self.leave(request)
            raise
        if request.expected_prompt is not None and choice.get("prompt_token_ids") is not None:
            if choice["prompt_token_ids"] != request.expected_prompt:
                self.leave(request)
                raise ServerError(f"the server at {self.url} tokenizes the prompt differently from this tokenizer: "
                                  "serve the checkpoint's own llm/ folder (or the same --llm)")
            request.expected_prompt = None
        request.ready.extend(choice.get("token_ids") or [])
        if choice.get("finish_reason") is not None:
            request.ended = True

    def _choice(self, data: str) -> dict:
        """The first choice of one streamed event, checked: a reply we cannot read is the server's fault, said as a
        ServerError with what it sent, never a JSON or key error from deep in the engine."""
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise ServerError(f"the language model server at {self.url} sent a stream event that is not JSON: "
                              f"{data[:200]!r}") from None
        if isinstance(event, dict) and "error" in event:
            error = event["error"]
            raise ServerError(f"the language model server failed: "
                              f"{error.get('message', error) if isinstance(error, dict) else error}")
        choices = event.get("choices") if isinstance(event, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise ServerError(f"the language model server at {self.url} sent a stream event without choices: "
                              f"{data[:200]!r}")
        ids = choice.get("token_ids") or []
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ServerError(f"the language model server at {self.url} sent token_ids that are not integers: "
                              f"{data[:200]!r}")
        return choice

    def _json(self, response: httpx.Response, path: str) -> dict:
        """A non-streamed reply's JSON object; anything else (an HTML error page from a proxy, say) is a
        ServerError quoting its start."""
        try:
            body = response.json()
        except ValueError:  # JSONDecodeError, or bytes that are not text
            body = None
        if not isinstance(body, dict):
            raise ServerError(f"the language model server at {self.url} answered {path} with something that is not "
                              f"a JSON object: {response.text[:200]!r}")
        return body

    def _call(self, method: str, path: str, *, json: dict | None = None, stream: bool = False) -> httpx.Response:
        """One HTTP call; connection problems and refusals become `ServerError`s that say what happened."""
        try:
            if stream:
                response = self.client.send(self.client.build_request(method, path, json=json), stream=True)
            else:
                response = self.client.request(method, path, json=json)
        except httpx.ConnectError:
            raise ServerError(f"the language model server at {self.url} is not reachable; is it running?") from None
        except httpx.HTTPError as exc:
            raise ServerError(f"the language model server at {self.url} did not answer ({type(exc).__name__})") \
                from None
        if response.status_code >= 400:
            if stream:
                response.read()
                response.close()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ServerError(f"the language model server refused the request (HTTP {response.status_code}): "
                              f"{message}")
        return response


def encode_embeds(embeds: torch.Tensor) -> str:
    """vLLM's `prompt_embeds` format: a (positions, hidden) tensor, torch.save'd, in base64."""
    buf = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _sampling(settings: GenerationSettings) -> dict:
    """Our generation settings as OpenAI/vLLM completion parameters."""
    params = {"temperature": settings.temperature, "top_p": settings.top_p,
              "repetition_penalty": settings.repetition_penalty}
    if settings.seed is not None:
        params["seed"] = settings.seed
    if settings.allowed_tokens is not None:
        params["allowed_token_ids"] = list(settings.allowed_tokens)
    return params
