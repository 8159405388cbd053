"""`python -m eval run|score|merge`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHMARKS = ("gqa", "vqav2", "textvqa", "seed", "mmbench")


def _markdown(result: dict) -> str:
    lines = ["| group | category | accuracy | n |", "|---|---|---:|---:|",
             f"| overall | | {100 * result['accuracy']:.2f} | {result['scored']} |"]
    for group, rows in result["breakdowns"].items():
        for name, row in rows.items():
            lines.append(f"| {group} | {name} | {100 * row['accuracy']:.2f} | {row['n']} |")
    return "\n".join(lines)


def score_gqa(answers: Path, annotations: Path, partial: bool) -> dict:
    from .gqa import load_annotations, score
    from .runner import load_answers
    return score(load_answers(answers), load_annotations(annotations), partial=partial)


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer a benchmark's questions (resumes an existing answers file)")
    r.add_argument("benchmark", choices=BENCHMARKS)
    r.add_argument("--questions", type=Path, required=True,
                   help="Bunny-layout question JSONL (or .tar.gz); seed: SEED-Bench.json; mmbench: the legacy TSV")
    r.add_argument("--video-frames", action="store_true", help="seed: also the video questions (middle frames)")
    r.add_argument("--images", type=Path, default=None, help="the image folder the question paths are under")
    r.add_argument("--answers", type=Path, required=True, help="answers JSONL, appended to (resume)")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="a TAP-Chat checkpoint folder")
    who.add_argument("--tiny", action="store_true", help="tiny random models (tests, smoke runs)")
    r.add_argument("--limit", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--num-shards", type=int, default=1)
    r.add_argument("--shard", type=int, default=0)
    s = sub.add_parser("score", help="score an answers file with the benchmark's official rules (no model)")
    s.add_argument("benchmark", choices=BENCHMARKS)
    s.add_argument("answers", type=Path)
    s.add_argument("--annotations", type=Path, help="gqa: testdev_balanced_questions.json (or .tar.gz); "
                                                     "textvqa: TextVQA_0.5.1_val.json; seed: SEED-Bench.json; "
                                                     "mmbench: the legacy TSV")
    s.add_argument("--lenient", action="store_true", help="seed: first letter of the output (lmms-eval's rule)")
    s.add_argument("--strict", action="store_true", help="mmbench: exact letter (default: first letter)")
    s.add_argument("--partial", action="store_true", help="gqa: score only the answered questions (--limit runs)")
    s.add_argument("--submission", type=Path, help="vqav2: where to write the EvalAI upload JSON")
    s.add_argument("--all-questions", type=Path, help="vqav2: every test question (unanswered ones get \"\")")
    s.add_argument("--report", type=Path, help="also write the result as JSON and a Markdown table (.md)")
    m = sub.add_parser("merge", help="join shard answer files in order")
    m.add_argument("output", type=Path)
    m.add_argument("parts", type=Path, nargs="+")
    args = p.parse_args(argv)

    if args.command == "merge":
        from .runner import merge
        print(f"{merge(args.parts, args.output)} answers -> {args.output}")
        return
    if args.command == "score":
        if args.benchmark == "vqav2":
            if args.submission is None:
                sys.exit("vqav2 has no local answers: pass --submission OUT.json to write the EvalAI upload")
            n = vqav2_submission(args.answers, args.submission, args.all_questions)
            print(f"{n} answers -> {args.submission} (upload to EvalAI, VQA challenge, test-dev phase)")
            return
        if args.annotations is None:
            sys.exit(f"{args.benchmark} needs --annotations (see --help)")
        if args.benchmark in ("seed", "textvqa", "mmbench"):
            from . import mmbench, seed, textvqa
            from .runner import load_answers
            if args.benchmark == "mmbench":
                result = mmbench.score(load_answers(args.answers), mmbench.load(args.annotations),
                                       lenient=not args.strict)
            elif args.benchmark == "seed":
                result = seed.score(load_answers(args.answers), seed.load(args.annotations), lenient=args.lenient)
            else:
                rows = [json.loads(x) for x in args.answers.read_text().splitlines() if x.strip()]
                result = textvqa.score(rows, args.annotations)
            print(json.dumps(result, indent=2))
            if args.report:
                args.report.write_text(json.dumps(result, indent=2))
            return
        try:
            result = score_gqa(args.answers, args.annotations, args.partial)
        except ValueError as exc:
            sys.exit(str(exc))
        print(json.dumps({k: v for k, v in result.items() if k != "breakdowns"}))
        print(_markdown(result))
        if args.report:
            args.report.write_text(json.dumps(result, indent=2))
            args.report.with_suffix(".md").write_text(_markdown(result) + "\n")
        return

    from assistant.engine import Assistant

    from .questions import load_questions
    from .runner import run, shard
    if args.benchmark == "seed":
        from . import seed
        questions, bad = seed.questions(seed.load(args.questions), video_frames=args.video_frames), {}
    elif args.benchmark == "mmbench":
        from . import mmbench
        if args.images is None:
            sys.exit("mmbench needs --images DIR: the TSV's images are written there")
        language = "cn" if "_CN" in args.questions.name.upper() else "en"
        questions, bad = mmbench.questions(mmbench.load(args.questions), args.images, language=language), {}
    else:
        questions, bad = load_questions(args.questions)
    questions = shard(questions, args.num_shards, args.shard)
    if args.limit:
        questions = questions[:args.limit]
    bot = Assistant.tiny() if args.tiny else Assistant.from_pretrained(args.checkpoint)
    stats = run(bot, questions, args.images, args.answers, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens)
    bad.update(stats.bad)
    print(f"{stats.answered} answered, {stats.already_done} already in {args.answers}, {len(bad)} bad records")
    for qid, why in list(bad.items())[:10]:
        print(f"  {qid}: {why}")
