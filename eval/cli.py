"""`python -m eval run|score|merge|compare`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .scoring import BENCHMARKS, CAPTIONS


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def vqav2_submission(answers: Path, output: Path, all_questions: Path | None) -> int:
    """EvalAI's format: every test question (unanswered ones get ""), answers normalised."""
    from .normalize import normalize_vqa
    from .questions import load_questions
    from .runner import load_answers
    predicted = load_answers(answers)
    ids = [q.raw_id for q in load_questions(all_questions)[0]] if all_questions else list(predicted)
    rows = [{"question_id": int(q), "answer": normalize_vqa(predicted.get(str(q), ""))} for q in ids]
    output.write_text(json.dumps(rows))
    return len(rows)


def mmbench_submission(answers: Path, tsv: Path, output: Path) -> int:
    """The OpenCompass upload: the TSV's rows without image/hint/category/source/comment/l2-category, plus
    `prediction` (the unrotated question's answer); .xlsx as Bunny writes it, or .tsv."""
    import pandas as pd

    from . import mmbench
    from .runner import load_answers
    predicted = load_answers(answers)
    drop = {"image", "hint", "category", "source", "comment", "l2-category"}
    rows = [{**{k: v for k, v in row.items() if k.lower() not in drop},
             "prediction": predicted.get(f"{row['index']}-0", "")} for row in mmbench.load(tsv)]
    frame = pd.DataFrame(rows)
    if output.suffix == ".xlsx":
        frame.to_excel(output, index=False, engine="openpyxl")
    else:
        frame.to_csv(output, sep="\t", index=False)
    return len(rows)


def load_data(args: argparse.Namespace) -> tuple[list, Any, dict[str, str]]:
    """(questions, annotations or None, bad records) from --hf (lmms-lab parquet) or the Bunny/official files."""
    from . import captioning, mmbench, seed
    from .questions import load_questions
    from .scoring import load_annotations
    if args.images is None and (args.hf or args.benchmark == "mmbench"):
        sys.exit(f"{args.benchmark}: pass --images DIR, where the images inside the data are written")
    if args.hf:
        if args.benchmark in CAPTIONS:
            sys.exit("region captioning reads COCO-style JSON (--questions), not parquet")
        from .lmms import load
        loaded = load(args.benchmark, args.hf, args.images, split=args.split, ocr=args.ocr)
        return loaded.questions, loaded.annotations, loaded.bad
    if args.questions is None:
        sys.exit(f"{args.benchmark}: pass --questions FILE (Bunny/official layout) or --hf SOURCE (lmms-lab parquet)")
    if args.benchmark in CAPTIONS:
        if args.questions.is_dir():
            return captioning.load_refer(args.questions, args.split or "val")
        return captioning.load(args.questions)
    if args.benchmark == "seed":
        bench = seed.load(args.questions)
        return seed.questions(bench, video_frames=args.video_frames), bench, {}
    if args.benchmark == "mmbench":
        rows = mmbench.load(args.questions)
        language = "cn" if "_CN" in args.questions.name.upper() else "en"
        return mmbench.questions(rows, args.images, language=language), rows, {}
    questions, bad = load_questions(args.questions)
    annotations = load_annotations(args.benchmark, args.annotations) if args.annotations else None
    return questions, annotations, bad


def answerer(args: argparse.Namespace, device: str):
    if args.benchmark in CAPTIONS:
        from tokenizer_tap.predictor import TapPredictor

        from .captioning import RegionCaptioner
        predictor = (TapPredictor.random("tap_tiny") if args.tiny
                     else TapPredictor.from_pretrained(args.tap_model, args.checkpoint, device=device))
        return RegionCaptioner(predictor, args.max_new_tokens, model_id=args.tap_model if not args.tiny else "tap_tiny")
    from assistant.engine import Assistant

    from .runner import ChatAnswerer
    bot = Assistant.tiny() if args.tiny else Assistant.from_pretrained(args.checkpoint, device=device)
    choices = ""
    if args.likelihood:
        if args.benchmark not in ("seed", "mmbench"):
            sys.exit("--likelihood is for the multiple-choice benchmarks (seed, mmbench)")
        choices = "ABCD" if args.benchmark == "seed" else "ABCDE"
    return ChatAnswerer(bot, args.max_new_tokens, choices)


