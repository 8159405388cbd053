"""Command line: `python -m assistant chat IMAGE` (streaming REPL or one-shot), `python -m assistant merge` and
`python -m assistant quantize`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import transformers

from tokenizer_tap.errors import TapError
from tokenizer_tap.options import add_region_options, arg_type, positive_int, region_prompts
from tokenizer_tap.prompts import Prompt, parse_box, parse_point, parse_stroke

from .decoding import GenerationSettings
from .engine import Assistant
from .loading import load
from .model import merge_checkpoint
from .options import WEIGHT_ONLY, add_model_options
from .quantize import GROUP_SIZES, QuantScheme
from .session import Session
from .store import ChatStore
from .template import ConversationError, found_line
from .template import line as region_line

HELP = """commands:
  /point X,Y [-X,Y ...]   add a region from a point (a leading '-' marks a negative point)
  /box X1,Y1,X2,Y2        add a region from a box
  /scribble X,Y X,Y ...   add a region from a stroke
  /find QUERY             every instance of what QUERY names ("car", "cars and people") as regions, with counts
  /regions                list this conversation's regions
  /remove N               remove <regionN>
  /image PATH             switch to another image (later questions refer to it)
  /new                    start a new conversation on the current image
  /history                list stored conversations (needs --db)
  /open ID                reopen a stored conversation (needs --db)
  /export PATH            write this conversation as LLaVA/Bunny fine-tuning JSON (needs --db)
  /help, /quit
anything else is a question; refer to regions as <region1>, <region2> ..."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of `chat` (a REPL, or one-shot with `--ask`), `merge` and `quantize`; model options as
    `add_model_options`."""
    parser = argparse.ArgumentParser(prog="python -m assistant", description="TAP-Chat: chat about image regions.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat about an image (REPL), or answer one --ask question")
    c.add_argument("image", nargs="?", help="image file (optional: text-only chat)")
    c.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                   help="answer this question and exit (repeat for follow-ups)")
    add_region_options(c)
    add_model_options(c, checkpoint_alias=True)
    c.add_argument("--mode", choices=["tapchat", "grounded"], default="tapchat", help="with --tiny: which mode")
    c.add_argument("--db", help="SQLite history file (conversations are kept and can be reopened)")
    c.add_argument("--owner", default=os.environ.get("USER", "local"), help="history owner (default: $USER)")
    c.add_argument("--max-new-tokens", type=arg_type(positive_int), default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--json", action="store_true", help="one-shot: print the answers and regions as JSON")
    m = sub.add_parser("merge", help="fold a checkpoint's LoRA into Phi-2 and write a standalone folder")
    m.add_argument("src")
    m.add_argument("dst")
    q = sub.add_parser("quantize", help="fold a checkpoint's LoRA in and write a folder of int8/int4 LLM weights "
                                        "(CPU) that loads as saved, never quantising again")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--quantization", choices=WEIGHT_ONLY, default="int8")
    q.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=QuantScheme.group_size,
                   help="int4: inputs per scale and zero (smaller: closer to the full model, a little slower)")
    return parser


def open_store(db: str | None) -> ChatStore | None:
    """The history store `--db` names (its folder made), or None: without `--db` nothing is kept."""
    if not db:
        return None
    Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return ChatStore(Path(db).expanduser())


def chat(args: argparse.Namespace) -> int:
    """The `chat` command: load (demo models if weights are missing), add the regions, answer `--ask` or run a REPL."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    bot, fallback = load(Assistant, args, open_store(args.db), fall_back="demo")
    if fallback is not None:
        print(f"note: {fallback.reason}\nnote: running the demo models (trained on synthetic scenes: good on "
              "scenes like examples/, not on photos)", file=sys.stderr)
    conv = bot.start(args.owner, image=args.image)
    for p in region_prompts(args):
        print(_region_text(bot.add_region(conv, p)), file=sys.stderr)
    if args.ask:
        answers = []
        for question in args.ask:
            reply = bot.ask(conv, question, settings) if args.json else _print_stream(bot, conv, question, settings)
            answers.append({"question": question, "answer": reply.text, "note": reply.note,
                            "complete": reply.complete, "dropped_turns": reply.dropped_turns})
        if args.json:
            regions = [{"id": f"<region{r.number}>", "line": region_line(r)} for r in conv.active_regions()]
            print(json.dumps({"conversation": conv.id, "regions": regions, "turns": answers}, indent=1))
        return 0
    return repl(bot, conv, settings)


