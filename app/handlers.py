"""The page's event handlers: each resolves the owner, calls `ChatService`, and redraws from what it returns.

Handlers are thin, so the page is always a view of the server's state (which is why a reopened chat looks exactly
as it was left). An answer is drawn from the pieces its stream yields; earlier messages are read once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import gradio as gr
import numpy as np

from assistant.template import MENTION_RE
from tokenizer_tap.prompts import Prompt

from . import api
from .errors import UserError
from .owners import browser_owner, new_token
from .render import chat_messages, chip_samples, history_samples
from .service import ChatService

log = logging.getLogger("tapchat.app")
MODES = ["Point +", "Point −", "Box (2 clicks)"]


NEW_OUTPUTS = 9  # cid, image, chips, chat, focus, title, editor, corner, find status
IMAGE_OUTPUTS = 10  # cid, image, chips, chat, focus, editor, corner, history_ds, history_ids, find status
REGION_OUTPUTS = 4  # image, chips, focus, corner


class Handlers:
    """What each page event does: resolve the owner, call `ChatService`, redraw from what it returns."""

    def __init__(self, service: ChatService, auth: bool, examples: list[dict[str, Any]]) -> None:
        self.service, self.auth, self.examples = service, auth, examples

    # views
    def owner_of(self, token: str | None, request: gr.Request) -> tuple[str, str]:
        """(token, owner): with auth the logged-in user; else the token's owner, issuing a new token if it is bad."""
        if self.auth:
            return token or "", request.username
        owner = browser_owner(token or "")
        if owner is None:
            token = new_token()
            owner = browser_owner(token)
        return token, owner

    def view(self, owner: str, cid: str, focus: int | None = None) -> tuple:
        """(overlay, chips, chat) for a chat; empty when there is none."""
        if not cid:
            return None, gr.Dataset(samples=[]), []
        snap = self.service.snapshot(owner, cid, image=False)
        return (self.service.overlay(owner, cid, focus), gr.Dataset(samples=chip_samples(snap.regions)),
                chat_messages(snap.turns, snap.regions))

    def chat_view(self, owner: str, cid: str, streaming: bool = False) -> list[dict]:
        """The chatbot messages as stored; `streaming` shows the last unfinished answer as in progress, not stopped."""
        snap = self.service.snapshot(owner, cid, image=False)
        return chat_messages(snap.turns, snap.regions, streaming)

    def history_view(self, owner: str, query: str = "") -> tuple:
        """(history Dataset, conversation ids): the ids map a clicked row back to its chat."""
        items = self.service.history(owner, query or "")
        return gr.Dataset(samples=history_samples(items)), [i["id"] for i in items]

    @staticmethod
    def empty_chat() -> tuple:
        """The NEW_OUTPUTS values of a page with no chat open."""
        return "", None, gr.Dataset(samples=[]), [], None, "", gr.update(value=None), None, ""

    # owner and history
    def on_load(self, tok: str, request: gr.Request):
        """Resolve the owner, fill the history, then reveal the workspace (nothing is clickable before)."""
        tok, who = self.owner_of(tok, request)
        return (tok, who, *self.history_view(who), gr.Row(visible=True), gr.Markdown(visible=False))

    def on_search(self, who: str, query: str):
        """Redraw the history list for `query`."""
        return self.history_view(who, query)

    def on_new(self, who: str):
        """Clear the page; the chat itself is created by the first upload or question."""
        return self.empty_chat()

    def on_open(self, who: str, ids: list[str], index: int):
        """Show history row `index` as stored: overlay, chips, messages, title and the editor's image."""
        conv_id = ids[index]
        snap = self.service.snapshot(who, conv_id)
        overlay, chip_ds, messages = self.view(who, conv_id)
        return conv_id, overlay, chip_ds, messages, None, snap.title, _editor_value(snap.image), None, ""

    def on_rename(self, who: str, conv_id: str, new_title: str, query: str):
        """Retitle the open chat, then redraw the history list for the current search."""
        self.service.rename(who, conv_id, new_title)
        return self.history_view(who, query)

    def on_delete(self, who: str, conv_id: str, query: str):
        """Delete the open chat, hide the confirmation, redraw the history and clear the page."""
        self.service.delete(who, conv_id)
        return (gr.Row(visible=False), *self.history_view(who, query), *self.empty_chat())

    def on_export_json(self, who: str, conv_id: str):
        """The path of the chat's fine-tuning JSON, for the download box."""
        return str(self.service.export(who, conv_id, "json"))

    def on_export_markdown(self, who: str, conv_id: str):
        """The path of a zip of the chat as Markdown with the annotated image, for the download box."""
        return str(self.service.export(who, conv_id, "markdown"))

    # image and regions
    def on_upload(self, who: str, conv_id: str, payload: dict | None):
        """Make the upload the chat's image (a new chat when none is open); a refused file leaves the chat as it was."""
        if not payload:
            return tuple(gr.skip() for _ in range(IMAGE_OUTPUTS))
        try:
            snap = self.service.set_image(who, conv_id, api.uploaded_path(payload))
        except UserError as exc:  # refused: take the file off the canvas, keep the chat as it was
            gr.Warning(str(exc))
            return (gr.skip(), *self.view(who, conv_id)[:1], *(gr.skip() for _ in range(IMAGE_OUTPUTS - 2)))
        conv_id = snap.conversation_id
        overlay, chip_ds, messages = self.view(who, conv_id)
        return (conv_id, overlay, chip_ds, messages, None, _editor_value(snap.image), None, *self.history_view(who),
                "")

    def on_click(self, who: str, conv_id: str, how: str, first: list[float] | None, evt: gr.SelectData):
        """A click on the image: a positive or negative point, or a box corner (the first corner is only remembered)."""
        x, y = float(evt.index[0]), float(evt.index[1])
        if how == MODES[2]:
            if first is None:
                gr.Info("First corner set: click the opposite corner.")
                return gr.skip(), gr.skip(), gr.skip(), [x, y]
            region = self.service.add_region(who, conv_id, Prompt.from_box(first[0], first[1], x, y))
        else:
            region = self.service.click(who, conv_id, x, y, positive=how == MODES[0])
        overlay, chip_ds, _ = self.view(who, conv_id)
        return overlay, chip_ds, region.number, None

    def on_scribble(self, who: str, conv_id: str, value: dict | None):
        """Turn what was drawn in the Scribble tab into a region."""
        region = self.service.add_region(who, conv_id, Prompt.scribble(scribble_stroke(value)))
        overlay, chip_ds, _ = self.view(who, conv_id)
        return overlay, chip_ds, region.number, None

    def on_chip(self, who: str, conv_id: str, text: str, index: int):
        """A chip click highlights its region and appends its `<regionN>` to the message."""
        region = self.service.region_views(who, conv_id)[index]
        text = (text or "").rstrip()
        return self.service.overlay(who, conv_id, region.number), region.number, f"{text} {region.ref} ".lstrip()

    def on_focus(self, who: str, conv_id: str, number: str):
        """Highlight the region a `<regionN>` in the chat points at (the page's JS sets `number`)."""
        n = int(number) if str(number).isdigit() else None
        return self.service.overlay(who, conv_id, n), n

    def on_remove(self, who: str, conv_id: str, number: int | None):
        """Remove the focused region, or the latest one when none is focused."""
        regions = self.service.region_views(who, conv_id) if conv_id else []
        if not regions:
            raise UserError("There is no region to remove.")
        number = number if number in {r.number for r in regions} else regions[-1].number
        self.service.remove_region(who, conv_id, number)
        overlay, chip_ds, _ = self.view(who, conv_id)
        return overlay, chip_ds, None

    def on_remove_all(self, who: str, conv_id: str):
        """Remove every region of the image at once (the Find status goes with them)."""
        if not conv_id or not self.service.remove_regions(who, conv_id):
            raise UserError("There is no region to remove.")
        overlay, chip_ds, _ = self.view(who, conv_id)
        return overlay, chip_ds, None, ""

    def on_find(self, who: str, conv_id: str, query: str):
        """Every instance of what the Find box names becomes a region chip, standing out in the overlay; the status
        says how many of each concept ("3 × car", "0 × dog")."""
        found = self.service.find(who, conv_id, query)
        chip_ds = gr.Dataset(samples=chip_samples(self.service.region_views(who, conv_id)))
        overlay = self.service.overlay(who, conv_id, [r.number for r in found.regions])
        return overlay, chip_ds, None, f"Found: {found.summary}"

    def on_everything(self, who: str, conv_id: str):
        """Segment everything and show the candidates (with a toast when none is confident)."""
        found = self.service.segment_everything(who, conv_id)
        if not found:
            gr.Info("TAP found no confident regions; click points instead.")
        return self.service.everything_overlay(who, conv_id), gr.Accordion(open=True)

    def on_adopt(self, who: str, conv_id: str, evt: gr.SelectData):
        """A click on a candidate mask makes it a region of the chat."""
        region = self.service.adopt(who, conv_id, int(evt.index) + 1)
        overlay, chip_ds, _ = self.view(who, conv_id)
        return overlay, chip_ds, region.number

    def on_example(self, who: str, index: int):
        """A new chat from a gallery example: its image and regions, its question put in the message box (not sent)."""
        ex = self.examples[index]
        conv_id = self.service.new_chat(who)
        snap = self.service.set_image(who, conv_id, ex["image"])
        for p in ex.get("regions", []):
            self.service.add_region(who, conv_id, Prompt.from_dict(p))
        overlay, chip_ds, messages = self.view(who, conv_id)
        return (conv_id, overlay, chip_ds, messages, None, _editor_value(snap.image), None,
                *self.history_view(who), "", ex["question"])

    # chat
    def answer(self, who: str, conv_id: str, start: Callable[[], Any]):
        """Stream an answer into the chat; on Stop (or a closed page) the partial answer is kept."""
        try:
            stream = start()
        except UserError as exc:
            gr.Warning(str(exc))
            return
        yield (self.chat_view(who, conv_id, streaming=True), gr.Textbox(value="", submit_btn=False, stop_btn="Stop"),
               gr.skip())
        try:
            said, before = "", None
            for piece in stream:  # drawn from the pieces themselves: earlier messages are read once
                if before is None:
                    snap = self.service.snapshot(who, conv_id, image=False)
                    before, writing, regions = snap.turns[:-1], snap.turns[-1], snap.regions
                said += piece
                yield (chat_messages([*before, replace(writing, answer=said)], regions, streaming=True), gr.skip(),
                       gr.skip())
        except UserError as exc:
            gr.Warning(str(exc))
        except Exception as exc:
            log.exception("answer failed")
            gr.Warning(f"The model failed mid-answer ({type(exc).__name__}); what it said so far is kept.")
        finally:
            stream.cancel()
        messages, overlay = self.answered(who, conv_id)
        yield messages, gr.Textbox(submit_btn="Send", stop_btn=False), overlay

    def answered(self, who: str, conv_id: str) -> tuple:
        """(chat, overlay) once an answer ends: the regions it cites stand out in the overlay, so what the answer
        says is seen on the image (all plain again when it cites none; untouched when the image has no regions)."""
        snap = self.service.snapshot(who, conv_id, image=False)
        said = (snap.turns[-1].answer or "") if snap.turns else ""
        cited = {int(n) for n in MENTION_RE.findall(said)} & {r.number for r in snap.regions}
        overlay = self.service.overlay(who, conv_id, cited) if snap.regions else gr.skip()
        return chat_messages(snap.turns, snap.regions), overlay

    def on_send(self, who: str, conv_id: str, text: str, temp: float, n: int):
        """Stream the answer to the message (refused when empty); with no chat open it starts a text-only one."""
        if not (text or "").strip():
            gr.Warning("Type a question first.")
            return
        conv_id = conv_id or self.service.new_chat(who)  # a question with no image starts a text-only chat
        for out in self.answer(who, conv_id, lambda: self.service.stream(who, conv_id, text, temp, int(n))):
            yield conv_id, *out

    def on_regenerate(self, who: str, conv_id: str, temp: float, n: int):
        """Stream a new answer to the last question, whose old answer is undone first."""
        yield from self.answer(who, conv_id, lambda: self.service.regenerate(who, conv_id, temp, int(n)))

    def on_stop(self, who: str, conv_id: str) -> None:
        """Stop the running answer; its streaming handler then ends normally and keeps what was said."""
        self.service.stop(who, conv_id)

    def on_undo(self, who: str, conv_id: str):
        """Forget the last exchange and put its question back in the message box to edit."""
        question = self.service.undo(who, conv_id)
        return self.chat_view(who, conv_id), question

    def on_clear(self, who: str, conv_id: str):
        """Forget every question and answer; the image and regions stay."""
        self.service.clear(who, conv_id)
        return self.chat_view(who, conv_id)


# ------------------------------------------------------------------------------------------------ wiring


def _editor_value(image: np.ndarray | None) -> dict | None:
    return None if image is None else {"background": image, "layers": [], "composite": None}


def scribble_stroke(value: dict | None) -> list[tuple[float, float]]:
    """The drawn pixels of an ImageEditor value, ordered along the stroke's main direction.

    The editor gives layers (what was drawn) but not the drawing order; ordering by the principal axis recovers
    it for the usual single stroke, so the evenly spaced samples spread along what was drawn.
    """
    layers = (value or {}).get("layers") or []
    drawn = None
    for layer in layers:
        if layer is None:
            continue
        arr = np.asarray(layer)
        hit = arr[..., 3] > 0 if arr.ndim == 3 and arr.shape[2] == 4 else arr.any(axis=-1)
        drawn = hit if drawn is None else drawn | hit
    if drawn is None or not drawn.any():
        raise UserError("Draw over an object in the Scribble tab first.")
    ys, xs = np.nonzero(drawn)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    centred = pts - pts.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0] if len(pts) > 1 else np.array([1.0, 0.0])
    order = np.argsort(centred @ axis, kind="stable")
    return [(float(x), float(y)) for x, y in pts[order]]