def launched_shard(args: argparse.Namespace) -> tuple[int, int, Path]:
    """Under `accelerate launch` / `torchrun` (RANK, WORLD_SIZE set) each process answers one contiguous shard into
    its own file; returns (rank, world, final answers path) and points `args` at the shard."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    final = args.answers
    if world == 1 or args.num_shards > 1:
        return 0, 1, final
    rank = int(os.environ["RANK"])
    args.num_shards, args.shard = world, rank
    args.answers = shard_path(final, rank, world)
    args.answers.with_suffix(".done").unlink(missing_ok=True)
    return rank, world, final


def shard_path(final: Path, rank: int, world: int) -> Path:
    return final.with_name(f"{final.stem}.shard-{rank}-of-{world}.jsonl")


def wait_and_merge(final: Path, world: int, timeout_s: float = 7 * 24 * 3600) -> None:
    """Rank 0: wait for every shard's done-marker, then merge the shards in order into `final`."""
    from .runner import merge
    parts = [shard_path(final, r, world) for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not all(p.with_suffix(".done").exists() for p in parts):
        if time.monotonic() > deadline:
            sys.exit(f"gave up waiting for shards: {[str(p) for p in parts if not p.with_suffix('.done').exists()]}")
        time.sleep(2)
    print(f"{merge(parts, final)} answers merged in order -> {final}")


def report_and_print(report: dict[str, Any], prefix: Path | None) -> None:
    from . import report as reports
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
    r.add_argument("--answers", type=Path, required=True, help="answers JSONL, appended to (resume)")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="a TAP-Chat checkpoint folder (vg/refcocog: TAP weights or a TAP checkpoint "
                     "folder from tap-train)")
    who.add_argument("--tiny", action="store_true", help="tiny random models (tests, smoke runs)")
    r.add_argument("--tap-model", default="tap_vit_l", help="vg/refcocog: TAP architecture of --checkpoint")
    r.add_argument("--annotations", type=Path, help="score after the run (gqa, vqav2 val, textvqa)")
    r.add_argument("--likelihood", action="store_true",
                   help="seed/mmbench: answer with the most likely option letter instead of generating text")
    r.add_argument("--limit", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (chat), the decoder's own (TAP)")
    r.add_argument("--num-shards", type=int, default=1)
    r.add_argument("--shard", type=int, default=0)
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
    s.add_argument("--submission", type=Path, help="vqav2 test-dev: EvalAI JSON; mmbench: OpenCompass .xlsx/.tsv")
    s.add_argument("--all-questions", type=Path, help="vqav2: every test question (unanswered ones get \"\")")
    s.add_argument("--report", type=Path, help="write PREFIX.json, PREFIX.md and PREFIX.png")
    m = sub.add_parser("merge", help="join shard answer files in order")
    m.add_argument("output", type=Path)
    m.add_argument("parts", type=Path, nargs="+")
    c = sub.add_parser("compare", help="compare two report JSONs of one benchmark")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)

    if args.command == "merge":
        from .runner import merge
        print(f"{merge(args.parts, args.output)} answers -> {args.output}")
    elif args.command == "compare":
        from .report import compare
        print(compare(json.loads(args.a.read_text()), json.loads(args.b.read_text())), end="")
    elif args.command == "score":
        score_command(args)
    else:
        run_command(args)


def score_command(args: argparse.Namespace) -> None:
    from .scoring import load_annotations, read_answers, score
    if args.submission is not None:
        if args.benchmark == "vqav2":
            n = vqav2_submission(args.answers, args.submission, args.all_questions)
            print(f"{n} answers -> {args.submission} (upload to EvalAI, VQA challenge, test-dev phase)")
        elif args.benchmark == "mmbench" and args.annotations:
            n = mmbench_submission(args.answers, args.annotations, args.submission)
            print(f"{n} rows -> {args.submission} (upload to the OpenCompass MMBench server)")
        else:
            sys.exit("--submission is for vqav2 (test-dev) and mmbench (with --annotations TSV)")
        return
    if args.hf:
        from .lmms import load
        annotations = load(args.benchmark, args.hf, args.images or Path("images"), split=args.split).annotations
    elif args.annotations:
        annotations = load_annotations(args.benchmark, args.annotations)
    else:
        sys.exit(f"{args.benchmark} needs --annotations FILE or --hf SOURCE (see --help); vqav2 test-dev has no "
                 "local answers: pass --submission OUT.json")
    rows = read_answers(args.answers)
    try:
        report = score(args.benchmark, rows, annotations, lenient=args.lenient, strict=args.strict,
                       partial=args.partial, spice=args.spice)
    except ValueError as exc:
        sys.exit(str(exc))
    report.update(model=(rows[0].get("model_id") if rows else None) or args.answers.stem, answers=str(args.answers))
    report_and_print(report, args.report)


def run_command(args: argparse.Namespace) -> None:
    from .lmms import DataMissing
    from .runner import load_answers, run, shard
    from .scoring import read_answers, score
    rank, world, final = launched_shard(args)
    try:
        questions, annotations, bad = load_data(args)
    except (DataMissing, FileNotFoundError) as exc:
        sys.exit(str(exc))
    if args.limit:
        questions = questions[:args.limit]
    every = questions
    questions = shard(questions, args.num_shards, args.shard)
    if args.max_new_tokens is None and args.benchmark not in CAPTIONS:
        args.max_new_tokens = 128
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 and torch_cuda() else "auto"
    who = answerer(args, device)
    stats = run(who, questions, args.images, args.answers, batch_size=args.batch_size, progress=rank == 0)
    bad.update(stats.bad)
    print(f"{stats.answered} answered, {stats.already_done} already in {args.answers}, {len(bad)} bad records")
    for qid, why in list(bad.items())[:10]:
        print(f"  {qid}: {why}")
    if world > 1:
        args.answers.with_suffix(".done").touch()
        if rank:
            return
        wait_and_merge(final, world)
        args.answers, questions = final, every
    elif args.num_shards > 1:
        print("score the merged file: python -m eval merge OUT PARTS...; python -m eval score ...")
        return
    if annotations is None:
        return
    ids = {q.id for q in questions}
    rows = [row for row in read_answers(args.answers) if str(row["question_id"]) in ids]
    partial = len(load_answers(args.answers)) < len(questions) or bool(args.limit)
    try:
        if partial and args.benchmark == "mmbench":  # score the questions asked, not the whole TSV
            annotations = [row for row in annotations if f"{row['index']}-0" in ids]
        report = score(args.benchmark, rows, annotations, partial=partial)
    except ValueError as exc:
        sys.exit(str(exc))
    report.update(model=who.model_id, answers=str(args.answers), bad_records=len(bad))
    report_and_print(report, args.report or args.answers.with_name(args.answers.stem + ".report"))
