"""The browser page: an image panel with region tools, the chat, and a history sidebar; the event table that
connects them to the handlers (handlers.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from . import api
from .errors import toasts
from .handlers import MODES, Handlers
from .owners import pinned_secret
from .service import ChatService

log = logging.getLogger("tapchat.app")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

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


def load_examples(*folders: Path) -> list[dict[str, Any]]:
    """The example gallery: images with pre-set regions and a question, from each folder's examples.json (the
    demo models' held-out scenes first when they run, then examples/)."""
    items = []
    for folder in (*folders, EXAMPLES):
        path = folder / "examples.json"
        if path.exists():
            items += [{**e, "image": str(folder / e["image"])} for e in json.loads(path.read_text())]
    return items


def build(service: ChatService, *, auth: bool, banner: str = "", gallery: Path | None = None) -> gr.Blocks:
    """The whole page; `auth` says whether the logged-in user (else an anonymous browser token) owns chats;
    `gallery`, a folder of more examples (the demo models' held-out scenes)."""
    handlers = Handlers(service, auth, load_examples(*([gallery] if gallery is not None else [])))
    with gr.Blocks(title="TAP-Chat") as demo:
        page = layout(service, banner, handlers.examples)
        wire(demo, page, handlers)
        api.register(service, auth=auth)
    return demo


# ------------------------------------------------------------------------------------------------ layout
def layout(service: ChatService, banner: str, examples: list[dict[str, Any]]) -> SimpleNamespace:
    """Every component, by name (`page.chat`, `page.image` ...): the handlers read and write these."""
    p = SimpleNamespace()
    p.token = gr.BrowserState("", storage_key="tapchat-owner", secret=pinned_secret(service.config.data_dir))
    p.owner, p.cid, p.focus = gr.State(""), gr.State(""), gr.State(None)
    p.corner = gr.State(None)  # first corner of a two-click box
    p.history_ids = gr.State([])
    gr.Markdown("## TAP-Chat — chat about your image, region by region")
    gr.Markdown(banner, elem_id="banner", visible=bool(banner))
    # Nothing can be clicked before the page knows whose chats it shows (on_load), or an early upload would
    # belong to nobody; on a busy server that first round trip can take seconds.
    p.connecting = gr.Markdown("Connecting…", elem_id="connecting")
    with gr.Row(visible=False, elem_id="workspace") as p.workspace:
        with gr.Column(scale=1, min_width=220):
            _sidebar(p)
        with gr.Column(scale=3):
            _image_panel(p, examples)
        with gr.Column(scale=3):
            _chat_panel(p, service.bot.mode)
    p.focus_in = gr.Textbox(elem_id="focus_in", elem_classes="tap-hidden")
    return p


def _sidebar(p: SimpleNamespace) -> None:
    p.new_btn = gr.Button("New chat", elem_id="new_chat", variant="primary")
    p.search = gr.Textbox(placeholder="Search chats", show_label=False, elem_id="search")
    p.history_ds = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[], type="index", label="History",
                              elem_id="history", samples_per_page=12)
    with gr.Accordion("This chat", open=False, elem_id="chat_actions"):
        p.title = gr.Textbox(label="Title", elem_id="title")
        p.rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
        p.delete_btn = gr.Button("Delete chat", size="sm", variant="stop", elem_id="delete")
        with gr.Row(visible=False) as p.confirm_row:
            p.confirm_btn = gr.Button("Yes, delete", size="sm", variant="stop", elem_id="confirm_delete")
            p.cancel_btn = gr.Button("Keep", size="sm", elem_id="cancel_delete")
        with gr.Row():
            p.json_btn = gr.Button("Export JSON", size="sm", elem_id="export_json")
            p.md_btn = gr.Button("Export Markdown", size="sm", elem_id="export_md")
        p.export_file = gr.File(label="Download", interactive=False, elem_id="export_file")


