"""The app's one error path: which failures a person caused, the message they see, and how each surface shows it.

`user_message` is the single mapping from an exception to the text shown; the three decorators only decide the
presentation: the service raises `UserError`, the HTTP API raises `gr.Error` (its message reaches `gradio_client`),
and the page shows a toast and leaves every output as it was.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gradio as gr

from assistant.reply import GenerationError
from assistant.store import NotFoundError, StoreError
from assistant.template import ConversationError
from tokenizer_tap.errors import TapError

log = logging.getLogger("tapchat.app")
T = TypeVar("T")
NOT_FOUND = "That conversation or region does not exist (or belongs to someone else)."


class UserError(Exception):
    """Something the person using the app can fix; the message says what."""


def user_message(exc: BaseException) -> str | None:
    """The text a person sees for `exc`, or None when it is not theirs to fix (a bug: log it, say little)."""
    if isinstance(exc, NotFoundError):  # never confirm that someone else's chat exists
        return NOT_FOUND
    if isinstance(exc, (UserError, ConversationError, TapError, StoreError, GenerationError)):
        return str(exc)
    return None


def friendly(fn: Callable[..., T]) -> Callable[..., T]:
    """Service methods: the engine's, tokenizer's and store's refusals leave as `UserError`s."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            if (message := user_message(exc)) is None:
                raise
            raise UserError(message) from None
    return wrapper


def api_errors(fn: Callable) -> Callable:
    """API endpoints: a user's mistake becomes a `gr.Error` with the plain message (streaming endpoints too)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                if (message := user_message(exc)) is None:
                    raise
                raise gr.Error(message) from None
        return streaming

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if (message := user_message(exc)) is None:
                raise
            raise gr.Error(message) from None
    return inner


def toasts(n_outputs: int) -> Callable:
    """Page handlers: any failure is a toast and every output stays unchanged, so the page stays usable."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                message = user_message(exc)
                if message is None:
                    log.exception("handler %s failed", getattr(fn, "__name__", fn))
                    message = f"Something went wrong ({type(exc).__name__}); the chat is unchanged."
                gr.Warning(message)
            skips = tuple(gr.skip() for _ in range(n_outputs))
            return skips[0] if n_outputs == 1 else skips
        return inner
    return wrap
