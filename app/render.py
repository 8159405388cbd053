"""Turning service data into what Gradio components display (pure functions, tested without a browser)."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from .service import MessageView, RegionView

_REF = re.compile(r"&lt;region(\d+)&gt;")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")


def clean(text: str) -> str:
    """Drop control characters and replacement marks (a random or confused model emits them)."""
    return _CONTROL.sub("", text)


def message_html(text: str, colours: dict[int, str]) -> str:
    """Escape a message and turn each `<regionN>` into a coloured, clickable reference (the overlay's colour)."""
    def ref(m: re.Match[str]) -> str:
        n = int(m.group(1))
        col = colours.get(n, "#888888")
        return (f'<span class="tap-ref tap-ref-{n}" title="highlight region {n}" '
                f'style="border-bottom: 3px solid {col}; font-weight: 600; cursor: pointer">&lt;region{n}&gt;</span>')
    return _REF.sub(ref, html.escape(clean(text), quote=False))


def chat_messages(messages: Sequence[MessageView], regions: Sequence[RegionView],
                  streaming: bool = False) -> list[dict[str, Any]]:
    """Chatbot messages; an unfinished answer is marked stopped unless it is the one being written now."""
    colours = {r.number: r.colour for r in regions}
    out = []
    for i, m in enumerate(messages):
        text = message_html(m.text, colours)
        if m.role == "assistant" and not m.complete:
            live = streaming and i == len(messages) - 1
            text = (text + " ▌") if live else (text + " *(stopped)*")
        out.append({"role": m.role, "content": text})
    return out


def chip_samples(regions: Sequence[RegionView]) -> list[list[str]]:
    return [[clean(r.chip())] for r in regions]


def history_samples(items: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[f"{clean(i['title'])} · {i['updated'][:16].replace('T', ' ')}"] for i in items]
