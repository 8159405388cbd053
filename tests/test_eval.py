"""The benchmark harness (first increment): normalisation, VQA accuracy, GQA scoring on the official file, the
real question files, resume after a kill, shard order, and an end-to-end run with tiny models."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.cli import main as eval_main
from eval.gqa import load_annotations, score
from eval.normalize import normalize_gqa, normalize_vqa, vqa_accuracy
from eval.questions import load_questions
from eval.runner import ChatAnswerer, answered_ids, merge, run, shard

BENCH = Path(__file__).resolve().parents[2] / "shared" / "reference" / "benchmarks"


@pytest.mark.parametrize(("raw", "expected"), [
    ("Two dogs.", "2 dogs"), ("the cat", "cat"), ("dont", "don't"), ("A man's hat", "man 's hat"),
    ("Yes!", "yes"), ("3.5", "3.5"), ("1,000", "1000"), ("red-white", "red white"), ("ten", "10"),
    ("  Left\tside ", "left side"), ("an apple", "apple"), ("None", "0"),
])
def test_vqa_normalisation(raw: str, expected: str) -> None:
    assert normalize_vqa(raw) == expected


def test_vqa_accuracy_hand_cases() -> None:
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # identical answers: the evaluator compares the raw strings
    assert vqa_accuracy(normalize_vqa("two"), ["2"] * 10) == 1.0  # after the m4c step LLaVA/Bunny run
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 1 + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_gqa_rule_is_strict() -> None:
    assert normalize_gqa("Yes.") == "yes" and normalize_gqa("A dog") == "a dog"


def test_gqa_scorer_on_the_full_official_file(reference) -> None:
    ann = load_annotations(reference(BENCH / "gqa" / "testdev_balanced_questions.tar.gz"))
    assert len(ann) == 12578
    oracle = score({q: a["answer"].capitalize() + "." for q, a in ann.items()}, ann)
    assert oracle["accuracy"] == 1.0 and oracle["balanced"] == 12578
    # the official measures the file has inputs for: consistency (over the entailed questions the balanced file
    # holds, which the note says) and distribution over the 7241 questions with a global group; no choices here
    assert oracle["measures"] == {"consistency": {"value": 1.0, "n": 3742},
                                  "distribution": {"value": 0.0, "n": 7241, "lower_is_better": True}}
    assert oracle["notes"][0].startswith("consistency over 4565 of the 59507 questions entailed")
    constant = score({q: "no" for q in ann}, ann)
    yes_no = constant["breakdowns"]["binary/open"]
    assert yes_no["open"]["accuracy"] == 0.0 and yes_no["binary"]["n"] + yes_no["open"]["n"] == 12578
    expected = sum(a["answer"] == "no" for a in ann.values()) / len(ann)
    assert constant["accuracy"] == pytest.approx(expected)
    assert constant["measures"]["distribution"]["value"] > 1  # every group's answers piled on "no"
    assert set(constant["breakdowns"]) == {"binary/open", "structural", "semantic", "steps", "length"}
    with pytest.raises(ValueError, match="no prediction"):
        score({}, ann)
    assert score({"201307251": "no"}, ann, partial=True)["scored"] == 1


@pytest.mark.parametrize(("name", "rows", "first"), [
    ("gqa/bunny_gqa_testdev_balanced.jsonl", 12578, "201307251"),
    ("textvqa/bunny_textvqa_val_v051_ocr.jsonl", 5000, None),
    ("vqav2/bunny_vqav2_mscoco_test-dev2015.tar.gz", 107394, None),
])
def test_real_question_files_load_as_they_are(reference, name: str, rows: int, first: str | None) -> None:
    questions, bad = load_questions(reference(BENCH / name))
    assert len(questions) == rows and not bad
    assert all(q.text.endswith("Answer the question using a single word or phrase.") for q in questions[:50])
    if first:
        assert questions[0].id == first and questions[0].image == "n161313.jpg"


@pytest.fixture
def tiny_gqa(tmp_path: Path) -> Path:
    """A tiny benchmark folder in the Bunny layout: 10 images, 12 questions (one bad), official-style answers."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows, ann = [], {}
    for i in range(12):
        image = f"n{i % 10}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / image)
        rows.append({"question_id": str(100 + i), "image": image,
                     "text": f"Is it red {i}?\nAnswer the question using a single word or phrase."})
        ann[str(100 + i)] = {"question": f"Is it red {i}?", "answer": "no", "isBalanced": True,
                             "types": {"structural": "verify", "semantic": "attr"}, "semantic": [{}, {}]}
    rows.append({"question_id": "bad", "image": "n0.jpg", "text": "  "})
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "annotations.json").write_text(json.dumps(ann))
    return tmp_path


