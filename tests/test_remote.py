"""The LLM server client (`assistant/remote.py`) against replies a real server should never send: a tiny HTTP server
on 127.0.0.1 answers with canned bodies, and every unreadable reply must become a ServerError with a plain message
(what the CLIs and the app show), never a JSON or key error from inside the engine. The real vLLM server is
tests/test_vllm.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from assistant.decoding import GenerationSettings, Request
from assistant.remote import ServerError, ServerLLM

MODELS = json.dumps({"object": "list", "data": [{"id": "base", "object": "model"}]})
GOOD = 'data: {"choices": [{"index": 0, "token_ids": [5, 6], "finish_reason": null}]}'


class Canned(BaseHTTPRequestHandler):
    """Answers GET /v1/models and POST /v1/completions with the server's `replies[path]`: (status, body)."""

    def do_GET(self) -> None:
        self.reply()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.reply()

    def reply(self) -> None:
        status, body = self.server.replies[self.path]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream" if self.path == "/v1/completions" else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    httpd.replies = {"/v1/models": (200, MODELS)}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def client(httpd: ThreadingHTTPServer, model: str | None = "base") -> ServerLLM:
    """A client whose chat model is only what the HTTP side reads: no LoRA adapter."""
    chat = SimpleNamespace(config=SimpleNamespace(lora=None, mode="grounded"))
    return ServerLLM(chat, f"http://127.0.0.1:{httpd.server_address[1]}", model, timeout_s=10)


def stream(httpd: ThreadingHTTPServer, *events: str) -> tuple[ServerLLM, object]:
    httpd.replies["/v1/completions"] = (200, "".join(e + "\n\n" for e in events))
    llm = client(httpd)
    return llm, llm.join(Request([1, 2, 3], None, GenerationSettings(max_new_tokens=8), ""))


def test_a_well_formed_stream_is_read_to_its_end(server) -> None:
    llm, request = stream(server, GOOD, 'data: {"choices": [{"token_ids": [7], "finish_reason": "stop"}]}',
                          "data: [DONE]")
    assert [llm.next(request) for _ in range(4)] == [5, 6, 7, None]


@pytest.mark.parametrize(("body", "message"), [
    ("<html><body>502 Bad Gateway</body></html>",
     r"answered /v1/models with something that is not a JSON object: '<html><body>502 Bad Gateway"),
    ('["base"]', r"answered /v1/models with something that is not a JSON object: '\[\"base\"\]'"),
    ('{"object": "list"}', r"lists its models without a `data` list of \{id\}"),
    ('{"data": [{"object": "model"}]}', r"lists its models without a `data` list of \{id\}"),
    ('{"data": []}', r"serves no base model"),
])
def test_an_unreadable_models_reply_is_a_plain_server_error(server, body: str, message: str) -> None:
    server.replies["/v1/models"] = (200, body)
    with pytest.raises(ServerError, match=message):
        client(server, model=None)


@pytest.mark.parametrize(("event", "message"), [
    ('data: {"choices": [{"token_ids": [1', r"sent a stream event that is not JSON: '\{\"choices\""),
    ('data: {"id": "cmpl-1", "object": "text_completion"}', r"sent a stream event without choices"),
    ('data: {"choices": []}', r"sent a stream event without choices"),
    ('data: {"choices": ["5"]}', r"sent a stream event without choices"),
    ('data: [1, 2]', r"sent a stream event without choices"),
    ('data: {"choices": [{"token_ids": ["a", 2]}]}', r"sent token_ids that are not integers"),
    ('data: {"choices": [{"token_ids": 7}]}', r"sent token_ids that are not integers"),
    ('data: {"error": "engine is dead"}', r"the language model server failed: engine is dead"),
    ('data: {"error": {"message": "out of memory", "code": 500}}', r"the language model server failed: out of memory"),
])
def test_a_malformed_stream_event_is_a_plain_server_error(server, event: str, message: str) -> None:
    """The tokens before the bad event are delivered; then a ServerError says what came, and the stream is closed."""
    llm, request = stream(server, GOOD, event, "data: [DONE]")
    assert [llm.next(request), llm.next(request)] == [5, 6]
    with pytest.raises(ServerError, match=message):
        llm.next(request)
    assert request.ended and request.response is None


def test_a_reply_that_is_not_a_stream_is_a_plain_server_error(server) -> None:
    llm, request = stream(server, json.dumps({"choices": [{"text": "hi", "token_ids": [5]}]}))
    with pytest.raises(ServerError, match="closed the answer before it ended"):
        llm.next(request)
