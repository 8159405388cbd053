"""The browser page: an image panel with region tools, the chat, and a history sidebar.

Handlers are thin: they resolve the owner, call `ChatService`, and redraw from what the service returns, so the
page is always a view of the server's state (which is why a reopened chat looks exactly as it was left).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from tokenizer_tap.prompts import Prompt

from . import api
from .owners import browser_owner, new_token, pinned_secret
from .render import chat_messages, chip_samples, history_samples
from .service import ChatService, UserError

log = logging.getLogger("tapchat.app")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODES = ["Point +", "Point −", "Box (2 clicks)"]

CSS = """
.tap-hidden { display: none !important; }
#banner { background: #fff4d6; border-radius: 6px; padding: 4px 12px; }
#chips .gallery-item, #history .gallery-item { text-align: left; }
"""

# Pointing at or clicking a <regionN> reference in the chat highlights that region in the overlay.
JS = """
() => {
  const focus = (always) => (e) => {
    const ref = e.target.closest && e.target.closest('.tap-ref');
    const box = document.querySelector('#focus_in textarea');
    const n = ref && (ref.className.match(/tap-ref-(\\d+)/) || [])[1];  // the sanitizer drops data-* attributes
    if (!n || !box || (!always && box.value === n)) return;
    if (box.value === n) {  // a click re-highlights even if the overlay was redrawn since
      box.value = '';
      box.dispatchEvent(new Event('input', {bubbles: true}));
    }
    box.value = n;
    box.dispatchEvent(new Event('input', {bubbles: true}));
  };
  document.addEventListener('click', focus(true));
  document.addEventListener('mouseover', focus(false));
}
"""


def _warned(n_outputs: int) -> Callable:
    """Show a `UserError` (or an unexpected failure) as a toast and leave every output unchanged."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UserError as exc:
                gr.Warning(str(exc))
            except Exception as exc:  # the page must stay usable whatever happened
                log.exception("handler %s failed", fn.__name__)
                gr.Warning(f"Something went wrong ({type(exc).__name__}); the chat is unchanged.")
            skips = tuple(gr.skip() for _ in range(n_outputs))
            return skips[0] if n_outputs == 1 else skips
        return inner
    return wrap


def load_examples() -> list[dict[str, Any]]:
    """The example gallery: images shipped in examples/ with pre-set regions and a question."""
    path = EXAMPLES / "examples.json"
    items = json.loads(path.read_text()) if path.exists() else []
    return [{**e, "image": str(EXAMPLES / e["image"])} for e in items]