def test_end_to_end_run_and_score_with_tiny_models(tiny_gqa: Path, capsys) -> None:
    answers = tiny_gqa / "answers.jsonl"
    eval_main(["run", "gqa", "--questions", str(tiny_gqa / "questions.jsonl"), "--images", str(tiny_gqa / "images"),
               "--answers", str(answers), "--tiny", "--batch-size", "4", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "12 answered, 0 already" in out and "1 bad records" in out and "bad: empty question" in out
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    assert sorted(x["question_id"] for x in lines) == [str(100 + i) for i in range(12)]  # grouped by image
    eval_main(["score", "gqa", str(answers), "--annotations", str(tiny_gqa / "annotations.json"),
               "--report", str(tiny_gqa / "report.json")])
    result = json.loads((tiny_gqa / "report.json").read_text())
    assert result["scored"] == 12 and 0 <= result["accuracy"] <= 1
    table = (tiny_gqa / "report.md").read_text()
    assert "| **ours, overall** |" in table and "| Bunny-v1.0-3B, testdev-balanced (published) | 62.5 |" in table
    assert "| structural | accuracy | n |" in table
    assert (tiny_gqa / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_run_resumes_without_recomputing_or_duplicating(tiny_gqa: Path, monkeypatch) -> None:
    from assistant.engine import Assistant
    questions, _ = load_questions(tiny_gqa / "questions.jsonl")
    bot = Assistant.tiny()
    whole = tiny_gqa / "whole.jsonl"
    run(ChatAnswerer(bot, 4), questions, tiny_gqa / "images", whole, batch_size=4, progress=False)
    killed = tiny_gqa / "killed.jsonl"
    calls = []
    real = bot.answer_batch

    def dies_after_two_batches(items, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(len(items))
        return real(items, *a, **k)

    monkeypatch.setattr(bot, "answer_batch", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run(ChatAnswerer(bot, 4), questions, tiny_gqa / "images", killed, batch_size=4, progress=False)
    with killed.open("a") as f:
        f.write('{"question_id": "1')  # a line torn by the kill
    assert len(answered_ids(killed)) == 8
    monkeypatch.setattr(bot, "answer_batch", real)
    stats = run(ChatAnswerer(bot, 4), questions, tiny_gqa / "images", killed, batch_size=4, progress=False)
    assert stats.answered == 4 and stats.already_done == 8

    def texts(path: Path) -> list[tuple[str, str]]:
        return [(x["question_id"], x["text"]) for x in map(json.loads, path.read_text().splitlines())]

    assert texts(killed) == texts(whole)


def test_shards_are_contiguous_and_merge_in_order(tiny_gqa: Path) -> None:
    questions, _ = load_questions(tiny_gqa / "questions.jsonl")
    parts = [shard(questions, 3, i) for i in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4] and sum(parts, []) == questions
    files = []
    for i, part in enumerate(parts):
        path = tiny_gqa / f"3_{i}.jsonl"
        path.write_text("".join(json.dumps({"question_id": q.raw_id, "text": "x"}) + "\n" for q in part))
        files.append(path)
    assert merge(files, tiny_gqa / "merged.jsonl") == 12
    merged = [json.loads(x)["question_id"] for x in (tiny_gqa / "merged.jsonl").read_text().splitlines()]
    assert merged == [q.raw_id for q in questions]
    with pytest.raises(ValueError):
        shard(questions, 3, 3)


def test_vqav2_submission_covers_every_question(tmp_path: Path) -> None:
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"question_id": i, "image": "x.jpg", "text": "q?"}) + "\n"
                                                for i in (5, 6, 7)))
    (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": 6, "text": "Two."}) + "\n")
    eval_main(["score", "vqav2", str(tmp_path / "answers.jsonl"), "--submission", str(tmp_path / "up.json"),
               "--all-questions", str(tmp_path / "all.jsonl")])
    assert json.loads((tmp_path / "up.json").read_text()) == [
        {"question_id": 5, "answer": ""}, {"question_id": 6, "answer": "2"}, {"question_id": 7, "answer": ""}]


def test_seed_prompts_and_official_and_lenient_scoring(tmp_path: Path) -> None:
    from eval import seed
    rng = np.random.default_rng(1)
    (tmp_path / "SEED-Bench-image").mkdir()
    bench = {"question_type": {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10},
             "questions": []}
    for i in range(6):
        qtype = [1, 5, 10][i % 3]
        kind = "video" if qtype == 10 else "image"
        bench["questions"].append({"question_id": f"q{i}", "question": f"What is {i}?", "choice_a": "cat",
                                   "choice_b": "dog", "choice_c": "cow", "choice_d": "hen", "answer": "B",
                                   "data_id": f"{i}.jpg", "data_type": kind, "question_type_id": qtype})
        if kind == "image":
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "SEED-Bench-image" /
                                                                                    f"{i}.jpg")
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(bench))
    qs = seed.questions(bench)
    assert len(qs) == 4 and qs[0].text == ("What is 0?\nA. cat\nB. dog\nC. cow\nD. hen\n"
                                           "Answer with the option's letter from the given choices directly.")
    assert qs[0].category == "Scene Understanding" and qs[0].image == "SEED-Bench-image/0.jpg"
    preds = {"q0": "B", "q1": "B. dog", "q3": " B ", "q4": "A", "q2": "B"}
    strict, lenient = seed.score(preds, bench), seed.score(preds, bench, lenient=True)
    assert strict["total"] == {"accuracy": 0.6, "n": 5} and lenient["total"]["accuracy"] == 0.8
    assert strict["image"]["n"] == 4 and strict["video"]["n"] == 1
    assert strict["Instances Counting"] == {"accuracy": 0.0, "n": 2}
    answers = tmp_path / "answers.jsonl"
    eval_main(["run", "seed", "--questions", str(tmp_path / "SEED-Bench.json"), "--images", str(tmp_path),
               "--answers", str(answers), "--tiny", "--max-new-tokens", "2"])
    assert len(answers.read_text().splitlines()) == 4


