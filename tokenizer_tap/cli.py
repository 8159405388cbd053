"""Command line: `python -m tokenizer_tap {describe,find,convert,parity} ...`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .build import build_tap, checkpoint_folder
from .checkpoint import (
    check_state_dict,
    load_concepts,
    load_folder_concepts,
    read_state_dict,
    save_official_pkl,
    save_pretrained,
    save_safetensors,
)
from .config import get_config
from .errors import TapError, WeightsNotFoundError
from .hub import demo_models, require_demo_models, tokenizer_path
from .image_io import load_image
from .modeling import TAP
from .options import add_demo_models_option, add_region_options, arg_type, positive_int, region_prompts
from .parity import run_parity
from .predictor import TapPredictor
from .region import Region
from .visualize import draw_regions
from .vocabulary import match_query


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tokenizer_tap",
                                     description="TAP promptable tokenizer: segment, recognise and caption regions.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("describe", help="describe regions of an image given by points, boxes or scribbles")
    d.add_argument("image")
    add_region_options(d, negatives=True)
    d.add_argument("--everything", action="store_true", help="also segment the whole scene")
    add_model_options(d)
    d.add_argument("--top-k", type=arg_type(positive_int), default=3, help="concepts per region in --json output")
    d.add_argument("--max-regions", type=arg_type(positive_int), default=12, help="regions kept by --everything")
    d.add_argument("--json", action="store_true", help="print JSON instead of text")
    d.add_argument("--out", help="write an overlay image with numbered regions here")

    f = sub.add_parser("find", help="find every instance of the concepts a query names ('cars', 'cars and people')")
    f.add_argument("image")
    f.add_argument("query", help="concept names: any case, plural or singular, several joined by 'and' or commas")
    add_model_options(f)
    f.add_argument("--min-score", type=arg_type(score), default=0.5,
                   help="least concept probability of an instance, 0-1 (default 0.5)")
    f.add_argument("--max-instances", type=arg_type(positive_int), default=20, help="instances kept (default 20)")
    f.add_argument("--json", action="store_true", help="print JSON: query, concepts, count, instances")
    f.add_argument("--out", help="write an overlay image with numbered instances here")

    c = sub.add_parser("convert", help="convert between checkpoint forms: official .pkl, .safetensors, and a TAP "
                                       "checkpoint folder (what tap-train writes)")
    c.add_argument("src", help="a .pkl / .safetensors / .pt weights file or a checkpoint folder")
    c.add_argument("dst", help="*.safetensors, *.pkl (the official layout: float16 numpy arrays), or a folder")
    c.add_argument("--model", help="check keys and shapes against this model size (needed for a folder from a file)")
    c.add_argument("--tokenizer", help="caption tokenizer to put in a folder (default: the LLaMA one, verified)")
    c.add_argument("--concepts", help="concept vocabulary (.pkl) to put in a folder")

    p = sub.add_parser("parity", help="compare with the official outputs stored in a parity fixture directory")
    p.add_argument("fixture")
    p.add_argument("--threads", type=int, default=2)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which TAP runs: official weights, a checkpoint folder, the tiny random model or the demo, and where."""
    parser.add_argument("--model", default="tap_vit_l", help="tap_vit_b, tap_vit_l, tap_vit_h (default tap_vit_l)")
    parser.add_argument("--checkpoint", help="weights (.pkl/.safetensors/.pt) or a TAP checkpoint folder "
                        "(tap-train); default: the official file from the hub")
    parser.add_argument("--concepts", default="merged_2560", help="merged_2560, lvis_1203, coco_80 or a .pkl path")
    parser.add_argument("--tokenizer", help="LLaMA tokenizer.model path; default: a verified hub copy")
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model: needs no download (tests)")
    parser.add_argument("--demo", action="store_true", help="the bundled demo TAP, trained on synthetic scenes (the "
                        "default where the official weights are absent; models/demo/README.md)")
    add_demo_models_option(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto",
                        help="auto (GPU: float16; CPU: float32 or bfloat16, whichever this CPU runs faster, timed "
                             "once and cached), float32, bfloat16 or float16")


