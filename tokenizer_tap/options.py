"""Command-line options shared by every CLI that takes regions: one definition, one parser, one message per mistake.

`assistant.options` adds the model-building options on top; no CLI imports another CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .prompts import Prompt, parse_box, parse_point, parse_stroke


def arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type=` from a parser that raises ValueError: argparse then prints our message, not its own."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, token budgets)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_region_options(parser: argparse.ArgumentParser, negatives: bool = False) -> None:
    """--point, --box, --scribble (each repeatable, each its own region), and optionally --neg."""
    parser.add_argument("--point", type=arg_type(parse_point), action="append", default=[], metavar="X,Y",
                        help="positive point in image pixels; each --point is its own region")
    if negatives:
        parser.add_argument("--neg", type=arg_type(parse_point), action="append", default=[], metavar="X,Y",
                            help="negative point, added to every --point and --box region")
    parser.add_argument("--box", type=arg_type(parse_box), action="append", default=[], metavar="X1,Y1,X2,Y2",
                        help="box region")
    parser.add_argument("--scribble", type=arg_type(parse_stroke), action="append", default=[],
                        metavar="'X,Y X,Y ...'", help="a stroke of points (sampled to 9) as one region")


def region_prompts(args: argparse.Namespace) -> list[Prompt]:
    """The regions of `add_region_options`, in the order points, boxes, scribbles."""
    negatives = tuple(getattr(args, "neg", ()) or ())
    prompts = [Prompt.point(x, y, negatives) for x, y in args.point]
    prompts += [Prompt(points=negatives, labels=(0,) * len(negatives), box=b, kind="box") for b in args.box]
    return prompts + [Prompt.scribble(s) for s in args.scribble]


def add_demo_models_option(parser: argparse.ArgumentParser) -> None:
    """--demo-models PATH: the bundle `--demo` (and the fallback where weights are absent) runs, for every CLI that
    takes `--demo`; without it, $TAPCHAT_DEMO_MODELS, else the one shipped with the code (`hub.demo_models`)."""
    parser.add_argument("--demo-models", type=Path, default=None, metavar="PATH",
                        help="the demo bundle to run (default: $TAPCHAT_DEMO_MODELS, else the one shipped with "
                             "the package: models/demo in a checkout)")