def build(service: ChatService, *, auth: bool, banner: str = "") -> gr.Blocks:
    """The whole page; `auth` says whether the logged-in user (else an anonymous browser token) owns chats."""
    secret = pinned_secret(service.config.data_dir)
    examples = load_examples()

    def owner_of(token: str | None, request: gr.Request) -> tuple[str, str]:
        if auth:
            return token or "", request.username
        owner = browser_owner(token or "")
        if owner is None:
            token = new_token()
            owner = browser_owner(token)
        return token, owner

    def view(owner: str, cid: str, focus: int | None = None) -> tuple:
        """(overlay, chips, chat) for a chat; empty when there is none."""
        if not cid:
            return None, gr.Dataset(samples=[]), []
        snap = service.snapshot(owner, cid, image=False)
        return (service.overlay(owner, cid, focus), gr.Dataset(samples=chip_samples(snap.regions)),
                chat_messages(snap.messages, snap.regions))

    def chat_view(owner: str, cid: str, streaming: bool = False) -> list[dict]:
        snap = service.snapshot(owner, cid, image=False)
        return chat_messages(snap.messages, snap.regions, streaming)

    def history_view(owner: str, query: str = "") -> tuple:
        items = service.history(owner, query or "")
        return gr.Dataset(samples=history_samples(items)), [i["id"] for i in items]

    with gr.Blocks(title="TAP-Chat") as demo:
        token = gr.BrowserState("", storage_key="tapchat-owner", secret=secret)
        owner = gr.State("")
        cid = gr.State("")
        focus = gr.State(None)
        corner = gr.State(None)  # first corner of a two-click box
        history_ids = gr.State([])

        gr.Markdown("## TAP-Chat — chat about your image, region by region")
        gr.Markdown(banner, elem_id="banner", visible=bool(banner))
        # Nothing can be clicked before the page knows whose chats it shows (on_load), or an early upload would
        # belong to nobody; on a busy server that first round trip can take seconds.
        connecting = gr.Markdown("Connecting…", elem_id="connecting")
        with gr.Row(visible=False, elem_id="workspace") as workspace:
            with gr.Column(scale=1, min_width=220):
                new_btn = gr.Button("New chat", elem_id="new_chat", variant="primary")
                search = gr.Textbox(placeholder="Search chats", show_label=False, elem_id="search")
                history_ds = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[], type="index",
                                        label="History", elem_id="history", samples_per_page=12)
                with gr.Accordion("This chat", open=False, elem_id="chat_actions"):
                    title = gr.Textbox(label="Title", elem_id="title")
                    rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
                    delete_btn = gr.Button("Delete chat", size="sm", variant="stop", elem_id="delete")
                    with gr.Row(visible=False) as confirm_row:
                        confirm_btn = gr.Button("Yes, delete", size="sm", variant="stop", elem_id="confirm_delete")
                        cancel_btn = gr.Button("Keep", size="sm", elem_id="cancel_delete")
                    with gr.Row():
                        json_btn = gr.Button("Export JSON", size="sm", elem_id="export_json")
                        md_btn = gr.Button("Export Markdown", size="sm", elem_id="export_md")
                    export_file = gr.File(label="Download", interactive=False, elem_id="export_file")
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Click", id="click"):
                        image = gr.Image(type="filepath", sources=["upload", "clipboard"], format="jpeg",
                                         label="Image — click to add a region", elem_id="image", height=480)
                        mode = gr.Radio(MODES, value=MODES[0], show_label=False, elem_id="mode")
                    with gr.Tab("Scribble", id="scribble"):
                        editor = gr.ImageEditor(type="numpy", transforms=(), layers=False, elem_id="editor",
                                                brush=gr.Brush(default_size=12, colors=["#ff3b30"],
                                                               color_mode="fixed"), label="Draw over an object")
                        scribble_btn = gr.Button("Use scribble as a region", elem_id="use_scribble")
                chips = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[], type="index",
                                   label="Regions — click one to mention it", elem_id="chips")
                with gr.Row():
                    remove_btn = gr.Button("Remove selected region", size="sm", elem_id="remove_region")
                    everything_btn = gr.Button("Segment everything", size="sm", elem_id="everything")
                with gr.Accordion("Segment everything — click a mask to adopt it", open=False) as everything_box:
                    candidates = gr.AnnotatedImage(elem_id="candidates", height=360)
                if examples:
                    example_ds = gr.Dataset(components=[gr.Image(visible=False), gr.Textbox(visible=False)],
                                            samples=[[e["image"], e["question"]] for e in examples], type="index",
                                            label="Examples", elem_id="examples")
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Chat", elem_id="chat", height=520, buttons=["copy"],
                                  sanitize_html=True)
                msg = gr.Textbox(placeholder="Ask about <region1>…", show_label=False, elem_id="msg",
                                 submit_btn="Send", stop_btn=False, max_lines=6)
                with gr.Row():
                    regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                    undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                with gr.Accordion("Settings", open=False):
                    temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
                    gr.Radio(["grounded", "tapchat"], value=service.bot.mode, interactive=False,
                             label="Mode (as loaded)")
        focus_in = gr.Textbox(elem_id="focus_in", elem_classes="tap-hidden")

        # ------------------------------------------------------------------------------ owner and history
        def on_load(tok: str, request: gr.Request):
            tok, who = owner_of(tok, request)
            return (tok, who, *history_view(who), gr.Row(visible=True), gr.Markdown(visible=False))

        demo.load(on_load, [token], [token, owner, history_ds, history_ids, workspace, connecting],
                  api_visibility="private")

        @_warned(2)
        def on_search(who: str, query: str):
            return history_view(who, query)

        # Every event that reads or rewrites the chat list shares one queue lane, so a search typed right after a
        # rename or delete runs after it and never paints the old titles back.
        history_lane = {"concurrency_id": "history", "api_visibility": "private"}
        search.change(on_search, [owner, search], [history_ds, history_ids], trigger_mode="always_last",
                      **history_lane)

        def empty_chat():
            return "", None, gr.Dataset(samples=[]), [], None, "", gr.update(value=None), None

        new_outputs = [cid, image, chips, chat, focus, title, editor, corner]

        @_warned(len(new_outputs))
        def on_new(who: str):
            return empty_chat()

        new_btn.click(on_new, [owner], new_outputs, api_visibility="private", queue=False)

        open_outputs = [cid, image, chips, chat, focus, title, editor, corner]

        @_warned(len(open_outputs))
        def on_open(who: str, ids: list[str], index: int):
            conv_id = ids[index]
            snap = service.snapshot(who, conv_id)
            overlay, chip_ds, messages = view(who, conv_id)
            bg = _editor_value(snap.image)
            return conv_id, overlay, chip_ds, messages, None, snap.title, bg, None

        history_ds.click(on_open, [owner, history_ids, history_ds], open_outputs, api_visibility="private")

        @_warned(2)
        def on_rename(who: str, conv_id: str, new_title: str, query: str):
            service.rename(who, conv_id, new_title)
            return history_view(who, query)

        rename_btn.click(on_rename, [owner, cid, title, search], [history_ds, history_ids], **history_lane)
        delete_btn.click(lambda: gr.Row(visible=True), None, confirm_row, queue=False, api_visibility="private")
        cancel_btn.click(lambda: gr.Row(visible=False), None, confirm_row, queue=False, api_visibility="private")

        delete_outputs = [confirm_row, history_ds, history_ids, *new_outputs]

        @_warned(len(delete_outputs))
        def on_delete(who: str, conv_id: str, query: str):
            service.delete(who, conv_id)
            return (gr.Row(visible=False), *history_view(who, query), *empty_chat())

        confirm_btn.click(on_delete, [owner, cid, search], delete_outputs, **history_lane)

        @_warned(1)
        def on_export(who: str, conv_id: str, fmt: str):
            return str(service.export(who, conv_id, fmt))

        json_btn.click(functools.partial(on_export, fmt="json"), [owner, cid], export_file, api_visibility="private")
        md_btn.click(functools.partial(on_export, fmt="markdown"), [owner, cid], export_file,
                     api_visibility="private")

        # ---------------------------------------------------------------------------------------- image
        image_outputs = [cid, image, chips, chat, focus, editor, corner, history_ds, history_ids]

        @_warned(len(image_outputs))
        def on_upload(who: str, conv_id: str, payload: dict | None):
            if not payload:
                return tuple(gr.skip() for _ in image_outputs)
            try:
                snap = service.set_image(who, conv_id, api.uploaded_path(payload))
            except UserError as exc:  # refused: take the file off the canvas, keep the chat as it was
                gr.Warning(str(exc))
                return (gr.skip(), *view(who, conv_id)[:1], *(gr.skip() for _ in image_outputs[2:]))
            conv_id = snap.conversation_id
            overlay, chip_ds, messages = view(who, conv_id)
            return (conv_id, overlay, chip_ds, messages, None, _editor_value(snap.image), None, *history_view(who))

        # preprocess=False: the raw upload reaches the service, whose checks give readable messages for corrupt,
        # non-image and oversized files (Gradio's own decoding would fail first with a bare "Error").
        image.upload(on_upload, [owner, cid, image], image_outputs, api_visibility="private",
                     concurrency_id="model", preprocess=False)

        region_outputs = [image, chips, focus, corner]

        @_warned(len(region_outputs))
        def on_click(who: str, conv_id: str, how: str, first: list[float] | None, evt: gr.SelectData):
            x, y = float(evt.index[0]), float(evt.index[1])
            if how == MODES[2]:
                if first is None:
                    gr.Info("First corner set: click the opposite corner.")
                    return gr.skip(), gr.skip(), gr.skip(), [x, y]
                region = service.add_region(who, conv_id, Prompt.from_box(first[0], first[1], x, y))
            else:
                region = service.click(who, conv_id, x, y, positive=how == MODES[0])
            overlay, chip_ds, _ = view(who, conv_id)
            return overlay, chip_ds, region.number, None

        image.select(on_click, [owner, cid, mode, corner], region_outputs, api_visibility="private",
                     concurrency_id="model")

        @_warned(len(region_outputs))
        def on_scribble(who: str, conv_id: str, value: dict | None):
            region = service.add_region(who, conv_id, Prompt.scribble(scribble_stroke(value)))
            overlay, chip_ds, _ = view(who, conv_id)
            return overlay, chip_ds, region.number, None

        scribble_btn.click(on_scribble, [owner, cid, editor], region_outputs, api_visibility="private",
                           concurrency_id="model")

        @_warned(3)
        def on_chip(who: str, conv_id: str, text: str, index: int):
            region = service.region_views(who, conv_id)[index]
            text = (text or "").rstrip()
            return service.overlay(who, conv_id, region.number), region.number, f"{text} {region.ref} ".lstrip()

        chips.click(on_chip, [owner, cid, msg, chips], [image, focus, msg], api_visibility="private")

        @_warned(2)
        def on_focus(who: str, conv_id: str, number: str):
            n = int(number) if str(number).isdigit() else None
            return service.overlay(who, conv_id, n), n

        focus_in.change(on_focus, [owner, cid, focus_in], [image, focus], api_visibility="private",
                       trigger_mode="always_last")

        @_warned(3)
        def on_remove(who: str, conv_id: str, number: int | None):
            regions = service.region_views(who, conv_id) if conv_id else []
            if not regions:
                raise UserError("There is no region to remove.")
            number = number if number in {r.number for r in regions} else regions[-1].number
            service.remove_region(who, conv_id, number)
            overlay, chip_ds, _ = view(who, conv_id)
            return overlay, chip_ds, None

        remove_btn.click(on_remove, [owner, cid, focus], [image, chips, focus], api_visibility="private")

        @_warned(2)
        def on_everything(who: str, conv_id: str):
            found = service.segment_everything(who, conv_id)
            if not found:
                gr.Info("TAP found no confident regions; click points instead.")
            return service.everything_overlay(who, conv_id), gr.Accordion(open=True)

        everything_btn.click(on_everything, [owner, cid], [candidates, everything_box], api_visibility="private",
                             concurrency_id="model")

        @_warned(3)
        def on_adopt(who: str, conv_id: str, evt: gr.SelectData):
            region = service.adopt(who, conv_id, int(evt.index) + 1)
            overlay, chip_ds, _ = view(who, conv_id)
            return overlay, chip_ds, region.number

        candidates.select(on_adopt, [owner, cid], [image, chips, focus], api_visibility="private",
                          concurrency_id="model")

        if examples:
            @_warned(len(image_outputs) + 1)
            def on_example(who: str, index: int):
                ex = examples[index]
                conv_id = service.new_chat(who)
                snap = service.set_image(who, conv_id, ex["image"])
                for p in ex.get("regions", []):
                    service.add_region(who, conv_id, _example_prompt(p))
                overlay, chip_ds, messages = view(who, conv_id)
                return (conv_id, overlay, chip_ds, messages, None, _editor_value(snap.image), None,
                        *history_view(who), ex["question"])

            example_ds.click(on_example, [owner, example_ds], [*image_outputs, msg], api_visibility="private",
                             concurrency_id="model")

        # ----------------------------------------------------------------------------------------- chat
        def answer(who: str, conv_id: str, start: Callable[[], Any]):
            """Stream an answer into the chat; on Stop (or a closed page) the partial answer is kept."""
            try:
                stream = start()
            except UserError as exc:
                gr.Warning(str(exc))
                return
            yield chat_view(who, conv_id, streaming=True), gr.Textbox(value="", submit_btn=False, stop_btn="Stop")
            try:
                for _ in stream:
                    yield chat_view(who, conv_id, streaming=True), gr.skip()
            except UserError as exc:
                gr.Warning(str(exc))
            except Exception as exc:
                log.exception("answer failed")
                gr.Warning(f"The model failed mid-answer ({type(exc).__name__}); what it said so far is kept.")
            finally:
                stream.cancel()
            yield chat_view(who, conv_id), gr.Textbox(submit_btn="Send", stop_btn=False)

        def on_send(who: str, conv_id: str, text: str, temp: float, n: int):
            if not (text or "").strip():
                gr.Warning("Type a question first.")
                return
            conv_id = conv_id or service.new_chat(who)  # a question with no image starts a text-only chat
            for messages, box in answer(who, conv_id, lambda: service.stream(who, conv_id, text, temp, int(n))):
                yield conv_id, messages, box

        def on_regenerate(who: str, conv_id: str, temp: float, n: int):
            yield from answer(who, conv_id, lambda: service.regenerate(who, conv_id, temp, int(n)))

        send = msg.submit(on_send, [owner, cid, msg, temperature, max_tokens], [cid, chat, msg],
                          api_visibility="private", concurrency_id="model")
        regen = regen_btn.click(on_regenerate, [owner, cid, temperature, max_tokens], [chat, msg],
                                api_visibility="private", concurrency_id="model")
        for event in (send, regen):
            event.then(history_view, [owner], [history_ds, history_ids], api_visibility="private", queue=False)
        # Stop sets the answer's cancel event: the engine checks it before every token, so generation ends within
        # one step and the streaming handler finishes normally (saving the partial answer, restoring Send).
        msg.stop(lambda who, conv_id: service.stop(who, conv_id) and None, [owner, cid], None, queue=False,
                 api_visibility="private")

        @_warned(2)
        def on_undo(who: str, conv_id: str):
            question = service.undo(who, conv_id)
            return chat_view(who, conv_id), question

        undo_btn.click(on_undo, [owner, cid], [chat, msg], api_visibility="private")

        @_warned(1)
        def on_clear(who: str, conv_id: str):
            service.clear(who, conv_id)
            return chat_view(who, conv_id)

        clear_btn.click(on_clear, [owner, cid], [chat], api_visibility="private")
        chat.clear(on_clear, [owner, cid], [chat], api_visibility="private")

        api.register(service, auth=auth)
    return demo


def _editor_value(image: np.ndarray | None) -> dict | None:
    return None if image is None else {"background": image, "layers": [], "composite": None}


def _example_prompt(spec: dict[str, Any]) -> Prompt:
    if "box" in spec:
        return Prompt.from_box(*spec["box"])
    return Prompt.point(*spec["point"])


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
