"""The one way to load the models: `load(Assistant, options, store)`, for both command lines, the app, eval,
finetune's scoring and LangChain, so a checkpoint loads, and a missing file is reported, the same everywhere.

`Assistant.from_pretrained`, `from_options`, `demo` and `tiny` are one-line aliases of these functions (the README
shows them). That is why each function takes the class it builds first, as a classmethod takes `cls`: engine.py
imports this module for the aliases, so this module cannot import engine.py (tests/test_layering.py forbids the
cycle). Callers pass `Assistant`; the aliases pass `cls`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

from tokenizer_tap.build import resolve_device, resolve_dtype
from tokenizer_tap.errors import WeightsNotFoundError
from tokenizer_tap.hub import demo_models, require_demo_models
from tokenizer_tap.predictor import TapPredictor

from .config import ChatConfig
from .llm import TINY_LLM, LoraSettings, TinyPhi
from .model import ChatModel
from .projector import ProjectorConfig
from .remote import ServerLLM

if TYPE_CHECKING:
    from .engine import Assistant
    from .store import ChatStore

A = TypeVar("A", bound="Assistant")
#: What `load` runs where the weights the options name are absent: nothing (the error says what is missing), the
#: demo models, or the demo models and, where those are absent too, tiny random ones.
FallBack = Literal["never", "demo", "demo-or-tiny"]
log = logging.getLogger("tapchat")


@dataclass(frozen=True)
class LoadOptions:
    """The models to load: the options of `assistant.options.add_model_options`, and `mode` for `tiny`."""

    tiny: bool = False  # tiny random models (tests, development): no download, gibberish answers
    demo: bool = False  # the demo bundle: trained on synthetic scenes
    demo_models: str | Path | None = None  # which demo bundle (default: `hub.demo_models_folder`)
    tap_model: str | None = None
    tap_checkpoint: str | Path | None = None
    llm: str | None = None
    chat_checkpoint: str | Path | None = None  # a TAP-Chat checkpoint folder; without one, grounded mode
    quantization: str = "none"
    device: str = "auto"
    dtype: str = "auto"
    llm_server: str | None = None  # an OpenAI-compatible vLLM URL: the LLM runs there
    llm_server_model: str | None = None
    mode: str = "tapchat"  # the mode `tiny` builds (checkpoints carry their own)

    @classmethod
    def of(cls, options: Any) -> LoadOptions:
        """The options an argparse Namespace or the app's AppConfig carries, by name; what it lacks keeps its
        default, so every front end reads through this one list."""
        if isinstance(options, cls):
            return options
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)})


@dataclass(frozen=True)
class Fallback:
    """Why other models than the ones asked for are running: `kind` is "demo" or "tiny", `reason` the first line of
    the missing-weights error."""

    kind: str
    reason: str


class Loaded(NamedTuple):
    """What `load` loaded, and why it is not what the options named (None where it is)."""

    assistant: Assistant
    fallback: Fallback | None = None


def load(cls: type[A], options: Any, store: ChatStore | None = None, *, fall_back: FallBack = "never") -> Loaded:
    """The models `options` name (`LoadOptions`, or any object with its attribute names) as a `cls`.

    Where their weights are absent, `fall_back` says what runs: "never" raises the missing-weights error; "demo"
    runs the demo models where they are (the command line: an answer from random weights helps nobody), and
    "demo-or-tiny" tiny random ones where they are not either (the app: a page that opens does). The demo models
    asked for and absent leave only the tiny ones.
    """
    opts = LoadOptions.of(options)
    try:
        return Loaded(_named(cls, opts, store))
    except WeightsNotFoundError as exc:
        bundle = None if opts.demo else demo_models(opts.demo_models)
        if fall_back == "never" or (fall_back == "demo" and bundle is None):
            raise
        reason = str(exc).splitlines()[0].rstrip(":")  # the list of files goes to the log
        log.warning("model weights not found:\n%s", exc)
    if bundle is not None:
        return Loaded(demo(cls, store=store, device=opts.device, folder=bundle, quantization=opts.quantization),
                      Fallback("demo", reason))
    return Loaded(tiny(cls, opts.mode, store=store, quantization=opts.quantization), Fallback("tiny", reason))


def _named(cls: type[A], opts: LoadOptions, store: ChatStore | None) -> A:
    """Exactly the models the options name: `tiny`, `demo`, else a checkpoint folder or the public weights."""
    if opts.tiny:
        if opts.llm_server:
            raise ValueError("--tiny runs random models in this process; --llm-server needs a checkpoint folder "
                             "(--chat-checkpoint) whose llm/ the server serves")
        return tiny(cls, opts.mode, store=store, quantization=opts.quantization)
    if opts.demo:
        return demo(cls, store=store, device=opts.device, folder=opts.demo_models, quantization=opts.quantization)
    return from_pretrained(cls, opts.chat_checkpoint, tap_model=opts.tap_model, tap_checkpoint=opts.tap_checkpoint,
                           llm=opts.llm, device=opts.device, dtype=opts.dtype, quantization=opts.quantization,
                           store=store, llm_server=opts.llm_server, llm_server_model=opts.llm_server_model)


def from_pretrained(cls: type[A], checkpoint: str | Path | None = None, *, tap_model: str | None = None,
                    tap_checkpoint: str | Path | None = None, llm: str | None = None, device: str = "auto",
                    dtype: str = "auto", quantization: str = "none", store: ChatStore | None = None,
                    llm_server: str | None = None, llm_server_model: str | None = None, **tap_kwargs: Any) -> A:
    """A checkpoint folder (tapchat or grounded), or with no folder, grounded mode on public weights.

    With `llm_server` (an OpenAI-compatible vLLM URL) the LLM runs there and only its tokenizer and embedding
    table are loaded here; `llm_server_model` names the served model (default: the LoRA adapter or the base).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, work="turn")
    if checkpoint is not None:
        config = ChatConfig.load(checkpoint)
    else:
        config = ChatConfig(mode="grounded", **({"llm": llm} if llm else {}))
    parts, missing = {}, []
    tap_name = tap_model or (config.tap_location(checkpoint) if checkpoint is not None else config.tap_model)

    def predictor() -> TapPredictor:
        if tap_name == "tap_tiny" and tap_checkpoint is None:  # no public weights: the seed-0 random model
            return TapPredictor.random("tap_tiny", seed=0, device=str(dev), dtype=dtype)
        return TapPredictor.from_pretrained(tap_name, tap_checkpoint, device=str(dev), dtype=dtype, **tap_kwargs)

    def chat() -> ChatModel:
        if llm_server:
            return ChatModel.for_server(checkpoint, llm=llm, dtype=dt, device=dev)
        if checkpoint is not None:
            return ChatModel.from_pretrained(checkpoint, dtype=dt, device=dev, quantization=quantization, llm=llm)
        return ChatModel.create(config, dtype=dt, device=dev, quantization=quantization)

    for name, part in {"predictor": predictor, "chat": chat}.items():  # both, so one message names every missing file
        try:
            parts[name] = part()
        except WeightsNotFoundError as exc:
            missing.append(str(exc))
    if missing:
        raise WeightsNotFoundError("\n".join(missing))
    server = ServerLLM(parts["chat"], llm_server, llm_server_model) if llm_server else None
    return cls(parts["predictor"], parts["chat"], store, llm_server=server)