def repl(bot, conv: Session, settings) -> int:
    """Questions and /commands until EOF or /quit; errors are printed, and Ctrl-C while answering stops that answer."""
    print(f"TAP-Chat ({bot.model_id}). /help for commands, /quit to leave.", file=sys.stderr)
    state = {"conv": conv}
    commands: dict[str, Callable[[list[str]], None]] = {
        "point": lambda a: _add(bot, state["conv"], Prompt.point(*parse_point(a[0]),
                                                                   [parse_point(n[1:]) for n in a[1:]])),
        "box": lambda a: _add(bot, state["conv"], Prompt.from_box(*parse_box(a[0]))),
        "scribble": lambda a: _add(bot, state["conv"], Prompt.scribble(parse_stroke(" ".join(a)))),
        "find": lambda a: _find(bot, state["conv"], " ".join(a)),
        "regions": lambda a: _list_regions(state["conv"]),
        "remove": lambda a: bot.remove_region(state["conv"], int(a[0])),
        "image": lambda a: print(f"image set ({bot.set_image(state['conv'], a[0])[:8]})"),
        "new": lambda a: state.update(conv=_new(bot, state["conv"])),
        "history": lambda a: _history(bot, state["conv"].owner),
        "open": lambda a: state.update(conv=bot.open(state["conv"].owner, a[0])),
        "export": lambda a: _export(bot, state["conv"], a[0]),
        "help": lambda a: print(HELP),
    }
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            name, *rest = shlex.split(line[1:]) or [""]
            if name in ("quit", "exit", "q"):
                return 0
            if name not in commands:
                print(f"unknown command /{name}; /help lists them")
                continue
            try:
                commands[name](rest)
            except IndexError:
                print(f"/{name} needs an argument; /help shows the form")
            except (TapError, ValueError, OSError, KeyError) as exc:
                print(f"error: {exc}")
            continue
        try:
            _print_stream(bot, state["conv"], line, settings)
        except KeyboardInterrupt:
            print("\n[stopped]")
        except (TapError, ValueError, RuntimeError) as exc:
            print(f"error: {exc}")


def _print_stream(bot, conv: Session, question: str, settings):
    stream = bot.stream(conv, question, settings)
    try:
        for piece in stream:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stream.cancel()
        for _ in stream:  # let the generator record the partial answer
            pass
        raise
    finally:
        print()
    reply = stream.reply
    if reply.note:
        print(f"⚠ {reply.note}")
    if reply.dropped_turns:
        print(f"[{reply.dropped_turns} oldest turn(s) left out to fit the context]", file=sys.stderr)
    return reply


def _add(bot, conv: Session, prompt: Prompt) -> None:
    print(_region_text(bot.add_region(conv, prompt)))


def _region_text(entry) -> str:
    return region_line(entry)


def _find(bot: Assistant, conv: Session, query: str) -> None:
    """Print each instance found (number, concept, score, pixel box) and the count per concept."""
    found = conv.find(query)
    for r in found:
        box = "" if r.box is None else " box " + ",".join(map(str, r.box))
        print(f"{r.ref} {r.concept} {r.concept_prob:.2f}{box}")
    print(found_line(bot.find_counts(query, found)))


def _list_regions(conv: Session) -> None:
    active = conv.active_regions()
    print("\n".join(region_line(r) for r in active) if active else "no regions yet: /point X,Y adds one")


def _new(bot, conv: Session) -> Session:
    new = bot.start(conv.owner)
    if conv.image_key is not None:
        new.image_key, new.image_sha = conv.image_key, conv.image_sha
    print(f"new conversation {new.id}")
    return new


def _history(bot, owner: str) -> None:
    if bot.store is None:
        raise ValueError("no history: start with --db FILE")
    for info in bot.store.list_conversations(owner):
        print(f"{info.id}  {info.updated[:19]}  {info.message_count:3d} msgs  {info.title}")


def _export(bot, conv: Session, path: str) -> None:
    if bot.store is None:
        raise ValueError("export needs the history store: start with --db FILE")
    records = bot.store.export_llava(conv.owner, conv.id)
    Path(path).write_text(json.dumps(records, indent=1, ensure_ascii=False))
    print(f"wrote {len(records)} record(s) to {path}")


def merge(args: argparse.Namespace) -> int:
    """The `merge` command: write a standalone folder with the checkpoint's LoRA folded into Phi-2."""
    print(f"merged checkpoint written to {merge_checkpoint(args.src, args.dst)}")
    return 0


def quantize(args: argparse.Namespace) -> int:
    """The `quantize` command: `merge`, then the LLM's weights in int8/int4 (loads with `--chat-checkpoint DST`)."""
    scheme = QuantScheme(args.quantization, group_size=args.group_size)
    print(f"{args.quantization} checkpoint written to {merge_checkpoint(args.src, args.dst, scheme)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m assistant`: errors a user can fix print one line and return 2 instead of a traceback."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return {"chat": chat, "merge": merge, "quantize": quantize}[args.command](args)
    except (TapError, ValueError, OSError, ConversationError) as exc:  # user-fixable
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """Progress bars and load reports from transformers/bitsandbytes would drown the conversation."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
