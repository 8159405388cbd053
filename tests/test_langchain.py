"""LangChain bindings on a tiny random Assistant: parity with `Assistant.ask`, streaming, stop sequences, images,
regions, replayed turns, refusals, the ChatStore-backed history, and langchain-tests' standard unit tests."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_tests.unit_tests import ChatModelUnitTests
from PIL import Image
from pydantic import ValidationError

from assistant.decoding import GenerationSettings
from assistant.engine import Assistant
from assistant.langchain_chat import TapChatMessageHistory, TapChatModel
from assistant.langchain_tools import find_tool
from assistant.store import ChatStore, NotFoundError
from assistant.template import parse_line
from tokenizer_tap.prompts import Prompt

TOKENS = 12
GREEDY = GenerationSettings(max_new_tokens=TOKENS)
REGIONS = [{"point": [200, 150]}, {"box": [10, 10, 120, 90]}, {"scribble": [[40, 250], [60, 260], [90, 270]]},
           {"point": [300, 60], "negatives": [[320, 80]]}]
PROMPTS = [Prompt.point(200, 150), Prompt.from_box(10, 10, 120, 90), Prompt.scribble([(40, 250), (60, 260), (90, 270)]),
           Prompt.point(300, 60, negatives=[(320, 80)])]


@pytest.fixture(scope="module")
def bot() -> Assistant:
    return TapChatModel(tiny=True).assistant  # the same tiny Assistant the standard tests build, made once


@pytest.fixture(scope="module")
def model(bot: Assistant) -> TapChatModel:
    return TapChatModel(assistant=bot, max_new_tokens=TOKENS)


@pytest.fixture
def png(photo: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


@pytest.fixture
def prompts(bot: Assistant, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text the chat model tokenizes: the last one is the prompt it answered."""
    seen: list[str] = []
    tokenize = bot.chat.tokenize

    def spy(text: str):
        seen.append(text)
        return tokenize(text)

    monkeypatch.setattr(bot.chat, "tokenize", spy)
    return seen


def human(text: str, b64: str | None = None, regions: list | None = None) -> HumanMessage:
    content: list = [{"type": "text", "text": text}]
    if b64 is not None:
        content.append({"type": "image", "base64": b64, "mime_type": "image/png"})
    return HumanMessage(content=content, additional_kwargs={"regions": regions} if regions else {})


def ask(bot: Assistant, image: np.ndarray | None, turns: Sequence[tuple[str, Sequence[Prompt]]]) -> list[str]:
    """The same chat through the Assistant itself, one live turn after another."""
    conv = bot.start(image=image)
    answers = []
    for text, region_prompts in turns:
        for p in region_prompts:
            bot.add_region(conv, p)
        answers.append(bot.ask(conv, text, GREEDY).text)
    return answers


def test_invoke_matches_the_assistant(model, bot, photo, b64):
    msg = model.invoke([human("What is in the picture?", b64)])
    assert isinstance(msg, AIMessage) and msg.content
    assert msg.content == ask(bot, photo, [("What is in the picture?", [])])[0]
    assert msg.usage_metadata["output_tokens"] <= TOKENS and msg.usage_metadata["input_tokens"] > 1000  # visual
    assert msg.response_metadata["model_name"] == bot.model_id
    assert model.invoke("Hello there").content == ask(bot, None, [("Hello there", [])])[0]  # a plain string works


def test_stream_and_callbacks_add_up_to_invoke(model, b64):
    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs) -> None:
            self.tokens.append(token)

    messages = [human("Describe it.", b64)]
    answer = model.invoke(messages).content
    handler = Tokens()
    chunks = list(model.stream(messages, config={"callbacks": [handler]}))
    assert len(chunks) > 2
    assert "".join(c.content for c in chunks) == "".join(handler.tokens) == answer
    assert chunks[-1].usage_metadata is not None
    streaming = model.model_copy(update={"streaming": True})
    handler = Tokens()
    assert streaming.invoke(messages, config={"callbacks": [handler]}).content == answer
    assert "".join(handler.tokens) == answer