def demo(cls: type[A], *, store: ChatStore | None = None, device: str = "auto", folder: str | Path | None = None,
         quantization: str = "none") -> A:
    """The demo models (`make demo-models`): TAP and a small chat model trained on synthetic scenes, from `folder`
    (`--demo-models`), else `hub.demo_models_folder`'s default."""
    return from_pretrained(cls, require_demo_models(folder) / "chat", device=device, dtype="float32", store=store,
                           quantization=quantization)


def tiny(cls: type[A], mode: str = "tapchat", *, store: ChatStore | None = None, seed: int = 0, lora: bool = True,
         tiny_llm: TinyPhi | None = None, quantization: str = "none", **kwargs: Any) -> A:
    """Small random models (no download): for tests, development and `--tiny`. Answers are gibberish. `kwargs` go
    to the class (`cache_bytes`, `model_id`)."""
    predictor = TapPredictor.random("tap_tiny", seed=seed, device="cpu")
    llm_cfg = tiny_llm or TinyPhi()
    config = ChatConfig(mode=mode, tap_model="tap_tiny", llm=TINY_LLM,
                        projector=(ProjectorConfig(in_dim=predictor.model.config.encoder_embed_dim, hidden_dim=64,
                                                   out_dim=llm_cfg.hidden_size) if mode == "tapchat" else None),
                        lora=LoraSettings(r=8, alpha=16) if (lora and mode == "tapchat") else None)
    chat = ChatModel.create(config, seed=seed, tiny=llm_cfg, quantization=quantization)
    return cls(predictor, chat, store, **kwargs)