def _image_panel(p: SimpleNamespace, examples: list[dict[str, Any]]) -> None:
    with gr.Tabs():
        with gr.Tab("Click", id="click"):
            p.image = gr.Image(type="filepath", sources=["upload", "clipboard"], format="jpeg",
                               label="Image — click to add a region", elem_id="image", height=480)
            p.mode = gr.Radio(MODES, value=MODES[0], show_label=False, elem_id="mode")
        with gr.Tab("Scribble", id="scribble"):
            p.editor = gr.ImageEditor(type="numpy", transforms=(), layers=False, elem_id="editor",
                                      brush=gr.Brush(default_size=12, colors=["#ff3b30"], color_mode="fixed"),
                                      label="Draw over an object")
            p.scribble_btn = gr.Button("Use scribble as a region", elem_id="use_scribble")
    p.chips = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[], type="index",
                         label="Regions — click one to mention it", elem_id="chips")
    with gr.Row(equal_height=True):
        p.find_box = gr.Textbox(placeholder="Find every… e.g. car, or cars and people", show_label=False,
                                elem_id="find", scale=3)
        p.find_btn = gr.Button("Find", size="sm", elem_id="find_btn", scale=0, min_width=60)
        p.find_status = gr.Markdown("", elem_id="find_status")
    with gr.Row():
        p.remove_btn = gr.Button("Remove selected region", size="sm", elem_id="remove_region")
        p.remove_all_btn = gr.Button("Remove all", size="sm", elem_id="remove_all")
        p.everything_btn = gr.Button("Segment everything", size="sm", elem_id="everything")
    with gr.Accordion("Segment everything — click a mask to adopt it", open=False) as p.everything_box:
        p.candidates = gr.AnnotatedImage(elem_id="candidates", height=360)
    p.example_ds = None
    if examples:
        p.example_ds = gr.Dataset(components=[gr.Image(visible=False), gr.Textbox(visible=False)],
                                  samples=[[e["image"], e["question"]] for e in examples], type="index",
                                  label="Examples", elem_id="examples")


def _chat_panel(p: SimpleNamespace, mode: str) -> None:
    p.chat = gr.Chatbot(label="Chat", elem_id="chat", height=520, buttons=["copy"], sanitize_html=True)
    p.msg = gr.Textbox(placeholder="Ask about <region1>…", show_label=False, elem_id="msg", submit_btn="Send",
                       stop_btn=False, max_lines=6)
    with gr.Row():
        p.regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
        p.undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
        p.clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
    with gr.Accordion("Settings", open=False):
        p.temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        p.max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
        gr.Radio(["grounded", "tapchat"], value=mode, interactive=False, label="Mode (as loaded)")


# ---------------------------------------------------------------------------------------------- handlers
#: How many outputs each group of handlers returns (their event rows list the components, in this order).
PRIVATE = {"api_visibility": "private"}  # page events are not API endpoints (those are in app/api.py)
TAP = {**PRIVATE, "concurrency_id": "tap"}  # model work in two lanes (see app/api.py): TAP ...
LLM = {**PRIVATE, "concurrency_id": "llm"}  # ... and answers, so a click never queues behind an answer
# Every event that reads or rewrites the chat list shares one queue lane, so a search typed right after a rename
# or delete runs after it and never paints the old titles back.
HISTORY = {**PRIVATE, "concurrency_id": "history"}