def test_textvqa_matches_by_image_and_question(tmp_path: Path) -> None:
    from eval import textvqa
    (tmp_path / "val.json").write_text(json.dumps({"data": [
        {"image_id": "img1", "question": "What brand?", "answers": ["dakota"] * 7 + ["kodak"] * 3},
        {"image_id": "img2", "question": "What number?", "answers": ["10"] * 10}]}))
    rows = [{"question_id": "img1", "prompt": "What brand?\nReference OCR token: DAKOTA\nAnswer briefly.",
             "text": "Dakota"},
            {"question_id": "img2", "prompt": "what number?\nAnswer briefly.", "text": "ten"},
            {"question_id": "img3", "prompt": "Other?", "text": "x"}]
    result = textvqa.score(rows, tmp_path / "val.json")
    assert result == {"accuracy": 1.0, "scored": 2, "unmatched": 1}


def test_mmbench_circular_prompts_and_scoring(tmp_path: Path) -> None:
    import base64
    import csv
    import io

    from eval import mmbench
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [["1", "What colour?", "nan", "red", "blue", "green", "pink", "A", "attribute", image],
            ["2", "How many?", "Count them.", "one", "two", "three", "", "C", "counting", image]]
    tsv = tmp_path / "MMBench_DEV_EN_legacy.tsv"
    with tsv.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    loaded = mmbench.load(tsv)
    qs = mmbench.questions(loaded, tmp_path / "images")
    assert [q.id for q in qs] == ["1-0", "1-1", "1-2", "1-3", "2-0", "2-1", "2-2"]  # 4 + 3 options
    assert qs[1].text == ("What colour?\nA. blue\nB. green\nC. pink\nD. red\n"
                          "Answer with the option's letter from the given choices directly.")
    assert qs[4].text.startswith("Count them.\nHow many?\nA. one\nB. two\nC. three\nAnswer")
    assert (tmp_path / "images" / "1.png").is_file()
    oracle = {f"{r['index']}-{k}": mmbench.rotated_answer(r, k) + "." for r in loaded for k in range(4)}
    assert mmbench.score(oracle, loaded)["circular"]["overall"]["accuracy"] == 1.0
    oracle["2-1"] = "A"  # one rotation wrong: question 2 fails circularly, its first rotation is still right
    result = mmbench.score(oracle, loaded)
    assert result["circular"]["overall"] == {"accuracy": 0.5, "n": 2} and result["first_rotation_accuracy"] == 1.0
    assert mmbench.score(oracle, loaded, lenient=False)["circular"]["overall"]["accuracy"] == 0.0  # "A." != "A"
    answers = tmp_path / "answers.jsonl"
    eval_main(["run", "mmbench", "--questions", str(tsv), "--images", str(tmp_path / "images"),
               "--answers", str(answers), "--tiny", "--max-new-tokens", "2"])
    assert len(answers.read_text().splitlines()) == 7


