"""`python -m eval run|score|merge|compare`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from assistant.options import add_model_options
from tokenizer_tap.build import DEFAULT_CONCEPTS, checkpoint_folder
from tokenizer_tap.predictor import TapPredictor

from . import report as reports
from .answers import load_answers, merge
from .benchmarks import BENCHMARKS, get, load_lmms
from .launch import DEFAULT_TIMEOUT_S, Launch, RankStatus
from .lmms import DataMissing
from .questions import Question, reading, shard
from .scoring import load_annotations, read_answers, score
from .spec import RunInputs

if TYPE_CHECKING:
    from .runner import RunStats


CHOICES_HELP = ("gqa: the official {split}_choices.json (valid and plausible answers per question), for validity and "
                "plausibility")


def torch_cuda() -> bool:
    return torch.cuda.is_available()


def load_data(args: argparse.Namespace) -> tuple[list, Any, dict[str, str]]:
    """(questions, annotations or None, bad records) from --hf (lmms-lab parquet) or the Bunny/official files."""
    module = get(args.benchmark)
    if args.images is None and (args.hf or module.IMAGES_REQUIRED):
        sys.exit(f"{args.benchmark}: pass --images DIR, where the images inside the data are written")
    if args.hf:
        with reading(args.hf, f"{args.benchmark} lmms-lab parquet"):
            loaded = load_lmms(args.benchmark, args.hf, args.images, split=args.split, ocr=args.ocr)
        return loaded.questions, loaded.annotations, loaded.bad
    with reading(args.questions, f"{args.benchmark} questions file"):
        return module.load_run(RunInputs(questions=args.questions, images=args.images,
                                         annotations=args.annotations, split=args.split,
                                         video_frames=args.video_frames, ocr=args.ocr, detections=args.detections))


def answerer(args: argparse.Namespace, device: str, annotations: Any = None):
    module = get(args.benchmark)
    if module.TAP_ONLY:
        tap_model = "tap_tiny" if args.tiny else args.tap_model or "tap_vit_l"
        weights = args.tap_checkpoint or args.chat_checkpoint
        folder = checkpoint_folder(tap_model, weights)
        concepts = args.concepts  # else a checkpoint folder's own vocabulary, or the benchmark's official one
        if concepts is None and folder is None and hasattr(module, "default_concepts"):
            concepts = module.default_concepts(annotations)
        predictor = (TapPredictor.random("tap_tiny") if args.tiny else
                     TapPredictor.from_pretrained(tap_model, weights, concepts=concepts or DEFAULT_CONCEPTS,
                                                  device=device, dtype=args.dtype))
        model_id = str(folder) if folder is not None else tap_model
        return module.tap_answerer(predictor, annotations, model_id=model_id, max_new_tokens=args.max_new_tokens)
    # The engine, the loader and the runner load transformers: `score`, `merge` and `compare` never need them.
    from assistant.engine import Assistant
    from assistant.loading import load

    from .runner import ChatAnswerer
    if device != "auto":  # one GPU per launched rank
        args.device = device
    bot = load(Assistant, args).assistant
    if args.likelihood and not module.CHOICES:
        sys.exit(f"--likelihood is for the multiple-choice benchmarks ({', '.join(multiple_choice())})")
    return ChatAnswerer(bot, args.max_new_tokens, module.CHOICES if args.likelihood else "", args.find)


def multiple_choice() -> list[str]:
    return [name for name in BENCHMARKS if get(name).CHOICES]


def report_and_print(report: dict[str, Any], prefix: Path | None) -> None:
    print(reports.markdown(report))
    if prefix is not None:
        print("report: " + ", ".join(str(p) for p in reports.write(report, prefix)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer a benchmark (resumes an existing answers file), then score it")
    r.add_argument("benchmark", choices=BENCHMARKS)
    src = r.add_mutually_exclusive_group()
    src.add_argument("--questions", type=Path, help="Bunny-layout question JSONL (or .tar.gz); seed: SEED-Bench.json; "
                                                    "mmbench: the legacy TSV; vg/refcocog: COCO-style region JSON "
                                                    "(refcocog: or the refer toolkit's folder)")
    src.add_argument("--hf", help="lmms-lab parquet: a folder of .parquet files or a dataset id in the HF cache")
    r.add_argument("--split", help="--hf split (default: the benchmark's evaluation split); refcocog folder: val")
    r.add_argument("--images", type=Path, default=None, help="the image folder (--hf and mmbench write images there)")
    r.add_argument("--video-frames", action="store_true", help="seed: also the video questions (middle frames)")
    r.add_argument("--ocr", action="store_true", help="textvqa --hf: add the Reference OCR token line to prompts")
    r.add_argument("--detections", type=Path, help="coco-seg/lvis-seg: the detector's boxes (COCO results JSON)")
    r.add_argument("--concepts", help="lvis-cls/coco-cls: concept vocabulary (lvis_1203, coco_80, a .pkl); default: "
                                      "the dataset's official one, or a checkpoint folder's own")
    r.add_argument("--answers", type=Path, required=True, help="answers JSONL, appended to (resume)")
    add_model_options(r, checkpoint_alias=True)  # vg/refcocog: --checkpoint may name the TAP weights
    r.add_argument("--annotations", type=Path, help="score after the run (gqa, vqav2 val, textvqa)")
    r.add_argument("--choices", type=Path, help=CHOICES_HELP)
    r.add_argument("--likelihood", action="store_true",
                   help="seed/mmbench: answer with the most likely option letter instead of generating text")
    r.add_argument("--find", action="store_true",
                   help="ground each question's concepts in every instance TAP finds (counts, positions); off by "
                        "default so scores stay comparable with the paper's")
    r.add_argument("--limit", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (chat), the decoder's own (TAP)")
    r.add_argument("--num-shards", type=int, default=1)
    r.add_argument("--shard", type=int, default=0)
    r.add_argument("--rank-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="accelerate launch / torchrun: seconds a rank waits for the others before the run fails")
    r.add_argument("--report", type=Path, help="report prefix (default: next to the answers)")
    s = sub.add_parser("score", help="score an answers file with the benchmark's official rules (no model)")
    s.add_argument("benchmark", choices=BENCHMARKS)
    s.add_argument("answers", type=Path)
    s.add_argument("--annotations", type=Path, help="gqa: testdev_balanced_questions.json (or .tar.gz); vqav2: "
                                                     "v2_mscoco_val2014_annotations.json; textvqa: "
                                                     "TextVQA_0.5.1_val.json; seed: SEED-Bench.json; mmbench: the "
                                                     "legacy TSV; vg/refcocog: the region JSON")
    s.add_argument("--hf", help="take the annotations from lmms-lab parquet instead (folder or dataset id)")
    s.add_argument("--split")
    s.add_argument("--images", type=Path, help="--hf: where its images are (or get) written")
    s.add_argument("--lenient", action="store_true", help="lmms-eval's rules: seed: the output's first letter; "
                                                           "gqa: exact_match ignoring case and punctuation")
    s.add_argument("--strict", action="store_true", help="mmbench: exact letter (default: first letter)")
    s.add_argument("--partial", action="store_true", help="gqa: score only the answered questions (--limit runs)")
    s.add_argument("--spice", action="store_true", help="vg/refcocog: also SPICE (needs its Stanford models)")
    s.add_argument("--raw", action="store_true", help="vqav2: score the predictions as given (default: through the "
                   "EvalAI/m4c answer processor first, as LLaVA/Bunny do before upload)")
    s.add_argument("--submission", type=Path, help="vqav2 test-dev: EvalAI JSON; mmbench: OpenCompass .xlsx/.tsv")
    s.add_argument("--all-questions", type=Path, help="vqav2: every test question (unanswered ones get \"\")")
    s.add_argument("--choices", type=Path, help=CHOICES_HELP)
    s.add_argument("--report", type=Path, help="write PREFIX.json, PREFIX.md and PREFIX.png")
    m = sub.add_parser("merge", help="join shard answer files in order")
    m.add_argument("output", type=Path)
    m.add_argument("parts", type=Path, nargs="+")
    c = sub.add_parser("compare", help="compare two report JSONs of one benchmark")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.command == "run" and not (args.tiny or args.chat_checkpoint or args.tap_checkpoint or args.llm):
        r.error("name the model under test: --checkpoint (vg/refcocog: or --tap-checkpoint), --llm, or --tiny")

    try:
        if args.command == "merge":
            print(f"{merge(args.parts, args.output)} answers -> {args.output}")
        elif args.command == "compare":
            print(reports.compare(*(read_report(path) for path in (args.a, args.b))), end="")
        elif args.command == "score":
            score_command(args)
        else:
            run_command(args)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        refuse(exc.code)
    except (ValueError, OSError) as exc:  # a bad file, record or option, said by the code that read it
        refuse(str(exc))


def read_report(path: Path) -> dict[str, Any]:
    """A report JSON written by `run` or `score --report`; anything else is refused, naming the file."""
    with reading(path, "report JSON"):
        report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or "benchmark" not in report or not {"accuracy", "metrics"} & set(report):
        raise ValueError(f"{path}: not a report JSON (written by `python -m eval run`, or `score --report`)")
    return report


def refuse(message: str) -> NoReturn:
    """`error: MESSAGE` on stderr and exit code 2, as the project's other CLIs (and argparse) do, never a
    traceback. The SystemExit's text stays the message, for callers in the same process."""
    print(f"error: {message}", file=sys.stderr)
    done = SystemExit(message)
    done.code = 2
    raise done from None