def wire(demo: gr.Blocks, p: SimpleNamespace, h: Handlers) -> None:
    """The event table: (event, handler, inputs, outputs, options, shown as toasts on failure)."""
    # a new chat or image clears the Find status: what was found belongs to the image it was found on
    new_outputs = [p.cid, p.image, p.chips, p.chat, p.focus, p.title, p.editor, p.corner, p.find_status]
    image_outputs = [p.cid, p.image, p.chips, p.chat, p.focus, p.editor, p.corner, p.history_ds, p.history_ids,
                     p.find_status]
    region_outputs = [p.image, p.chips, p.focus, p.corner]
    found_outputs = [p.image, p.chips, p.focus, p.find_status]
    history = [p.history_ds, p.history_ids]
    show = gr.Row(visible=True)
    hide = gr.Row(visible=False)
    rows: list[tuple[Callable, Callable, Any, Any, dict[str, Any], bool]] = [
        # owner and history
        (demo.load, h.on_load, [p.token], [p.token, p.owner, *history, p.workspace, p.connecting], PRIVATE, False),
        (p.search.change, h.on_search, [p.owner, p.search], history, {**HISTORY, "trigger_mode": "always_last"},
         True),
        (p.new_btn.click, h.on_new, [p.owner], new_outputs, {**PRIVATE, "queue": False}, True),
        (p.history_ds.click, h.on_open, [p.owner, p.history_ids, p.history_ds], new_outputs, PRIVATE, True),
        (p.rename_btn.click, h.on_rename, [p.owner, p.cid, p.title, p.search], history, HISTORY, True),
        (p.delete_btn.click, lambda: show, None, p.confirm_row, {**PRIVATE, "queue": False}, False),
        (p.cancel_btn.click, lambda: hide, None, p.confirm_row, {**PRIVATE, "queue": False}, False),
        (p.confirm_btn.click, h.on_delete, [p.owner, p.cid, p.search], [p.confirm_row, *history, *new_outputs],
         HISTORY, True),
        (p.json_btn.click, h.on_export_json, [p.owner, p.cid], p.export_file, PRIVATE, True),
        (p.md_btn.click, h.on_export_markdown, [p.owner, p.cid], p.export_file, PRIVATE, True),
        # image and regions; preprocess=False: the raw upload reaches the service, whose checks give readable
        # messages for corrupt, non-image and oversized files (Gradio's own decoding would fail with a bare "Error")
        (p.image.upload, h.on_upload, [p.owner, p.cid, p.image], image_outputs, {**TAP, "preprocess": False},
         True),
        (p.image.select, h.on_click, [p.owner, p.cid, p.mode, p.corner], region_outputs, TAP, True),
        (p.scribble_btn.click, h.on_scribble, [p.owner, p.cid, p.editor], region_outputs, TAP, True),
        (p.chips.click, h.on_chip, [p.owner, p.cid, p.msg, p.chips], [p.image, p.focus, p.msg], PRIVATE, True),
        (p.focus_in.change, h.on_focus, [p.owner, p.cid, p.focus_in], [p.image, p.focus],
         {**PRIVATE, "trigger_mode": "always_last"}, True),
        (p.remove_btn.click, h.on_remove, [p.owner, p.cid, p.focus], [p.image, p.chips, p.focus], PRIVATE, True),
        (p.remove_all_btn.click, h.on_remove_all, [p.owner, p.cid], found_outputs, PRIVATE, True),
        (p.find_box.submit, h.on_find, [p.owner, p.cid, p.find_box], found_outputs, TAP, True),
        (p.find_btn.click, h.on_find, [p.owner, p.cid, p.find_box], found_outputs, TAP, True),
        (p.everything_btn.click, h.on_everything, [p.owner, p.cid], [p.candidates, p.everything_box], TAP, True),
        (p.candidates.select, h.on_adopt, [p.owner, p.cid], [p.image, p.chips, p.focus], TAP, True),
        # chat; Stop sets the answer's cancel event: the engine checks it before every token, so generation ends
        # within one step and the streaming handler finishes normally (saving the partial answer, restoring Send)
        (p.msg.stop, h.on_stop, [p.owner, p.cid], None, {**PRIVATE, "queue": False}, False),
        (p.undo_btn.click, h.on_undo, [p.owner, p.cid], [p.chat, p.msg], PRIVATE, True),
        (p.clear_btn.click, h.on_clear, [p.owner, p.cid], [p.chat], PRIVATE, True),
        (p.chat.clear, h.on_clear, [p.owner, p.cid], [p.chat], PRIVATE, True),
    ]
    if p.example_ds is not None:
        rows.append((p.example_ds.click, h.on_example, [p.owner, p.example_ds], [*image_outputs, p.msg], TAP, True))
    for event, handler, inputs, outputs, options, toast in rows:
        n = len(outputs) if isinstance(outputs, list) else 1
        event(toasts(n)(handler) if toast else handler, inputs, outputs, **options)
    # answers stream (their errors are handled inside `answer`), then the chat list is redrawn
    llm = api.lane(LLM, h.service)
    # the overlay is redrawn when an answer ends: the regions it cites stand out
    send = p.msg.submit(h.on_send, [p.owner, p.cid, p.msg, p.temperature, p.max_tokens],
                        [p.cid, p.chat, p.msg, p.image], **llm)
    regen = p.regen_btn.click(h.on_regenerate, [p.owner, p.cid, p.temperature, p.max_tokens],
                              [p.chat, p.msg, p.image], **llm)
    for event in (send, regen):
        event.then(h.history_view, [p.owner], history, queue=False, **PRIVATE)
