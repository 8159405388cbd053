"""The published scorers' rules, quirks included, on cases worked out from the official code's behaviour:
the VQA evaluator (vqaEval.py), the EvalAI/m4c answer processor, m4c's TextVQA accuracy and Bunny's GQA rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.cli import main as eval_main
from eval.normalize import m4c_accuracy, normalize_gqa, normalize_vqa, vqa_accuracy

MIXED = ["yes"] * 9 + ["no"]  # answers that differ: the evaluator normalises both sides


@pytest.mark.parametrize(("prediction", "answers", "expected"), [
    ("Yes", ["yes"] * 10, 0.0),  # identical answers: raw (stripped) strings, so case matters
    (" yes\n", ["yes"] * 10, 1.0),  # ... but \n and \t become spaces and both ends are stripped
    ("Yes", MIXED, 1.0),  # answers differ: lowercased, so it matches
    ("yes" + "." * 32, MIXED, 1.0),  # periods not before a digit are deleted ...
    ("yes" + "." * 33, MIXED, 0.0),  # ... but at most 32 of them (re.UNICODE passed as `count`)
    ("yes:", MIXED, 0.0),  # ":" is not among its 21 punctuation characters
    ("yes!", MIXED, 1.0),  # "!" is: it becomes a space, then the words are re-joined
    ("no", MIXED, pytest.approx(0.3)),  # one matching answer: 9 x (1/3) / 10 when left out ... and 0 for itself
    ("RED CAR", ["red car"] * 9 + ["red\x0bcar"], 1.0),  # \x0b is not made a space first, so the answers differ,
    ("RED CAR", ["red car"] * 10, 0.0),  # ... and normalisation runs; with truly identical answers it does not
    ("the two dogs", ["2 dogs"] * 5 + ["dogs"] * 5, 1.0),  # articles dropped, number words to digits
    ("somebodyd", ["somebody'd"] * 5 + ["x"] * 5, 1.0),  # its contraction table's own odd entry
    ("1,000", ["1000"] * 5 + ["x"] * 5, 1.0),  # digit,digit: every punctuation character is deleted
    ("3.5", ["3.5"] * 5 + ["x"] * 5, 1.0),  # a period before a digit stays
])
def test_official_vqa_accuracy(prediction: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(prediction, answers) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("Yes, it is.", "yes it is"), ("What's that?", "what 's that"), ("IM here", "im here"),  # "Im" never matches
    ("x-y", "x y"), ("x - y", "x y"), ("yes" + "." * 40, "yes" + "." * 8), ("Two\tcats", "2 cats"),
])
def test_m4c_answer_processor(raw: str, expected: str) -> None:
    assert normalize_vqa(raw) == expected


def test_m4c_textvqa_accuracy_normalises_both_sides_always() -> None:
    assert m4c_accuracy("Yes", ["yes"] * 10) == 1.0  # where the VQA evaluator would give 0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0


@pytest.mark.parametrize(("raw", "expected"), [
    ("Yes.", "yes"), ("yes..", "yes"), (" Yes ", "yes"), ("yes .", "yes "), ("A dog", "a dog"),
])
def test_gqa_rule(raw: str, expected: str) -> None:
    assert normalize_gqa(raw) == expected


def test_score_vqav2_says_which_rule_and_raw_skips_the_processor(tmp_path: Path, capsys) -> None:
    annotations = {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes"} for _ in range(10)]},
        {"question_id": 2, "answer_type": "number", "answers": [{"answer": "2"} for _ in range(10)]}]}
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    (tmp_path / "answers.jsonl").write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, "text": "two"}\n')
    eval_main(["score", "vqav2", str(tmp_path / "answers.jsonl"), "--annotations", str(tmp_path / "ann.json")])
    out = capsys.readouterr().out
    assert "**100.00**" in out and "EvalAI/m4c answer processor" in out
    eval_main(["score", "vqav2", str(tmp_path / "answers.jsonl"), "--annotations", str(tmp_path / "ann.json"),
               "--raw"])
    out = capsys.readouterr().out
    assert "**0.00**" in out and "as given (--raw)" in out
