"""The app's named endpoints through `gradio_client`, against the app launched in-process with tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCENE = str(ROOT / "examples" / "scene.jpg")


@pytest.fixture(scope="module")
def server(app_server):
    return app_server()


@pytest.fixture
def client(server) -> Client:
    return Client(server[0], verbose=False)


def chat_with_image(client: Client) -> str:
    cid = client.predict(api_name="/new_chat")
    client.predict(cid, handle_file(SCENE), api_name="/set_image")
    return cid


def test_endpoints_are_named_and_documented(client: Client) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ["/new_chat", "/set_image", "/segment", "/find", "/remove_region", "/segment_everything", "/adopt",
                 "/chat", "/stop", "/regenerate", "/undo", "/clear", "/ask_region", "/history", "/open", "/rename",
                 "/delete", "/export"]:
        assert name in api, name
    assert [p["parameter_name"] for p in api["/chat"]["parameters"]] == [
        "conversation_id", "message", "temperature", "max_new_tokens"]
    assert "stream" in api["/chat"]["description"]


def test_segment_returns_a_numbered_region(client: Client) -> None:
    cid = chat_with_image(client)
    region = client.predict(cid, {"points": [[510, 270]]}, api_name="/segment")
    assert region["number"] == 1 and region["ref"] == "<region1>"
    assert region["concept"] and 0 <= region["prob"] <= 1
    x1, y1, x2, y2 = region["box"]
    assert 0 <= x1 < x2 <= 960 and 0 <= y1 < y2 <= 720
    box = client.predict(cid, {"box": [380, 330, 640, 560]}, api_name="/segment")
    assert box["number"] == 2
    snap = client.predict(cid, 1, api_name="/remove_region")
    assert [r["number"] for r in snap["regions"]] == [2]
    assert client.predict(cid, {"points": [[100, 100]]}, api_name="/segment")["number"] == 3  # never reused


@pytest.fixture(scope="module")
def demo_client(app_server) -> Client:
    """A client of the app on the shipped demo models (their TAP finds the `cars_scene`'s 3 cars)."""
    return Client(app_server(demo=True)[0], verbose=False)


def test_find_returns_every_instance_as_numbered_regions(demo_client: Client, cars_scene: Path) -> None:
    cid = demo_client.predict(api_name="/new_chat")
    demo_client.predict(cid, handle_file(str(cars_scene)), api_name="/set_image")
    sun = demo_client.predict(cid, {"points": [[66, 50]]}, api_name="/segment")
    out = demo_client.predict(cid, "cars", api_name="/find")
    assert out["found"] == {"car": 3}
    assert sorted(r["number"] for r in out["regions"]) == [2, 3, 4]  # numbered after the clicked one
    assert all(set(r) == set(sun) and r["concept"] == "car" and r["ref"] == f"<region{r['number']}>"
               for r in out["regions"])  # each as /segment returns a region
    assert demo_client.predict(cid, "car and balloon", api_name="/find")["found"] == {"car": 3, "balloon": 0}
    with pytest.raises(AppError, match=r"^'unicorns' is not in the concept vocabulary \(\d+ names\); closest: "):
        demo_client.predict(cid, "unicorns", api_name="/find")
    regions = demo_client.predict(cid, api_name="/open")["regions"]
    assert [r["number"] for r in regions] == [1, 2, 3, 4]  # the refused query changed nothing
    stranger = Client(demo_client.src, verbose=False)
    with pytest.raises(AppError, match="does not exist"):
        stranger.predict(cid, "cars", api_name="/find")


def test_chat_streams_and_is_stored(client: Client) -> None:
    cid = chat_with_image(client)
    client.predict(cid, {"points": [[510, 270]]}, api_name="/segment")
    job = client.submit(cid, "What is <region1>?", 0.0, 48, api_name="/chat")
    updates = list(job)
    assert len(updates) >= 3, "answers arrive piece by piece"
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:])), "each update extends the last"
    snap = client.predict(cid, api_name="/open")
    assert [m["role"] for m in snap["messages"]] == ["user", "assistant"]
    assert snap["messages"][1]["text"] == updates[-1].strip()
    assert snap["messages"][0]["regions"] == [1]
    assert snap["title"] == "What is <region1>?"  # the first question names the chat


def test_regenerate_undo_clear(client: Client) -> None:
    cid = chat_with_image(client)
    first = list(client.submit(cid, "Describe the image.", 0.0, 8, api_name="/chat"))[-1]
    again = list(client.submit(cid, 0.0, 8, api_name="/regenerate"))[-1]
    assert again == first  # greedy: the same answer, and still one turn
    assert len(client.predict(cid, api_name="/open")["messages"]) == 2
    list(client.submit(cid, "And the sky?", 0.0, 8, api_name="/chat"))
    assert client.predict(cid, api_name="/undo") == "And the sky?"
    assert len(client.predict(cid, api_name="/open")["messages"]) == 2
    assert client.predict(cid, api_name="/clear")["messages"] == []
    with pytest.raises(AppError, match="nothing to undo"):
        client.predict(cid, api_name="/undo")


