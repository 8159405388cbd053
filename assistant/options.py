"""The model options every front end shares (app, `assistant chat`, `eval run`).

One definition keeps the names, defaults and help identical everywhere; `assistant.loading.load` reads them from
any object with these attribute names (argparse's Namespace, the app's AppConfig).
"""

from __future__ import annotations

import argparse

from tokenizer_tap.options import add_demo_models_option

#: `--quantization`: bitsandbytes 4/8-bit for CUDA, and weight-only int8/int4 on PyTorch's CPU kernels
#: (assistant/quantize.py). Defined here, torch-free, as the one list the parsers and `load_llm` check against.
BITSANDBYTES = ("4bit", "8bit")
WEIGHT_ONLY = ("int8", "int4")
QUANTIZATIONS = ("none", *BITSANDBYTES, *WEIGHT_ONLY)


def add_model_options(parser: argparse.ArgumentParser, *, checkpoint_alias: bool = False) -> None:
    """--tiny, --demo, --demo-models, --tap-model, --tap-checkpoint, --llm, --chat-checkpoint, --quantization,
    --device, --dtype, --llm-server, --llm-server-model.

    `checkpoint_alias` also accepts `--checkpoint` for `--chat-checkpoint` (the name those CLIs always had)."""
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random models: no download, gibberish answers (tests)")
    parser.add_argument("--demo", action="store_true",
                        help="the bundled demo models, trained on synthetic scenes (the default where the public "
                             "weights are absent; models/demo/README.md)")
    add_demo_models_option(parser)
    parser.add_argument("--tap-model", default=None, help="TAP variant (default: the checkpoint's, or tap_vit_l)")
    parser.add_argument("--tap-checkpoint", default=None,
                        help="TAP weights (.pkl/.safetensors) or a checkpoint folder from tap-train (default: hub)")
    parser.add_argument("--llm", default=None, help="language model id or folder (default: microsoft/phi-2)")
    names = ["--chat-checkpoint", "--checkpoint"] if checkpoint_alias else ["--chat-checkpoint"]
    parser.add_argument(*names, dest="chat_checkpoint", default=None,
                        help="a TAP-Chat checkpoint folder (tapchat mode); without one: grounded mode")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="LLM weights in fewer bits: int8/int4 weight-only on the CPU (PyTorch's kernels; int4 "
                             "is fastest per token, int8 closest to the full model), 4bit/8bit through bitsandbytes "
                             "(for CUDA); a folder written by `python -m assistant quantize` loads as it was saved")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--llm-server", default=None, metavar="URL",
                        help="run the LLM on an OpenAI-compatible vLLM server at URL (see docs/deployment.md); "
                             "TAP and the projector stay here")
    parser.add_argument("--llm-server-model", default=None, metavar="NAME",
                        help="the served model to ask (default: the LoRA adapter if the checkpoint has one, "
                             "else the base model)")

