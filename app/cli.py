"""`python -m app`: load the models once, open the history store, serve the page and the API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import gradio as gr

from assistant.engine import Assistant
from assistant.loading import Fallback, load
from assistant.options import add_model_options
from assistant.remote import ServerError
from assistant.store import ChatStore, StoreError
from tokenizer_tap.cache import cache_report
from tokenizer_tap.hub import demo_models

from . import ui
from .config import AppConfig
from .owners import AuthFileError, parse_credentials
from .service import ChatService

log = logging.getLogger("tapchat.app")
TINY_BANNER = "Running with **tiny random models** (`--tiny`): the tools work, the answers and captions are gibberish."
DEMO_BANNER = ("Running the **demo models**: a TAP and a small chat model that this project trained on synthetic "
               "scenes (models/demo/README.md). They are good at naming regions in scenes like the examples (their "
               "answers are often wrong), **not on photos**. For real images download TAP-L and Phi-2 (README, "
               "\"Models\") and restart.")


def models_banner(config: AppConfig, fallback: Fallback | None) -> str:
    """What the page says about the models `load` ran for `config`: nothing for the ones asked for, else which
    ones run and why (random weights and synthetic-scene models must not pass for the real thing)."""
    if config.tiny:
        return TINY_BANNER
    if fallback is None:
        return DEMO_BANNER if config.demo else ""
    if fallback.kind == "demo":
        return f"**Model weights not found** ({fallback.reason}). {DEMO_BANNER}"
    return (f"**Model weights not found** ({fallback.reason}). Running with tiny random models so you can try "
            "the tools; answers are gibberish. Download the weights (see README) and restart, or build the "
            "demo models with `make demo-models`.")


def build_app(config: AppConfig, assistant: Assistant | None = None) -> tuple[gr.Blocks, ChatService, str]:
    """The Blocks app, its service and the banner text; `assistant` skips loading (tests pass a tiny one)."""
    store = assistant.store if assistant is not None else ChatStore(config.db_path, config.image_dir)
    banner = TINY_BANNER if config.tiny else ""
    if assistant is None:
        assistant, fallback = load(Assistant, config, store, fall_back="demo-or-tiny")
        banner = models_banner(config, fallback)
    if config.tiny or banner:
        config.everything_min_iou = 0.0  # random weights predict low IoU everywhere
    service = ChatService(assistant, config)
    bundle = demo_models(config.demo_models) if DEMO_BANNER in banner else None
    demo = ui.build(service, auth=bool(config.auth), banner=banner,
                    gallery=bundle / "gallery" if bundle is not None else None)
    demo.queue(default_concurrency_limit=1, max_size=config.queue_size)
    return demo, service, banner


def launch(demo: gr.Blocks, config: AppConfig, **overrides) -> tuple:
    """Start serving; `overrides` go to `Blocks.launch` (tests use prevent_thread_lock, quiet)."""
    config.export_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(server_name=config.host, server_port=config.port, share=config.share,
                  auth=config.auth or None, auth_message="Log in to TAP-Chat",
                  max_file_size=f"{config.max_upload_mb}mb",
                  allowed_paths=[str(config.export_dir)], css=ui.CSS, js=ui.JS, theme=gr.themes.Soft(),
                  footer_links=["api"])
    return demo.launch(**{**kwargs, **overrides})


def parse_args(argv: list[str] | None = None) -> AppConfig:
    """The command line as an `AppConfig`; bad --auth values and contradictory options exit with a usage error."""
    p = argparse.ArgumentParser(prog="python -m app", description="TAP-Chat: chat about an image, region by region.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--data-dir", type=Path, default=None, help="history and images (default: per-user data dir, "
                                                                   "or $TAPCHAT_DATA)")
    p.add_argument("--db", type=Path, default=None, help="SQLite history file (default: DATA_DIR/history.db)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                   help="require login; repeat for more users (each user sees only their own chats)")
    p.add_argument("--auth-file", action="append", type=Path, default=[], help="a file of user:password lines")
    add_model_options(p)
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--max-upload-mb", type=int, default=25)
    p.add_argument("--answers-at-once", type=int, default=8,
                   help="answers streamed at the same time, decoded as one batch (with --llm-server: more, e.g. 32)")
    args = p.parse_args(argv)
    if args.answers_at_once < 1:
        p.error("--answers-at-once must be at least 1")
    if args.tiny and args.llm_server:
        p.error("--tiny runs random models here; with --llm-server pass --chat-checkpoint (the server serves its llm/)")
    try:
        auth = parse_credentials(args.auth, args.auth_file)
    except AuthFileError as exc:
        p.error(str(exc))
    config = AppConfig(host=args.host, port=args.port, db=args.db, auth=auth, tiny=args.tiny, demo=args.demo,
                       demo_models=args.demo_models,
                       tap_model=args.tap_model, tap_checkpoint=args.tap_checkpoint, llm=args.llm,
                       chat_checkpoint=args.chat_checkpoint, quantization=args.quantization, device=args.device,
                       dtype=args.dtype, llm_server=args.llm_server, llm_server_model=args.llm_server_model,
                       share=args.share, max_upload_mb=args.max_upload_mb, answers_at_once=args.answers_at_once)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    return config


def main(argv: list[str] | None = None) -> None:
    """Load, then serve until stopped; a store or LLM-server failure exits with its message, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_args(argv)
    try:
        demo, service, banner = build_app(config)
    except StoreError as exc:
        sys.exit(f"cannot open the history store: {exc}")
    except ServerError as exc:
        sys.exit(str(exc))
    bot = service.bot
    log.info("memory bounds: %s", ", ".join(f"{name} <= {limit:,} {unit}" for name, _, limit, unit in cache_report()))
    models = f"TAP {bot.config.tap_model} + {bot.config.llm} ({bot.mode} mode)"
    if "weights not found" in banner:
        models += " [fallback: weights not found]"
    print(f"TAP-Chat: {models}; history in {config.db_path}; "
          f"{'login required' if config.auth else 'anonymous owners per browser'}; "
          f"open http://{config.host}:{config.port}", flush=True)
    launch(demo, config)
