"""LangChain bindings: `TapChatModel` (a chat model over an `Assistant`) and `TapChatMessageHistory` (a `ChatStore`).

Why it looks the way it does:
- LangChain calls are stateless: every call builds a fresh, never-stored conversation from the messages, replays
  the earlier human/AI pairs as finished turns (prompts rebuilt exactly as the `Assistant` builds them, so a replayed
  chat answers like the live one), then answers the last human message. Its KV cache is dropped afterwards.
- The Bunny template has a fixed system text that checkpoints were trained with, so a leading `SystemMessage` is
  ignored rather than spliced in (a different system text only makes answers worse); anywhere else it is refused.
- A human message may carry one image (standard `image` blocks with base64 data or a `data:` URL, OpenAI
  `image_url` blocks, or a local path under `image_dir`) and regions in `additional_kwargs["regions"]`. Remote URLs
  are never fetched. Regions are numbered `<region1>`, `<region2>` ... across the whole chat, in the order sent.
- Bad input raises a plain `ValueError` that says which message is wrong, so callers need none of our error types.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from tokenizer_tap.prompts import Prompt

from .decoding import GenerationSettings
from .engine import Assistant
from .loading import LoadOptions, load
from .session import Session
from .store import ChatStore
from .template import ConversationError

SETTING_NAMES = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")


@lru_cache(maxsize=1)
def _tiny_assistant() -> Assistant:
    """One shared tiny Assistant: `tiny=True` models are for tests and demos, and building one takes seconds."""
    return load(Assistant, LoadOptions(tiny=True)).assistant


class TapChatModel(BaseChatModel):
    """TAP-Chat as a LangChain chat model: `invoke`, `stream`, `batch` (and their async forms) over an `Assistant`.

    Example:
        model = TapChatModel(assistant=Assistant.from_pretrained("checkpoints/tapchat"), max_new_tokens=128)
        msg = HumanMessage(content=[{"type": "text", "text": "What is <region1>?"},
                                    {"type": "image", "base64": png_b64, "mime_type": "image/png"}],
                           additional_kwargs={"regions": [{"point": [120, 340]}]})
        print(model.invoke([msg]).content)

    Regions: `Prompt.from_dict`'s schema, e.g. `{"point": [x, y]}` (optionally with `"negatives": [[x, y], ...]`),
    `{"box": [x1, y1, x2, y2]}` or `{"scribble": [[x, y], ...]}`, in pixels of the message's image (or the latest
    earlier one).
    An Assistant with a history store is used through a storeless view (same models, caches and lock): LangChain
    calls never write to the store; use `TapChatMessageHistory` for that.
    """

    assistant: Assistant = Field(exclude=True, repr=False)
    tiny: bool = Field(default=False, exclude=True)
    """Build (once per process) a tiny random Assistant instead of passing one: for tests and demos."""
    max_new_tokens: int = Field(default=256, alias="max_tokens")
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    """Default stop sequences; a per-call `stop` replaces them."""
    streaming: bool = False
    """Make `invoke` stream internally (callbacks then get every token)."""
    image_dir: Path | None = None
    """Local image paths in messages are read only from inside this folder; None refuses them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, validate_by_name=True, validate_by_alias=True)

    _engine: Assistant = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _build_tiny(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tiny"):
            if data.get("assistant") is not None:
                raise ValueError("pass either assistant=... or tiny=True, not both")
            data = {**data, "assistant": _tiny_assistant()}
        return data

    @model_validator(mode="after")
    def _check(self) -> TapChatModel:
        self._settings({})  # refuse out-of-range settings now rather than at the first call
        if self.assistant.store is None:
            self._engine = self.assistant
        else:
            self._engine = copy.copy(self.assistant)  # shares models, caches and the lock; only the store differs
            self._engine.store = None
        return self

    @property
    def _llm_type(self) -> str:
        return "tap-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.assistant.model_id, **self._settings({}).to_dict()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="tapchat", ls_model_type="chat",
            ls_model_name=model if isinstance(model, str) else self.assistant.model_id,
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)))
        if stops := stop if stop is not None else self.stop:
            params["ls_stop"] = stops
        return params

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        """One answer: the stream collected, so stop sequences and metadata behave exactly as when streaming."""
        return generate_from_stream(self._stream(messages, stop, None, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """Answer the last human message piece by piece.

        Trailing whitespace and any tail that could begin a stop sequence are held back, so the pieces always add
        up to the final (trimmed, cut) answer. Generation stops at the first stop sequence.
        """
        settings = self._settings(kwargs)
        stops = [s for s in (stop if stop is not None else self.stop or []) if s]
        conv, question = self._conversation(messages)
        bot = self._engine
        try:
            replies = conv.stream(question, settings)
        except ConversationError as e:
            raise ValueError(f"message {len(messages)}: {e}") from e
        text, sent, stopped = "", 0, False
        try:
            for piece in replies:
                text += piece
                if _stop_at(text, stops) is not None:
                    stopped = True
                    break
                ready = _ready(text, stops)
                if ready > sent:
                    yield self._chunk(text[sent:ready], run_manager)
                    sent = ready
        finally:
            replies.cancel()
            for _ in replies:  # lets the engine finish the turn (and release its lock) however we got here
                pass
            bot.kv.drop(conv.id)  # a stateless call's cache is never reused
        reply = replies.reply
        final = _cut(text if stopped else reply.text, stops)
        rest = final[sent:] if final.startswith(text[:sent]) else ""
        usage = UsageMetadata(input_tokens=reply.prompt_tokens, output_tokens=reply.new_tokens,
                              total_tokens=reply.prompt_tokens + reply.new_tokens)
        meta = {"model_name": bot.model_id, "dropped_turns": reply.dropped_turns, "regions": reply.regions,
                "note": reply.note}
        yield self._chunk(rest, run_manager, response_metadata=meta, usage_metadata=usage, chunk_position="last")

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        """`_stream` run whole in one worker thread.

        The Assistant holds its lock from the first piece to the last, and a lock must be released by the thread
        that took it: LangChain's default would run every step in whichever executor thread is free.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ChatGenerationChunk | BaseException | None] = asyncio.Queue()
        abandoned = threading.Event()

        def work() -> None:
            try:
                with contextlib.closing(self._stream(messages, stop, None, **kwargs)) as chunks:
                    for chunk in chunks:
                        if abandoned.is_set():
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as e:  # handed to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, e)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if run_manager is not None and item.text:
                    await run_manager.on_llm_new_token(item.text, chunk=item)
                yield item
        finally:
            abandoned.set()
            await worker

    # --------------------------------------------------------------------------------------------- internals
    def _settings(self, overrides: dict[str, Any]) -> GenerationSettings:
        """The model's generation fields with per-call overrides (`max_tokens` is accepted for max_new_tokens)."""
        overrides = dict(overrides)
        if "max_tokens" in overrides:
            overrides["max_new_tokens"] = overrides.pop("max_tokens")
        if unknown := sorted(set(overrides) - set(SETTING_NAMES)):
            raise ValueError(f"unsupported argument(s) {', '.join(unknown)}; TAP-Chat takes {', '.join(SETTING_NAMES)}")
        return GenerationSettings(**{**{name: getattr(self, name) for name in SETTING_NAMES}, **overrides})

    @staticmethod
    def _chunk(text: str, run_manager: CallbackManagerForLLMRun | None, **fields: Any) -> ChatGenerationChunk:
        chunk = ChatGenerationChunk(message=AIMessageChunk(content=text, **fields))
        if run_manager is not None and text:
            run_manager.on_llm_new_token(text, chunk=chunk)
        return chunk

    def _conversation(self, messages: Sequence[BaseMessage]) -> tuple[Session, str]:
        """A fresh conversation holding every turn but the last, and the last human message's text."""
        offset = 1 if messages and isinstance(messages[0], SystemMessage) else 0
        chat = list(messages[offset:])
        if not chat:
            raise ValueError("no human message to answer")
        for i, message in enumerate(chat):
            expected = HumanMessage if i % 2 == 0 else AIMessage
            if not isinstance(message, expected):
                raise ValueError(f"message {i + offset + 1} ({type(message).__name__}) is out of place: TAP-Chat "
                                 "takes an optional leading SystemMessage, then human and AI messages alternating, "
                                 "starting with a human one")
        if len(chat) % 2 == 0:
            raise ValueError("the last message must be a human message (the question to answer)")
        conv = Session(self._engine, uuid.uuid4().hex, owner="langchain")
        for i in range(0, len(chat) - 1, 2):
            self._show(conv, chat[i], i + offset + 1)
            self._replay(conv, chat[i], chat[i + 1], i + offset + 1)
        self._show(conv, chat[-1], len(messages))
        return conv, chat[-1].text

    def _show(self, conv: Session, message: BaseMessage, number: int) -> None:
        """Make a human message's image current and add its regions, as a user would before asking."""
        try:
            images = []
            for block in message.content_blocks:
                kind = block["type"] if block["type"] != "non_standard" else block["value"].get("type")
                if kind == "image":
                    images.append(self._image(block))
                elif kind != "text":
                    raise ValueError(f"unsupported content block {kind!r}: TAP-Chat reads text and one image")
            if len(images) > 1:
                raise ValueError("only one image per message")
            if images:
                conv.set_image(images[0])
            specs = message.additional_kwargs.get("regions", [])
            if not isinstance(specs, list):
                raise ValueError("additional_kwargs['regions'] must be a list of region dicts")
            if specs and conv.image_key is None:
                raise ValueError("regions need an image: send one in this message or an earlier one")
            for n, spec in enumerate(specs, 1):
                try:
                    conv.add_region(Prompt.from_dict(spec))
                except ValueError as e:  # PromptError, ConversationError and ours
                    raise ValueError(f"region {n}: {e}") from e
        except ValueError as e:  # ImageError too
            raise ValueError(f"message {number}: {e}") from e

    def _replay(self, conv: Session, human: BaseMessage, ai: BaseMessage, number: int) -> None:
        """Record an earlier exchange as a finished turn, its prompt built as a live turn builds it."""
        # an answer marked incomplete (as TapChatMessageHistory marks stopped ones) stays out of the prompt
        complete = ai.additional_kwargs.get("complete", True) is not False
        try:
            conv.replay(human.text, ai.text, complete)
        except ConversationError as e:
            raise ValueError(f"message {number}: {e}") from e

    def _image(self, block: dict[str, Any]) -> bytes | Path:
        """The image a standard image block carries: decoded base64, or a file under `image_dir`."""
        if block.get("base64"):
            return _b64decode(block["base64"])
        url = block.get("url")
        if isinstance(url, str):
            header, _, data = url.partition(",")
            if url.startswith("data:") and header.endswith(";base64"):
                return _b64decode(data)
            raise ValueError("image URLs are not fetched; send the image as base64 or a base64 data: URL")
        if isinstance(block.get("path"), str):
            if self.image_dir is None:
                raise ValueError("local image paths are refused unless the model is created with image_dir=...")
            root = self.image_dir.resolve()
            path = (root / block["path"]).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"image path {block['path']!r} lies outside image_dir")
            return path
        raise ValueError("an image block needs base64 data, a base64 data: URL or a path")


class TapChatMessageHistory(BaseChatMessageHistory):
    """One stored conversation, seen by LangChain as a message list (e.g. for `RunnableWithMessageHistory`).

    Only text is kept here: images and regions belong to the Assistant's own turns (with their masks), so a message's
    image blocks and regions are not stored by `add_messages`. AI messages carry `additional_kwargs["complete"]`:
    False for answers that were stopped or cut off (TapChatModel leaves those out of the prompt), and
    `additional_kwargs["note"]`: the answer check's note ("" for none; never put back into a prompt).
    """

    def __init__(self, store: ChatStore, owner: str, conversation_id: str) -> None:
        store.get_conversation(owner, conversation_id)  # NotFoundError now, not at first use, if not the owner's
        self.store, self.owner, self.conversation_id = store, owner, conversation_id

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Read from the store on every access: text only, AI messages carrying `complete` and `note`."""
        record = self.store.get_conversation(self.owner, self.conversation_id)
        return [HumanMessage(content=m.text) if m.role == "user"
                else AIMessage(content=m.text, additional_kwargs={"complete": m.complete, "note": m.note or ""})
                for m in record.messages]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append human and AI messages; anything else is refused before any is written."""
        rows = []
        for message in messages:
            if isinstance(message, HumanMessage):
                rows.append(("user", message.text, True))
            elif isinstance(message, AIMessage):
                rows.append(("assistant", message.text, message.additional_kwargs.get("complete", True) is not False))
            else:
                raise ValueError(f"only human and AI messages can be stored, not {type(message).__name__}")
        for role, text, complete in rows:
            self.store.append_message(self.owner, self.conversation_id, role, text, complete=complete)

    def clear(self) -> None:
        """Delete every stored message; the conversation itself (title, regions) stays."""
        self.store.truncate(self.owner, self.conversation_id, 0)


def _b64decode(data: object) -> bytes:
    try:
        return base64.b64decode(data, validate=True)  # type: ignore[arg-type]
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("the image's base64 data is invalid") from None


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop sequence begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _cut(text: str, stops: list[str]) -> str:
    """The answer before the first stop sequence, trimmed like every Assistant answer."""
    end = _stop_at(text, stops)
    return (text if end is None else text[:end]).strip()


def _ready(text: str, stops: list[str]) -> int:
    """How much of a growing answer is final: not trailing whitespace, not a tail that may begin a stop sequence."""
    ready = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                ready = min(ready, len(text) - k)
                break
    return len(text[:ready].rstrip())
