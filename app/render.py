"""Turning service data into what Gradio components display (pure functions, tested without a browser)."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from assistant.template import Turn
from tokenizer_tap.region import Region
from tokenizer_tap.visualize import colour

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


def region_colour(number: int) -> str:
    """The overlay's colour of region `number`, as the page writes it."""
    return "#{:02x}{:02x}{:02x}".format(*colour(number - 1))


def region_json(region: Region) -> dict[str, Any]:
    """A region as the page and the API show it: a numbered chip in the overlay's colour."""
    n = region.number
    return {"number": n, "concept": region.concept, "prob": round(float(region.concept_prob), 3),
            "caption": region.caption, "box": None if region.box is None else [int(v) for v in region.box],
            "area_percent": round(100.0 * region.area, 2), "colour": region_colour(n), "ref": f"<region{n}>"}


def chip(region: Region) -> str:
    """A region's chip text: `<regionN> concept 0.91 — caption`."""
    text = f"<region{region.number}> {region.concept} {round(float(region.concept_prob), 3):.2f}"
    return f"{text} — {region.caption}" if region.caption else text


def chat_messages(turns: Sequence[Turn], regions: Sequence[Region], streaming: bool = False) -> list[dict[str, Any]]:
    """Chatbot messages; an unfinished answer is marked stopped unless it is the one being written now."""
    colours = {r.number: region_colour(r.number) for r in regions}
    out = []
    for i, turn in enumerate(turns):
        out.append({"role": "user", "content": message_html(turn.text, colours)})
        text = message_html(turn.answer or "", colours)
        if not turn.complete:
            live = streaming and i == len(turns) - 1
            text = (text + " ▌") if live else (text + " *(stopped)*")
        elif turn.note:
            text += note_html(turn.note, colours)
        out.append({"role": "assistant", "content": text})
    return out


def note_html(note: str, colours: dict[int, str]) -> str:
    """The answer check's note under an answer: small muted text, so it reads as a remark, not as the answer."""
    return f'<br><span class="tap-note" style="font-size: 0.85em; opacity: 0.7">⚠ {message_html(note, colours)}</span>'


def chip_samples(regions: Sequence[Region]) -> list[list[str]]:
    """Rows for the regions `gr.Dataset`, in the given order (a clicked index maps back to its region)."""
    return [[clean(chip(r))] for r in regions]


def history_samples(items: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Rows for the history `gr.Dataset`: title and last update to the minute, in the order of `items`."""
    return [[f"{clean(i['title'])} · {i['updated'][:16].replace('T', ' ')}"] for i in items]