def score_command(args: argparse.Namespace) -> None:
    if args.submission is not None:
        write = get(args.benchmark).submission
        if write is None:
            sys.exit(f"--submission is for {', '.join(n for n in BENCHMARKS if get(n).submission)}")
        try:
            print(write(args.answers, args.submission, annotations=args.annotations,
                        all_questions=args.all_questions))
        except ValueError as exc:
            sys.exit(str(exc))
        return
    if args.hf:
        with reading(args.hf, f"{args.benchmark} lmms-lab parquet"):
            annotations = load_lmms(args.benchmark, args.hf, args.images or Path("images"),
                                    split=args.split).annotations
    elif args.annotations:
        annotations = load_annotations(args.benchmark, args.annotations)
    else:
        sys.exit(f"{args.benchmark} needs --annotations FILE or --hf SOURCE (see --help); vqav2 test-dev has no "
                 "local answers: pass --submission OUT.json")
    bad: dict[str, str] = {}
    rows = getattr(get(args.benchmark), "read_results", read_answers)(args.answers, bad)
    if not rows:
        first = next(iter(bad.items()), None)
        sys.exit(f"{args.answers}: no answers to score" + (f" ({len(bad)} malformed records, first {first[0]}: "
                                                            f"{first[1]})" if first else ""))
    with reading(args.annotations or args.hf, f"{args.benchmark} annotations file"):  # fields the scorer reads late
        report = score(args.benchmark, rows, annotations, lenient=args.lenient, strict=args.strict,
                       partial=args.partial, spice=args.spice, raw=args.raw, choices=args.choices)
    note_skipped(report, args.answers, bad)
    report.update(model=rows[0].get("model_id") or args.answers.stem, answers=str(args.answers))
    report_and_print(report, args.report)


