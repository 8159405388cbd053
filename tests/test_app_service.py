"""`ChatService` and the page's pure helpers, without a server."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.config import AppConfig
from app.errors import UserError
from app.handlers import Handlers, scribble_stroke
from app.owners import AuthFileError, browser_owner, new_token, parse_credentials, pinned_secret, session_owner
from app.render import chat_messages, message_html, region_json
from app.service import ChatService
from assistant.engine import Assistant
from assistant.store import ChatStore
from assistant.template import Turn
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.region import Region

SCENE = Path(__file__).resolve().parents[1] / "examples" / "scene.jpg"
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.fixture(scope="module")
def bot_factory(tmp_path_factory):
    def make(data: Path) -> ChatService:
        config = AppConfig(data_dir=data, tiny=True, everything_grid=4, everything_min_iou=0.0)
        return ChatService(Assistant.tiny(store=ChatStore(config.db_path, config.image_dir)), config)
    return make


@pytest.fixture
def service(bot_factory, tmp_path: Path) -> ChatService:
    return bot_factory(tmp_path)


def test_negative_click_refines_the_latest_new_region_in_place(service: ChatService) -> None:
    cid = service.new_chat("ann")
    service.set_image("ann", cid, SCENE)
    first = service.click("ann", cid, 510, 270)
    refined = service.click("ann", cid, 100, 600, positive=False)
    assert refined.number == first.number == 1
    conv = service.session("ann", cid)
    assert conv.regions[1].prompt.labels == (1, 0)
    stored = service.bot.store.get_conversation("ann", cid).regions
    assert len(stored) == 1 and stored[0].prompt.labels == (1, 0)
    service.stream("ann", cid, "What is <region1>?", max_new_tokens=2).text()
    with pytest.raises(UserError, match="click a positive point first"):
        service.click("ann", cid, 90, 600, positive=False)  # region1 was sent: frozen


def test_undo_makes_its_regions_new_again_and_regenerate_repeats(service: ChatService) -> None:
    cid = service.new_chat("ann")
    service.set_image("ann", cid, SCENE)
    service.click("ann", cid, 510, 270)
    first = service.stream("ann", cid, "Describe it.", max_new_tokens=6)
    first_text = first.text()
    prompt = service.session("ann", cid).turns[0].prompt
    again = service.regenerate("ann", cid, max_new_tokens=6).text()
    assert again == first_text
    assert service.session("ann", cid).turns[0].prompt == prompt, "the region line comes back with the retry"
    assert service.undo("ann", cid) == "Describe it."
    assert service.session("ann", cid).new_regions == [1]
    assert service.bot.store.get_conversation("ann", cid).messages == []


def test_a_second_stream_in_the_same_chat_is_refused_while_one_runs(service: ChatService) -> None:
    cid = service.new_chat("ann")
    service.set_image("ann", cid, SCENE)
    running = service.stream("ann", cid, "One.", max_new_tokens=50)
    it = iter(running)
    next(it)
    with pytest.raises(UserError, match="still being written"):
        service.undo("ann", cid)
    assert service.stop("ann", cid) is True
    list(it)
    assert not service.session("ann", cid).turns[-1].complete


def test_reopened_after_restart_the_chat_and_overlay_are_identical(bot_factory, tmp_path: Path) -> None:
    one = bot_factory(tmp_path)
    cid = one.new_chat("ann")
    one.set_image("ann", cid, SCENE)
    one.click("ann", cid, 510, 270)
    one.add_region("ann", cid, Prompt.from_dict({"box": [380, 330, 640, 560]}))
    one.remove_region("ann", cid, 1)
    one.stream("ann", cid, "What is <region2>?", max_new_tokens=5).text()
    before, overlay = one.snapshot("ann", cid), np.asarray(one.overlay("ann", cid))
    two = bot_factory(tmp_path)  # a new process over the same files
    after = two.snapshot("ann", cid)
    assert after.to_dict() == before.to_dict()
    assert np.array_equal(np.asarray(two.overlay("ann", cid)), overlay)
    assert [r.number for r in after.regions] == [2]


def test_incremental_overlay_equals_a_full_redraw(bot_factory, tmp_path: Path) -> None:
    one = bot_factory(tmp_path)
    cid = one.new_chat("ann")
    one.set_image("ann", cid, SCENE)
    for x, y in [(510, 270), (175, 400), (700, 600)]:
        one.click("ann", cid, x, y)
        one.overlay("ann", cid)  # each click tints only its new mask onto the kept overlay
    one.click("ann", cid, 820, 100, positive=False)  # refining swaps the last mask: redrawn, not stacked
    fresh = bot_factory(tmp_path)  # no cache: draws everything from the stored masks
    assert np.array_equal(np.asarray(one.overlay("ann", cid)), np.asarray(fresh.overlay("ann", cid)))


def test_export_markdown_zip_has_the_annotated_image(service: ChatService) -> None:
    cid = service.new_chat("ann")
    service.set_image("ann", cid, SCENE)
    service.click("ann", cid, 510, 270)
    service.stream("ann", cid, "Name <region1>.", max_new_tokens=3).text()
    with zipfile.ZipFile(service.export("ann", cid, "markdown")) as zf:
        assert sorted(zf.namelist()) == ["annotated.png", "chat.md"]
        md = zf.read("chat.md").decode()
    assert md.startswith("# Name <region1>.") and "![annotated image](annotated.png)" in md
    assert "`<region1>`" in md and "**You:** Name <region1>." in md
    with pytest.raises(UserError, match="json or markdown"):
        service.export("ann", cid, "pdf")


def test_an_answer_that_disagrees_with_tap_shows_and_returns_its_note(bot_factory, tmp_path: Path,
                                                                       monkeypatch) -> None:
    service = bot_factory(tmp_path)
    cid = service.new_chat("ann")
    service.set_image("ann", cid, SCENE)
    region = service.click("ann", cid, 510, 270)
    region.concepts, region.caption = [("house", 0.8)], "a white house"
    said = "<region1> is a red house."
    monkeypatch.setattr(service.bot.chat.tokenizer, "decode", lambda ids, **kw: said)  # the tiny model's answer
    service.stream("ann", cid, "What is <region1>?", max_new_tokens=3).text()
    note = "TAP sees a white house here (<region1>)"
    snap = service.snapshot("ann", cid)
    assert [m["note"] for m in snap.to_dict()["messages"][1:]] == [note]
    shown = chat_messages(snap.turns, snap.regions)[1]["content"]
    assert shown.index("is a red house.") < shown.index('class="tap-note"')  # under the answer
    assert "⚠ TAP sees a white house here (" in shown
    with zipfile.ZipFile(service.export("ann", cid, "markdown")) as zf:
        assert f"> ⚠ {note}" in zf.read("chat.md").decode()
    assert bot_factory(tmp_path).snapshot("ann", cid).to_dict()["messages"][1]["note"] == note  # from the store
    monkeypatch.setattr("assistant.session.check_answer", lambda *a: ["TAP sees a dog here (<region1>)"])
    out = service.ask_region("ann", SCENE, [Prompt.point(510, 270)], "What is <region1>?", max_new_tokens=2)
    assert out["answer"] == said and out["note"] == "TAP sees a dog here (<region1>)"


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory) -> ChatService:
    """A service on the shipped demo models: their TAP finds the 3 cars of the `cars_scene`."""
    config = AppConfig(data_dir=tmp_path_factory.mktemp("demo"))
    store = ChatStore(config.db_path, config.image_dir)
    return ChatService(Assistant.demo(store=store, device="cpu", folder=DEMO), config)


def test_find_numbers_every_instance_like_a_click_and_counts_each_concept(demo_service: ChatService,
                                                                         cars_scene: Path) -> None:
    cid = demo_service.new_chat("ann")
    demo_service.set_image("ann", cid, cars_scene)
    sun = demo_service.click("ann", cid, 66, 50)  # the scene's sun: a region before the Find
    assert sun.number == 1 and sun.concept != "car"
    found = demo_service.find("ann", cid, "cars")
    assert found.counts == {"car": 3} and found.summary == "3 × car"
    assert sorted(r.number for r in found.regions) == [2, 3, 4] and {r.concept for r in found.regions} == {"car"}
    assert found.to_dict() == {"regions": [region_json(r) for r in found.regions], "found": {"car": 3}}
    again = demo_service.find("ann", cid, "Cars and balloons")  # found cars keep their numbers; none is a count
    assert again.summary == "3 × car, 0 × balloon" and [r.number for r in again.regions] == [r.number for r in
                                                                                              found.regions]
    assert [r.number for r in demo_service.region_views("ann", cid)] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="'unicorns' is not in the concept vocabulary .*closest: "):
        demo_service.find("ann", cid, "unicorns")
    with pytest.raises(UserError, match="does not exist"):
        demo_service.find("bob", cid, "cars")  # someone else's chat
    assert [r.number for r in demo_service.region_views("ann", cid)] == [1, 2, 3, 4]  # refusals changed nothing
    assert demo_service.remove_regions("ann", cid) == [1, 2, 3, 4] and demo_service.region_views("ann", cid) == []
    assert sorted(r.number for r in demo_service.find("ann", cid, "car").regions) == [5, 6, 7]  # never reused
    with pytest.raises(UserError, match="Upload an image first"):
        demo_service.find("ann", demo_service.new_chat("ann"), "cars")


def test_an_answer_citing_regions_makes_them_stand_out(service: ChatService, monkeypatch) -> None:
    cid = service.new_chat("ann")
    service.set_image("ann", cid, SCENE)
    service.click("ann", cid, 510, 270)
    service.click("ann", cid, 100, 100)
    handlers = Handlers(service, False, [])
    said = {"text": "It is <region2>."}
    monkeypatch.setattr(service.bot.chat.tokenizer, "decode", lambda ids, **kw: said["text"])  # the tiny model's

    def overlay_after(question: str) -> np.ndarray:
        *_, (_, _, _, overlay) = handlers.on_send("ann", cid, question, 0.0, 3)
        return np.asarray(overlay)

    cited = overlay_after("Which one?")
    assert np.array_equal(cited, np.asarray(service.overlay("ann", cid, {2})))
    assert not np.array_equal(cited, np.asarray(service.overlay("ann", cid)))
    assert not np.array_equal(cited, np.asarray(service.overlay("ann", cid, 1)))
    said["text"] = "Nothing."
    assert np.array_equal(overlay_after("And now?"), np.asarray(service.overlay("ann", cid)))  # plain again


def test_everything_candidates_and_focus_overlay(service: ChatService) -> None:
    cid = service.new_chat("ann")
    service.set_image("ann", cid, SCENE)
    with pytest.raises(UserError, match="Segment everything first"):
        service.adopt("ann", cid, 1)
    found = service.segment_everything("ann", cid)
    image, masks = service.everything_overlay("ann", cid)
    assert image.shape == (720, 960, 3) and len(masks) == len(found) > 0
    region = service.adopt("ann", cid, 1)
    plain = np.asarray(service.overlay("ann", cid)).astype(int)
    focused = np.asarray(service.overlay("ann", cid, focus=region.number)).astype(int)
    assert np.abs(plain - focused).sum() > 0


def test_upload_limits(service: ChatService, tmp_path: Path) -> None:
    service.config.max_upload_mb = 0
    cid = service.new_chat("ann")
    with pytest.raises(UserError, match="limit is 0 MB"):
        service.set_image("ann", cid, SCENE)
    with pytest.raises(UserError, match="did not arrive"):
        service.set_image("ann", cid, tmp_path / "missing.png")
    with pytest.raises(UserError, match="Start a chat first"):
        service.snapshot("ann", "")


def test_message_html_escapes_and_links_region_references() -> None:
    html = message_html("<b>hi</b> see <region2> and <region7>\x07", {2: "#ff0000"})
    assert "<b>" not in html and "&lt;b&gt;hi&lt;/b&gt;" in html
    assert "tap-ref-2" in html and "#ff0000" in html and "tap-ref-7" in html
    assert "\x07" not in html
    regions = [Region([("dog", 0.9)], "a dog", box=(0, 0, 5, 5), area=0.01, size=(50, 50), number=2)]
    turns = [Turn("hi <region2>", "a dog", "hi <region2>", complete=False)]
    shown = chat_messages(turns, regions)
    assert [m["role"] for m in shown] == ["user", "assistant"] and "tap-ref-2" in shown[0]["content"]
    assert shown[1]["content"].endswith("*(stopped)*")
    assert chat_messages(turns, regions, streaming=True)[1]["content"].endswith("▌")


def test_scribble_stroke_follows_the_drawing() -> None:
    layer = np.zeros((100, 200, 4), np.uint8)
    layer[40:44, 20:180, 3] = 255  # a horizontal stroke
    stroke = scribble_stroke({"layers": [layer]})
    xs = [x for x, _ in stroke]
    assert xs == sorted(xs) or xs == sorted(xs, reverse=True)
    assert min(xs) == 20 and max(xs) == 179
    with pytest.raises(UserError, match="Draw over an object"):
        scribble_stroke({"layers": [np.zeros((10, 10, 4), np.uint8)]})


def test_owners_and_credentials(tmp_path: Path) -> None:
    token = new_token()
    assert browser_owner(token) == browser_owner(token) != browser_owner(new_token())
    assert browser_owner("forged") is None and browser_owner("") is None
    assert session_owner("a") != session_owner("b")
    secret = pinned_secret(tmp_path)
    assert pinned_secret(tmp_path) == secret and (tmp_path / "browser-secret").stat().st_mode & 0o077 == 0
    auth = tmp_path / "users.txt"
    auth.write_text("# team\nalice:pw:with:colons\n\nbob: spaced\n")
    assert parse_credentials(["carol:x"], [auth]) == [("carol", "x"), ("alice", "pw:with:colons"), ("bob", " spaced")]
    with pytest.raises(AuthFileError, match="expected user:password"):
        parse_credentials(["nopassword"], [])
    with pytest.raises(AuthFileError, match="cannot read"):
        parse_credentials([], [tmp_path / "absent.txt"])


def test_an_upload_is_decoded_once(service: ChatService, monkeypatch) -> None:
    """Validation, the encoder, the store (format, size) and the overlay all share one decode of the file."""
    import PIL.Image
    real, opened = PIL.Image.open, []

    def counting(*args, **kwargs):
        opened.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    snap = service.set_image("ann", "", SCENE.read_bytes())
    assert len(opened) == 1 and snap.image is not None and snap.image.shape[:2] == (720, 960)
    conv = service.session("ann", snap.conversation_id)
    assert service.bot.store.image_path(conv.image_sha).read_bytes() == SCENE.read_bytes()  # kept as uploaded
