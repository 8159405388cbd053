"""The model options every front end shares (app, `assistant chat`, `eval run`), and building an Assistant from them.

One definition keeps the names, defaults and help identical everywhere; `Assistant.from_options` reads any object
with these attribute names (argparse's Namespace, the app's AppConfig).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizer_tap.errors import WeightsNotFoundError
from tokenizer_tap.hub import demo_models

if TYPE_CHECKING:
    from .engine import Assistant

QUANTIZATIONS = ("none", "4bit", "8bit")
log = logging.getLogger("tapchat")


def add_model_options(parser: argparse.ArgumentParser, *, checkpoint_alias: bool = False) -> None:
    """--tiny, --demo, --tap-model, --tap-checkpoint, --llm, --chat-checkpoint, --quantization, --device, --dtype,
    --llm-server, --llm-server-model.

    `checkpoint_alias` also accepts `--checkpoint` for `--chat-checkpoint` (the name those CLIs always had)."""
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random models: no download, gibberish answers (tests)")
    parser.add_argument("--demo", action="store_true",
                        help="the bundled demo models, trained on synthetic scenes (the default where the public "
                             "weights are absent; models/demo/README.md)")
    parser.add_argument("--tap-model", default=None, help="TAP variant (default: the checkpoint's, or tap_vit_l)")
    parser.add_argument("--tap-checkpoint", default=None,
                        help="TAP weights (.pkl/.safetensors) or a checkpoint folder from tap-train (default: hub)")
    parser.add_argument("--llm", default=None, help="language model id or folder (default: microsoft/phi-2)")
    names = ["--chat-checkpoint", "--checkpoint"] if checkpoint_alias else ["--chat-checkpoint"]
    parser.add_argument(*names, dest="chat_checkpoint", default=None,
                        help="a TAP-Chat checkpoint folder (tapchat mode); without one: grounded mode")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="load the LLM in 4 or 8 bits (bitsandbytes, CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--llm-server", default=None, metavar="URL",
                        help="run the LLM on an OpenAI-compatible vLLM server at URL (see docs/deployment.md); "
                             "TAP and the projector stay here")
    parser.add_argument("--llm-server-model", default=None, metavar="NAME",
                        help="the served model to ask (default: the LoRA adapter if the checkpoint has one, "
                             "else the base model)")


@dataclass(frozen=True)
class Fallback:
    """Why other models than the ones asked for are running: `kind` is "demo" or "tiny", `reason` the first line of
    the missing-weights error."""

    kind: str
    reason: str


def load_or_fall_back(options: Any, store=None, *, tiny: bool = True) -> tuple[Assistant, Fallback | None]:
    """The models the options name; where their weights are absent, the demo models (trained on synthetic scenes),
    and where those are absent too, tiny random ones (or, without `tiny`, the missing-weights error: a command-line
    answer from random weights helps nobody, a page that opens does). The fallback says which models run."""
    from .engine import Assistant  # loads transformers: front ends that only add these options stay light
    try:
        return Assistant.from_options(options, store=store), None
    except WeightsNotFoundError as exc:
        if not tiny and (demo_models() is None or getattr(options, "demo", False)):
            raise
        reason = str(exc).splitlines()[0].rstrip(":")  # the list of files goes to the log
        log.warning("model weights not found:\n%s", exc)
    if demo_models() is not None and not getattr(options, "demo", False):
        return Assistant.demo(store=store, device=options.device), Fallback("demo", reason)
    return Assistant.tiny(getattr(options, "mode", "tapchat"), store=store), Fallback("tiny", reason)
