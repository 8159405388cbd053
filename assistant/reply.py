"""What an answer gives back: the text, whether it ended, and what it cost; and the stream that writes it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


class GenerationError(RuntimeError):
    """The model failed mid-answer; the partial answer was kept (marked incomplete)."""


@dataclass
class Reply:
    """One answer and what it cost."""

    text: str = ""
    complete: bool = False
    cancelled: bool = False
    dropped_turns: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    regions: list[int] = field(default_factory=list)
    note: str = ""  # where a complete answer disagrees with TAP about a cited region ("TAP sees ... here")


class ReplyStream:
    """Iterate for text pieces as they are generated; `reply` holds the result; `cancel()` works from any thread."""

    def __init__(self, pieces: Iterator[str], reply: Reply, cancel: threading.Event) -> None:
        self._pieces, self.reply, self._cancel = pieces, reply, cancel

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def cancel(self) -> None:
        """Stop the answer (any thread; within a decode step); read on to the end to record the partial answer."""
        self._cancel.set()

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        for _ in self._pieces:
            pass
        return self.reply.text