class ThreadPerCall(ThreadPoolExecutor):
    """Every task on a new thread: what a busy default executor may do to successive steps of one stream."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=run).start()
        return future


def test_batch_and_async_equal_single_invokes(model, b64):
    inputs = [[human("What is this?", b64)], [human("Hello there")], [human("Why?")]]
    expected = [model.invoke(m).content for m in inputs]
    assert [m.content for m in model.batch(inputs)] == expected
    assert len(set(expected)) == 3  # three different answers, so the order is really checked

    async def run() -> tuple[str, str, list[str]]:
        asyncio.get_running_loop().set_default_executor(ThreadPerCall())
        whole = await model.ainvoke(inputs[0])
        pieces = "".join([c.content async for c in model.astream(inputs[1])])
        return whole.content, pieces, [m.content for m in await model.abatch(inputs)]

    assert asyncio.run(run()) == (expected[0], expected[1], expected)


def test_an_abandoned_stream_frees_the_model(model, bot):
    stream = model.stream("Hello there")
    assert next(stream).content
    stream.close()
    answers: list[str] = []
    other = threading.Thread(target=lambda: answers.append(model.invoke("Why?").content))
    other.start()
    other.join(timeout=30)
    assert answers == [ask(bot, None, [("Why?", [])])[0]]


@pytest.mark.parametrize("form", ["base64", "data_url", "openai_image_url", "v0_base64", "path"])
def test_every_image_block_form(model, bot, photo, png, b64, tmp_path, form):
    (tmp_path / "photo.png").write_bytes(png)
    block = {
        "base64": {"type": "image", "base64": b64, "mime_type": "image/png"},
        "data_url": {"type": "image", "url": f"data:image/png;base64,{b64}"},
        "openai_image_url": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        "v0_base64": {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},
        "path": {"type": "image", "source_type": "path", "path": "photo.png"},
    }[form]
    local = model.model_copy(update={"image_dir": tmp_path})
    msg = HumanMessage(content=[{"type": "text", "text": "What is <region1>?"}, block],
                       additional_kwargs={"regions": [{"point": [200, 150]}]})
    assert local.invoke([msg]).content == ask(bot, photo, [("What is <region1>?", PROMPTS[:1])])[0]


def test_regions_of_every_kind_reach_the_prompt(model, bot, photo, b64, prompts):
    answer = model.invoke([human("Compare <region1> and <region4>.", b64, REGIONS)])
    sent = prompts[-1]
    expected = ask(bot, photo, [("Compare <region1> and <region4>.", PROMPTS)])[0]
    assert prompts[-1] == sent  # the Assistant built exactly the same prompt ...
    assert answer.content == expected  # ... and answered the same
    assert answer.response_metadata["regions"] == [1, 2, 3, 4]
    turn = sent.split("USER: <image>\n", 1)[1].removesuffix(" ASSISTANT:").splitlines()
    assert [parse_line(line).number for line in turn[:-1]] == [1, 2, 3, 4]
    assert turn[-1] == "Compare <region1> and <region4>."


def test_earlier_turns_are_replayed(model, bot, photo, b64, prompts):
    live = ask(bot, photo, [("What is <region1>?", PROMPTS[:1]), ("And <region2> next to <region1>?", PROMPTS[1:2])])
    live_prompt = prompts[-1]
    messages = [human("What is <region1>?", b64, REGIONS[:1]), AIMessage(content=live[0]),
                human("And <region2> next to <region1>?", regions=REGIONS[1:2])]
    assert model.invoke(messages).content == live[1]
    assert prompts[-1] == live_prompt and live_prompt.count("<region1>: ") == 2  # turn 1's line, repeated in turn 2
    # an answer marked incomplete stays out of the prompt, as a stopped answer does in a live chat
    cut = [messages[0], AIMessage(content=live[0], additional_kwargs={"complete": False}), human("Anything else?")]
    assert model.invoke(cut).content == ask(bot, photo, [("Anything else?", [])])[0]
    assert "What is <region1>?" not in prompts[-1]


def test_a_new_image_starts_a_new_visual_context(model, bot, photo, b64):
    other = photo[::-1].copy()
    buf = io.BytesIO()
    Image.fromarray(other).save(buf, format="PNG")
    other_b64 = base64.b64encode(buf.getvalue()).decode()
    conv = bot.start(image=photo)
    bot.add_region(conv, PROMPTS[0])
    first = bot.ask(conv, "What is <region1>?", GREEDY).text
    bot.set_image(conv, other)
    bot.add_region(conv, PROMPTS[0])
    live = bot.ask(conv, "And now <region2>?", GREEDY)
    messages = [human("What is <region1>?", b64, REGIONS[:1]), AIMessage(content=first),
                human("And now <region2>?", other_b64, REGIONS[:1])]
    answer = model.invoke(messages)
    assert answer.content == live.text and answer.response_metadata["regions"] == live.regions == [2]
    assert answer.response_metadata["note"] == live.note  # the answer check's note, as the live chat gives it
    with pytest.raises(ValueError, match="message 5: <region1> belongs to an earlier image"):
        model.invoke([*messages[:2], human("x", other_b64), AIMessage(content="y"), human("What about <region1>?")])


@pytest.mark.slow
def test_grounded_mode_replays_scene_lines(photo, b64):
    grounded = Assistant.tiny("grounded", lora=False)
    live = ask(grounded, photo, [("What is here?", []), ("And now?", [])])
    chat = TapChatModel(assistant=grounded, max_new_tokens=TOKENS)
    messages = [human("What is here?", b64), AIMessage(content=live[0]), human("And now?")]
    assert chat.invoke(messages).content == live[1]


def test_stop_sequences(model, b64):
    messages = [human("Tell me more.", b64)]
    full = model.invoke(messages).content
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() == full[i:i + 2])
    expected = full[:full.find(stop)].strip()
    assert model.invoke(messages, stop=[stop]).content == expected
    assert "".join(c.content for c in model.stream(messages, stop=[stop])) == expected
    assert model.model_copy(update={"stop": [stop]}).invoke(messages).content == expected  # the model's default
    assert model.invoke(messages, stop=["never in gibberish \x00"]).content == full
    short = model.invoke(messages, stop=[stop], max_tokens=3)
    assert short.usage_metadata["output_tokens"] <= 3


def test_system_message_is_ignored(model, b64):
    messages = [human("What is this?", b64)]
    assert model.invoke([SystemMessage(content="Answer in French."), *messages]).content == \
        model.invoke(messages).content


BAD = [
    ([], "no human message"),
    ([SystemMessage(content="hi")], "no human message"),
    ([AIMessage(content="hi")], r"message 1 \(AIMessage\) is out of place"),
    ([HumanMessage(content="a"), HumanMessage(content="b")], r"message 2 \(HumanMessage\)"),
    ([HumanMessage(content="a"), AIMessage(content="b")], "last message must be a human"),
    ([HumanMessage(content="a"), SystemMessage(content="b"), HumanMessage(content="c")], r"2 \(SystemMessage\)"),
    ([ToolMessage(content="3", tool_call_id="t")], r"message 1 \(ToolMessage\)"),
    ([HumanMessage(content="   ")], "message 1: the message is empty"),
    ([HumanMessage(content=[{"type": "image", "base64": "not base64!", "mime_type": "image/png"}])], "base64"),
    ([HumanMessage(content=[{"type": "text", "text": "hi"}, {"type": "image", "base64": "aGVsbG8=",
                                                               "mime_type": "image/png"}])], "message 1: image data"),
    ([HumanMessage(content=[{"type": "image", "url": "https://example.com/cat.png"}])], "not fetched"),
    ([HumanMessage(content=[{"type": "image", "file_id": "file-1"}])], "needs base64"),
    ([HumanMessage(content=[{"type": "image", "source_type": "path", "path": "/etc/passwd"}])], "image_dir"),
    ([HumanMessage(content=[{"type": "audio", "base64": "aGVsbG8=", "mime_type": "audio/wav"}])], "'audio'"),
    ([HumanMessage(content="hi", additional_kwargs={"regions": [{"point": [1, 1]}]})], "regions need an image"),
    ([HumanMessage(content="What is <region3>?")], "unknown region"),
]
BAD_REGIONS = [
    ({"regions": {"point": [1, 2]}}, "must be a list"),
    ({"regions": [[1, 2]]}, "region 1: a region prompt is an object"),
    ({"regions": [{"point": [1, 2], "box": [1, 2, 3, 4]}]}, "a 'point' region stands alone: drop box"),
    ({"regions": [{"circle": [1, 2]}]}, "unknown region prompt key"),
    ({"regions": [{"point": [1, 2], "colour": "red"}]}, "unknown region prompt key"),
    ({"regions": [{"box": [1, 2, 30, 40], "negatives": [[5, 5]]}]}, "only with a 'point'"),
    ({"regions": [{"point": [1, 2, 3]}]}, "point must be 2 numbers"),
    ({"regions": [{"point": ["a", 2]}]}, "point must be 2 numbers"),
    ({"regions": [{"point": [1, 2]}, {"point": [999, 2]}]}, "region 2: point .* outside the 400x300 image"),
    ({"regions": [{"box": [1, 2, 3]}]}, "box must be 4 numbers"),
    ({"regions": [{"scribble": []}]}, "at least one point"),
]


@pytest.mark.parametrize(("messages", "match"), BAD)
def test_bad_messages_are_refused_plainly(model, messages, match):
    with pytest.raises(ValueError, match=match) as err:
        model.invoke(messages)
    assert type(err.value) is ValueError


@pytest.mark.parametrize(("kwargs", "match"), BAD_REGIONS)
def test_bad_regions_are_refused_plainly(model, b64, kwargs, match):
    msg = HumanMessage(content=[{"type": "text", "text": "hi"}, {"type": "image", "base64": b64,
                                                               "mime_type": "image/png"}], additional_kwargs=kwargs)
    with pytest.raises(ValueError, match=f"message 1: .*{match}") as err:
        model.invoke([msg])
    assert type(err.value) is ValueError


def test_bad_settings_and_paths_are_refused(model, bot, b64, tmp_path):
    with pytest.raises(ValidationError, match="temperature"):
        TapChatModel(assistant=bot, temperature=9.0)
    with pytest.raises(ValidationError, match="either assistant"):
        TapChatModel(assistant=bot, tiny=True)
    with pytest.raises(ValueError, match="unsupported argument"):
        model.invoke("hi", tools=[])
    outside = model.model_copy(update={"image_dir": tmp_path / "images"})
    block = {"type": "image", "source_type": "path", "path": "../secret.png"}
    with pytest.raises(ValueError, match="outside image_dir"):
        outside.invoke([HumanMessage(content=[{"type": "text", "text": "hi"}, block])])


def test_an_assistant_with_a_store_is_used_without_writing_to_it(bot, b64, tmp_path):
    store = ChatStore(tmp_path / "chat.db")
    stored = Assistant(bot.predictor, bot.chat, store)
    chat = TapChatModel(assistant=stored, max_new_tokens=TOKENS)
    assert chat.invoke([human("What is <region1>?", b64, REGIONS[:1])]).content
    assert stored.store is store and store.list_conversations("langchain") == []
    assert len(stored.kv) == 0  # stateless calls leave no KV cache behind
    store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChatStore]:
    with ChatStore(tmp_path / "chat.db") as s:
        yield s


def test_history_round_trip(store):
    conv = store.create_conversation("alice", "LangChain")
    history = TapChatMessageHistory(store, "alice", conv)
    sent: list[BaseMessage] = [HumanMessage(content="What is it?"), AIMessage(content="A dog."),
                               HumanMessage(content="And that?"),
                               AIMessage(content="A ca", additional_kwargs={"complete": False})]
    history.add_messages(sent)
    history.add_user_message("Thanks")
    got = history.messages
    assert [(type(m), m.content) for m in got] == [(type(m), m.content) for m in sent] + [(HumanMessage, "Thanks")]
    assert [m.additional_kwargs.get("complete") for m in got if isinstance(m, AIMessage)] == [True, False]
    ai = [m.id for m in store.get_conversation("alice", conv).messages if m.role == "assistant"]
    store.update_message("alice", ai[0], "A dog.", complete=True, note="TAP sees a cat here (<region1>)")
    assert [m.additional_kwargs["note"] for m in history.messages if isinstance(m, AIMessage)] == [
        "TAP sees a cat here (<region1>)", ""]
    assert [m.role for m in store.get_conversation("alice", conv).messages] == ["user", "assistant"] * 2 + ["user"]
    with pytest.raises(ValueError, match="not SystemMessage"):
        history.add_messages([HumanMessage(content="kept?"), SystemMessage(content="no")])
    assert len(history.messages) == 5  # nothing of a refused batch is written
    history.clear()
    assert history.messages == [] and store.get_conversation("alice", conv).messages == []


def test_history_is_per_owner(store):
    conv = store.create_conversation("alice")
    TapChatMessageHistory(store, "alice", conv).add_ai_message("secret")
    with pytest.raises(NotFoundError):
        TapChatMessageHistory(store, "mallory", conv)
    with pytest.raises(NotFoundError):
        TapChatMessageHistory(store, "alice", "0" * 32)


def test_history_drives_a_chat(model, bot, store):
    conv = store.create_conversation("alice")
    chain = RunnableWithMessageHistory(model, lambda session: TapChatMessageHistory(store, "alice", session))
    config = {"configurable": {"session_id": conv}}
    first = chain.invoke([HumanMessage(content="Hi there")], config=config)
    second = chain.invoke([HumanMessage(content="And then?")], config=config)
    assert [first.content, second.content] == ask(bot, None, [("Hi there", []), ("And then?", [])])
    assert [m.content for m in TapChatMessageHistory(store, "alice", conv).messages] == \
        ["Hi there", first.content, "And then?", second.content]


def test_the_find_tool_makes_every_instance_a_region_of_the_chat(cars_scene: Path) -> None:
    bot = Assistant.demo(device="cpu", folder=Path(__file__).resolve().parents[1] / "models" / "demo")
    chat = bot.start(image=cars_scene)
    chat.add_region(Prompt.point(66, 50))  # the scene's sun
    tool = find_tool(chat)
    assert tool.name == "find" and list(tool.args) == ["query"] and "<regionN>" in tool.description
    out = json.loads(tool.invoke({"query": "cars and balloons"}))
    assert out["found"] == {"car": 3, "balloon": 0}
    assert sorted(r["number"] for r in out["regions"]) == [2, 3, 4]
    assert all(r["concept"] == "car" and r["ref"] == f"<region{r['number']}>" and len(r["box"]) == 4
               for r in out["regions"])
    assert [r.number for r in chat.current_regions()] == [1, 2, 3, 4]  # the chat can now cite them
    chat.ask("What is <region3>?", GenerationSettings(max_new_tokens=2))
    assert "<region3>: car (" in chat.turns[-1].prompt  # a question can cite what the tool found
    message = tool.invoke({"type": "tool_call", "id": "t1", "name": "find", "args": {"query": "unicorns"}})
    assert isinstance(message, ToolMessage) and message.tool_call_id == "t1"
    assert message.content.startswith("'unicorns' is not in the concept vocabulary") and "closest: " in message.content
    assert tool.invoke("cars").startswith('{"found": {"car": 3}')  # a plain string query works too
    assert find_tool(bot.start()).invoke("cars") == "add an image before finding"


class TestTapChatModelStandard(ChatModelUnitTests):
    """langchain-tests' unit suite: construction, standard params, tracing params, init time."""

    @property
    def chat_model_class(self) -> type[TapChatModel]:
        return TapChatModel

    @property
    def chat_model_params(self) -> dict:
        return {"tiny": True}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return False  # remote URLs are never fetched