def test_segment_everything_and_adopt(client: Client) -> None:
    cid = chat_with_image(client)
    found = client.predict(cid, api_name="/segment_everything")
    assert found and [c["number"] for c in found] == list(range(1, len(found) + 1))
    region = client.predict(cid, 1, api_name="/adopt")
    assert region["number"] == 1 and region["concept"] == found[0]["concept"]
    with pytest.raises(AppError, match="no candidate"):
        client.predict(cid, len(found) + 1, api_name="/adopt")


def test_ask_region_in_one_call(client: Client) -> None:
    out = client.predict(handle_file(SCENE), [{"points": [[510, 270]]}, {"box": [380, 330, 640, 560]}],
                         "Compare <region1> and <region2>.", 0.0, 16, api_name="/ask_region")
    assert [r["number"] for r in out["regions"]] == [1, 2]
    assert isinstance(out["answer"], str) and out["conversation_id"]
    assert out["conversation_id"] in [c["id"] for c in client.predict("", api_name="/history")]


def test_the_answer_check_note_is_returned(client: Client, monkeypatch) -> None:
    note = "TAP sees a white house here (<region1>)"
    monkeypatch.setattr("assistant.session.check_answer", lambda *a: [note])  # the server runs in this process
    cid = chat_with_image(client)
    client.predict(cid, {"points": [[510, 270]]}, api_name="/segment")
    list(client.submit(cid, "What is <region1>?", 0.0, 4, api_name="/chat"))
    assert [m.get("note") for m in client.predict(cid, api_name="/open")["messages"]] == [None, note]
    out = client.predict(handle_file(SCENE), [{"points": [[510, 270]]}], "What is <region1>?", 0.0, 4,
                         api_name="/ask_region")
    assert out["note"] == note


def test_history_search_rename_export_delete(client: Client) -> None:
    cid = chat_with_image(client)
    list(client.submit(cid, "Where is the zebra?", 0.0, 4, api_name="/chat"))
    assert [c["id"] for c in client.predict("zebra", api_name="/history")] == [cid]
    assert client.predict("no-such-words", api_name="/history") == []
    assert client.predict(cid, "Zebra hunt", api_name="/rename")["title"] == "Zebra hunt"
    records = client.predict(cid, "json", api_name="/export")["records"]
    assert records[0]["conversations"][0]["from"] == "human"
    assert "Where is the zebra?" in records[0]["conversations"][0]["value"]
    assert records[0]["image"].endswith(".jpg")
    md = client.predict(cid, "markdown", api_name="/export")["markdown"]
    assert md.startswith("# Zebra hunt") and "Where is the zebra?" in md
    assert client.predict(cid, api_name="/delete") is True
    assert cid not in [c["id"] for c in client.predict("", api_name="/history")]
    with pytest.raises(AppError, match="does not exist"):
        client.predict(cid, api_name="/open")


def test_two_clients_never_see_each_others_chats(server) -> None:
    alice, bob = Client(server[0], verbose=False), Client(server[0], verbose=False)
    cid = chat_with_image(alice)
    list(alice.submit(cid, "A private question.", 0.0, 4, api_name="/chat"))
    assert cid not in [c["id"] for c in bob.predict("", api_name="/history")]
    assert bob.predict("private", api_name="/history") == []
    for call in [lambda: bob.predict(cid, api_name="/open"),
                 lambda: bob.predict(cid, {"points": [[5, 5]]}, api_name="/segment"),
                 lambda: bob.submit(cid, "hi", api_name="/chat").result(),
                 lambda: bob.predict(cid, "mine now", api_name="/rename"),
                 lambda: bob.predict(cid, "json", api_name="/export"),
                 lambda: bob.predict(cid, api_name="/delete")]:
        with pytest.raises(AppError, match="does not exist"):
            call()
    assert alice.predict(cid, api_name="/open")["title"] == "A private question."


@pytest.mark.parametrize(("call", "message"), [
    (lambda c, cid: c.predict(cid, {"points": [[5000, 10]]}, api_name="/segment"), "outside the 960x720 image"),
    (lambda c, cid: c.predict(cid, {"box": [10, 10, 10, 10]}, api_name="/segment"), "empty"),
    (lambda c, cid: c.predict(cid, {"circle": 3}, api_name="/segment"), "unknown region prompt key"),
    (lambda c, cid: c.submit(cid, "   ", api_name="/chat").result(), "empty"),
    (lambda c, cid: c.submit(cid, "x" * 9000, api_name="/chat").result(), "too long"),
    (lambda c, cid: c.submit(cid, "What is <region9>?", api_name="/chat").result(), "unknown region"),
    (lambda c, cid: c.predict(cid, {"path": "/etc/passwd"}, api_name="/set_image"), "handle_file"),
    (lambda c, cid: c.predict("0" * 32, api_name="/open"), "does not exist"),
])
def test_bad_requests_get_plain_messages_and_the_chat_survives(client: Client, call, message: str) -> None:
    cid = chat_with_image(client)
    with pytest.raises(AppError, match=message):
        call(client, cid)
    assert client.predict(cid, {"points": [[510, 270]]}, api_name="/segment")["number"] == 1