def note_skipped(report: dict[str, Any], answers: Path, bad: dict[str, str]) -> None:
    """Answer records that could not be scored (`bad` from reading, the scorer's `skipped`): listed on the
    console, counted in the report with the first few in its notes."""
    bad = {**bad, **report.pop("skipped", {})}
    if not bad:
        return
    print(f"{len(bad)} records of {answers} skipped:")
    for where, why in list(bad.items())[:10]:
        print(f"  {where}: {why}")
    first = "; ".join(f"{where}: {why}" for where, why in list(bad.items())[:3])
    report["notes"] = [*report.get("notes", []), f"{len(bad)} records of {answers} skipped ({first})"]
    report["skipped_records"] = len(bad)


@dataclass
class Answered:
    """What one process answered, and what scoring the run needs."""

    model_id: str
    questions: list[Question]  # every question of the run, not just this process's piece
    annotations: Any
    bad: dict[str, str]  # question id -> why it has no answer
    stats: RunStats


def answer_questions(args: argparse.Namespace, launch: Launch | None) -> Answered:
    """Answer this process's questions: all of them, `--shard` of `--num-shards`, or a launched rank's piece."""
    from .runner import run  # the engine and transformers, as in `answerer`
    try:
        questions, annotations, bad = load_data(args)
    except (DataMissing, FileNotFoundError, ValueError) as exc:
        sys.exit(str(exc))
    if args.limit:
        questions = questions[:args.limit]
    mine = shard(questions, args.num_shards, args.shard) if launch is None else launch.piece(questions)
    if args.max_new_tokens is None and not get(args.benchmark).TAP_ONLY:
        args.max_new_tokens = 128
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if launch and torch_cuda() else "auto"
    try:
        who = answerer(args, device, annotations)
    except (ValueError, OSError) as exc:  # TapError's are ValueError/OSError too: a wrong file, name or vocabulary
        sys.exit(f"{args.benchmark}: {exc}")
    try:
        stats = run(who, mine, args.images, launch.part if launch else args.answers, batch_size=args.batch_size,
                    progress=not launch or launch.rank == 0)
    except ConnectionError as exc:  # the LLM server went away: what was answered is saved
        sys.exit(f"{exc}\nthe answers so far are in {args.answers}; run the same command again to resume")
    bad.update(stats.bad)
    if launch:
        stats.already_done = launch.already
    return Answered(who.model_id, questions, annotations, bad, stats)