def launched_run(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """`eval run gqa` on the tiny folder under `accelerate launch`, two CPU ranks (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "-m", "eval", "run", "gqa", "--questions", str(folder / "questions.jsonl"),
           "--images", str(folder / "images"), "--answers", str(folder / "answers.jsonl"),
           "--annotations", str(folder / "annotations.json"), "--tiny", "--batch-size", "4", "--max-new-tokens", "2",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])


def test_accelerate_launch_shards_merges_in_order_and_scores(tiny_gqa: Path) -> None:
    # A part left by an earlier run, with an id this run does not ask and a wrong answer to one it does: never merged.
    (tiny_gqa / "answers.shard-1-of-2.jsonl").write_text(
        json.dumps({"question_id": "stale", "text": "x"}) + "\n" + json.dumps({"question_id": "111", "text": "STALE"}))
    done = launched_run(tiny_gqa)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "12 answers merged in order" in done.stdout and "12 answered, 0 already" in done.stdout
    rows = [json.loads(x) for x in (tiny_gqa / "answers.jsonl").read_text().splitlines()]
    merged = [r["question_id"] for r in rows]
    # rank 0's piece (the first six questions), then rank 1's; each piece grouped by image inside
    assert sorted(merged[:6]) == [str(i) for i in range(100, 106)]
    assert sorted(merged[6:]) == [str(i) for i in range(106, 112)]
    assert "STALE" not in {r["text"] for r in rows}
    assert not list(tiny_gqa.glob("*.shard-*")) and not list(tiny_gqa.glob("*.done"))
    assert json.loads((tiny_gqa / "answers.report.json").read_text())["scored"] == 12


def test_a_failing_rank_fails_every_rank_and_the_rerun_answers_only_the_rest(tiny_gqa: Path) -> None:
    blocker = tiny_gqa / "answers.shard-1-of-2.jsonl"
    blocker.mkdir()  # rank 1 cannot write its part: it fails, rank 0 answers its piece
    done = launched_run(tiny_gqa, "--rank-timeout", "60")
    assert done.returncode != 0
    assert "rank 1 of 2 failed: IsADirectoryError" in done.stderr, done.stderr[-3000:]
    assert not re.search(r'File "[^"]*/(eval|assistant|tokenizer_tap)/', done.stderr)  # only the launcher's traceback
    assert "6 answers merged in order" in done.stdout  # rank 0's piece is kept: the rerun resumes from it
    assert len((tiny_gqa / "answers.jsonl").read_text().splitlines()) == 6
    blocker.rmdir()
    again = launched_run(tiny_gqa)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "6 answered, 6 already" in again.stdout and "12 answers merged in order" in again.stdout
    assert json.loads((tiny_gqa / "answers.report.json").read_text())["scored"] == 12


HUNG_OR_REPORTING_RANK = """
import sys, time
from pathlib import Path
from eval.launch import Launch, RankStatus
launch = Launch.from_env(Path(sys.argv[1]), timeout_s=3)
with launch:
    if launch.rank == 1:
        time.sleep(60)  # hung: never reports
    launch.settle(RankStatus(launch.rank))
"""


def test_a_hung_rank_fails_the_others_after_the_timeout(tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", HUNG_OR_REPORTING_RANK, str(tmp_path / "answers.jsonl")],
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(r), "WORLD_SIZE": "2"},
                              cwd=Path(__file__).parents[1], stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        _, said = ranks[0].communicate(timeout=60)
        assert ranks[0].returncode == 1
        assert "rank 0 of 2: not every rank reported within 3 s; one hung or died" in said
        assert "Traceback" not in said and not (tmp_path / "answers.jsonl").exists()  # nothing merged
    finally:
        ranks[1].kill()
        ranks[1].communicate()


def test_gqa_lenient_is_lmms_evals_exact_match() -> None:
    from eval.normalize import normalize_exact_match
    ann = {"1": {"question": "q", "answer": "t-shirt", "isBalanced": True},
           "2": {"question": "q", "answer": "yes", "isBalanced": True}}
    preds = {"1": "T-shirt", "2": "Yes!"}
    assert score(preds, ann)["accuracy"] == 0.5  # official: "yes!" != "yes"
    assert score(preds, ann, lenient=True)["accuracy"] == 1.0
    assert normalize_exact_match(" The dog, running. ") == "the dog running"