def score(text: str) -> float:
    """A probability threshold in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a number from 0 to 1, got {text!r}")
    return value


def check_out(path: str | None) -> None:
    """Fail on a bad --out before any model work, not after it."""
    if path:
        out = Path(path)
        if not out.parent.is_dir():
            raise ValueError(f"--out: folder {out.parent} does not exist")
        if out.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
            raise ValueError("--out must end in .png, .jpg, .jpeg or .webp")


def write_overlay(image: str, regions: list[Region], labels: list[str], path: str) -> None:
    """The regions tinted over the image, each with its label, saved to `path`."""
    draw_regions(load_image(image), [r.mask for r in regions], labels).save(path)
    print(f"overlay written to {path}", file=sys.stderr)


def load_predictor(args: argparse.Namespace):
    """The TAP the options name; where the official weights are absent, the demo TAP (when bundled), with a note."""
    if args.tiny:
        return TapPredictor.random(device=args.device, dtype=args.dtype)
    if args.demo:
        return TapPredictor.from_pretrained(require_demo_models(args.demo_models) / "tap", device=args.device,
                                            dtype=args.dtype)
    bundle = demo_models(args.demo_models)
    try:
        return TapPredictor.from_pretrained(args.model, args.checkpoint, concepts=args.concepts,
                                            tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
    except WeightsNotFoundError as exc:
        if bundle is None or args.checkpoint:  # weights named explicitly are an error to fix, not to replace
            raise
        print(f"note: {str(exc).splitlines()[0]}\nnote: running the demo TAP (trained on synthetic scenes: good on "
              "scenes like examples/, not on photos)", file=sys.stderr)
        return TapPredictor.from_pretrained(bundle / "tap", device=args.device, dtype=args.dtype)


def describe(args: argparse.Namespace) -> int:
    check_out(args.out)
    predictor = load_predictor(args)
    predictor.set_image(args.image)
    prompts = region_prompts(args)
    if not prompts and not args.everything:
        raise SystemExit("nothing to describe: give --point, --box, --scribble or --everything")
    regions = predictor.predict(prompts, top_k=args.top_k)
    if args.everything:
        regions += predictor.segment_everything(max_regions=args.max_regions, top_k=args.top_k)
    if args.json:
        print(json.dumps([dict(r.to_dict(), region=i) for i, r in enumerate(regions, 1)], indent=1))
    else:
        if not regions:
            print("no regions found")
        for i, r in enumerate(regions, 1):
            print(f"{i}. {r.describe()}")
    if args.out:
        write_overlay(args.image, regions, [f"{i} {r.concept}" for i, r in enumerate(regions, 1)], args.out)
    return 0


def find(args: argparse.Namespace) -> int:
    """Every instance the query names: a count per concept and a line per instance, or the JSON the issue fixes."""
    check_out(args.out)
    predictor = load_predictor(args)
    concepts = match_query(args.query, predictor.model.concept_projector.names)  # fails before the image is read
    found = predictor.find(args.query, args.image, min_score=args.min_score, max_instances=args.max_instances)
    if args.json:
        instances = [{"bbox": None if r.box is None else list(r.box), "concept": r.concept,
                      "score": round(r.concept_prob, 4), "caption": r.caption} for r in found]
        print(json.dumps({"query": args.query, "concepts": concepts, "count": len(found), "instances": instances},
                         indent=1))
    else:
        print(", ".join(f"{sum(r.concept == c for r in found)} × {c}" for c in concepts))
        for i, r in enumerate(found, 1):
            print(f"{i}. {r.concept} {r.concept_prob:.2f} {list(r.box or ())}: {r.caption}")
    if args.out:
        write_overlay(args.image, found, [f"{i} {r.concept}" for i, r in enumerate(found, 1)], args.out)
    return 0


def convert(args: argparse.Namespace) -> int:
    folder = checkpoint_folder("", args.src)
    state = read_state_dict(folder / "model.safetensors" if folder else args.src)
    if args.model or folder:
        check_state_dict(TAP(get_config(args.model or folder)), state)
    dst = Path(args.dst)
    if dst.suffix.lower() == ".pkl":
        save_official_pkl(state, dst)
    elif dst.suffix.lower() == ".safetensors":
        save_safetensors(state, dst)
    else:
        if not (args.model or folder):
            raise ValueError("writing a checkpoint folder from a weights file needs --model (tap_vit_b/l/h ...)")
        tap = build_tap(folder or args.model, None if folder else args.src, concepts=None, device="cpu",
                        dtype="float32")
        tokenizer = args.tokenizer or (folder / "text_tokenizer.model" if folder else tokenizer_path())
        concepts = load_concepts(args.concepts) if args.concepts else (load_folder_concepts(folder) if folder else None)
        save_pretrained(tap, dst, tokenizer, concepts)
    print(f"wrote {len(state)} tensors to {dst}")
    return 0


def parity(args: argparse.Namespace) -> int:
    checks = run_parity(Path(args.fixture), threads=args.threads)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not checks else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"describe": describe, "find": find, "convert": convert, "parity": parity}[args.command](args)
    except (TapError, ValueError, OSError) as exc:  # user-fixable: bad files, names, options
        print(f"error: {exc}", file=sys.stderr)
        return 2