def test_bad_images_are_refused_plainly(client: Client, bad_images) -> None:
    cid = client.predict(api_name="/new_chat")
    for path, message in bad_images:
        with pytest.raises(AppError, match=message):
            client.predict(cid, handle_file(str(path)), api_name="/set_image")
    ok = client.predict(cid, handle_file(SCENE), api_name="/set_image")
    assert ok["image_size"] == [960, 720]


def test_stop_ends_a_running_answer_and_keeps_it(server, client: Client, slow_tokens) -> None:
    import time

    slow_tokens(0.02)  # a slow model, so the answer is still running when stop arrives
    cid = chat_with_image(client)
    job = client.submit(cid, "Tell me a long story.", 0.0, 1000, api_name="/chat")
    deadline = time.monotonic() + 20
    while not client.predict(cid, api_name="/stop"):
        assert time.monotonic() < deadline, "the answer never started"
        time.sleep(0.05)
    job.result(timeout=20)
    snap = client.predict(cid, api_name="/open")
    answer = snap["messages"][1]
    assert not answer["complete"], "a stopped answer is kept, marked incomplete"
    tokens = len(server[1].bot.chat.tokenizer.encode(answer["text"]))
    assert tokens < 1000, "generation really stopped"
    assert client.predict(cid, api_name="/stop") is False


def test_auth_rejects_strangers_and_separates_users(app_server) -> None:
    url, _ = app_server(auth=[("alice", "pw-a"), ("bob", "pw-b")])
    with pytest.raises(Exception, match="(?i)auth|login|credentials|401|403"):
        Client(url, verbose=False).predict(api_name="/new_chat")
    with pytest.raises(Exception, match="(?i)auth|login|credentials|401|403"):
        Client(url, auth=("alice", "wrong"), verbose=False)
    alice = Client(url, auth=("alice", "pw-a"), verbose=False)
    cid = chat_with_image(alice)
    alice2 = Client(url, auth=("alice", "pw-a"), verbose=False)  # the same user in another session sees it
    assert cid in [c["id"] for c in alice2.predict("", api_name="/history")]
    bob = Client(url, auth=("bob", "pw-b"), verbose=False)
    assert bob.predict("", api_name="/history") == []
    with pytest.raises(AppError, match="does not exist"):
        bob.predict(cid, api_name="/open")


def test_the_same_image_is_stored_once(server, client: Client) -> None:
    a, b = chat_with_image(client), chat_with_image(client)
    files = sorted(server[1].bot.store.data_dir.rglob("*.jpg"))
    assert len([p for p in files if p.read_bytes() == Path(SCENE).read_bytes()]) == 1
    assert a != b
    assert np.asarray(Image.open(files[0])).shape == (720, 960, 3)


def test_a_click_does_not_wait_behind_another_users_answer(server, slow_tokens) -> None:
    """TAP work and answers queue in separate lanes, and the engine's fair lock interleaves them per token: Bob's
    click comes back while Alice's slow answer is still being written."""
    import threading
    import time

    slow_tokens(0.04)  # 40 ms per token: a 300-token answer takes 12 s
    alice, bob = Client(server[0], verbose=False), Client(server[0], verbose=False)
    a, b = chat_with_image(alice), chat_with_image(bob)
    answer = alice.submit(a, "Tell me a long story.", 0.0, 300, api_name="/chat")
    finished = threading.Event()
    threading.Thread(target=lambda: (answer.result(), finished.set()), daemon=True).start()
    deadline = time.monotonic() + 30
    while not answer.status().progress_data and answer.status().code.name != "ITERATING":
        assert time.monotonic() < deadline, "the answer never started streaming"
        time.sleep(0.05)
    region = bob.predict(b, {"point": [510, 270]}, api_name="/segment")
    assert region["number"] == 1
    assert not finished.is_set(), "the click waited for the whole answer"
    alice.predict(a, api_name="/stop")
    finished.wait(30)


def test_answers_of_several_users_are_decoded_together(server) -> None:
    """The LLM lane lets `answers_at_once` answers run, and the engine decodes them as one batch; each is the
    answer its user would get alone."""
    import threading

    url, service = server
    clients = [Client(url, verbose=False) for _ in range(3)]
    cids = [chat_with_image(c) for c in clients]
    questions = [f"Question {i}: what is in the picture?" for i in range(3)]
    alone = [list(c.submit(cid, q, 0.0, 40, api_name="/chat"))[-1] for c, cid, q in zip(clients, cids, questions)]
    service.bot.decoder.largest = 0
    for c, cid in zip(clients, cids):
        c.predict(cid, api_name="/clear")
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(
        i, list(clients[i].submit(cids[i], questions[i], 0.0, 40, api_name="/chat"))[-1])) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert service.bot.decoder.largest >= 2  # they overlapped in one decode batch
    assert [got[i] for i in range(3)] == alone