def run_command(args: argparse.Namespace) -> None:
    launch = Launch.from_env(args.answers, args.rank_timeout) if args.num_shards == 1 else None
    if launch is None:
        done = answer_questions(args, None)
    else:
        with launch:
            try:
                done = answer_questions(args, launch)
                status = RankStatus(launch.rank, done.stats.answered, done.bad)
            except (Exception, SystemExit) as exc:  # every rank hears of it and exits naming this one
                status = RankStatus.failed(launch, exc)
            statuses = launch.settle(status)
        if launch.rank:
            return
        done.stats.answered = sum(s.answered for s in statuses)
        for s in statuses:
            done.bad.update(s.bad)
    bad, questions = done.bad, done.questions
    print(f"{done.stats.answered} answered, {done.stats.already_done} already in {args.answers}, {len(bad)} bad "
          "records")
    for qid, why in list(bad.items())[:10]:
        print(f"  {qid}: {why}")
    if args.num_shards > 1:
        print("score the merged file: python -m eval merge OUT PARTS...; python -m eval score ...")
        return
    if done.annotations is None:
        return
    ids = {q.id for q in questions}
    rows = [row for row in read_answers(args.answers) if str(row["question_id"]) in ids]
    partial = len(load_answers(args.answers)) < len(questions) or bool(args.limit)
    with reading(args.annotations or args.questions or args.hf, f"{args.benchmark} annotations file"):
        report = score(args.benchmark, rows, done.annotations, partial=partial, asked=frozenset(ids),
                       choices=args.choices)
    note_skipped(report, args.answers, {})
    report.update(model=done.model_id, answers=str(args.answers), bad_records=len(bad))
    report_and_print(report, args.report or args.answers.with_name(args.answers.stem + ".report"))
