"""The published scorers' rules, quirks included, on cases worked out from the official code's behaviour:
the VQA evaluator (vqaEval.py), the EvalAI/m4c answer processor, m4c's TextVQA accuracy, Bunny's GQA rule and the
official GQA eval.py's validity, plausibility, consistency, distribution and step count."""

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


def op(operation: str, argument: str) -> dict[str, str]:
    return {"operation": operation, "argument": argument, "dependencies": []}


def gqa_question(text: str, answer: str, structural: str, detailed: str, program: list[dict], group: str | None,
                 entailed: list[str], balanced: bool = True) -> dict:
    """A question in the official `*_questions.json` layout (the fields the scorer reads)."""
    return {"question": text, "answer": answer, "isBalanced": balanced, "entailed": entailed,
            "types": {"structural": structural, "semantic": "attr", "detailed": detailed}, "semantic": program,
            "groups": {"global": group, "local": "x"}}


# Four balanced questions, two unbalanced ones that correct answers entail. q1 entails itself (the official script
# leaves a question out of its own entailed set); q4 is a "common" question, checked against color/material/shape
# whatever its choices say.
GQA_QUESTIONS = {
    "q1": gqa_question("Is there a red cup?", "yes", "verify", "existAttr",
                       [op("select", "cup (1)"), op("filter color", "red"), op("exist", "?")], None, ["e1", "q1"]),
    "q2": gqa_question("What color is the cup?", "red", "query", "queryAttr",
                       [op("select", "cup (1)"), op("query", "color")], "color", ["q1", "e2"]),
    "q3": gqa_question("What color is the plate?", "white", "query", "queryAttr",
                       [op("select", "plate (2)"), op("query", "color")], "color", []),
    "q4": gqa_question("What do the cup and the plate have in common?", "material", "compare", "twoCommon",
                       [op("select", "cup (1)"), op("select", "plate (2)"), op("common", "")], "common", ["e3"]),
    "e1": gqa_question("Is there a blue cup?", "no", "verify", "existAttr", [], None, [], balanced=False),
    "e2": gqa_question("Is the cup red or blue?", "red", "choose", "chooseAttr", [], None, [], balanced=False),
}
GQA_CHOICES = {"q1": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
               "q2": {"valid": ["red", "white", "blue"], "plausible": ["red", "white"]},
               "q3": {"valid": ["red", "white", "blue"], "plausible": ["white", "blue"]},
               "q4": {"valid": ["glass", "metal"], "plausible": ["glass"]}}
GQA_ANSWERS = {"q1": "Yes.", "q2": "red", "q3": "red", "q4": "glass", "e1": "no", "e2": "blue"}


def test_gqa_official_measures_worked_by_hand() -> None:
    from eval.gqa import score
    result = score(GQA_ANSWERS, GQA_QUESTIONS, choices=GQA_CHOICES)
    # accuracy over the balanced q1..q4: "yes" ok, "red" ok, "red" != "white", "glass" != "material" -> 2/4
    assert result["accuracy"] == 0.5 and result["scored"] == 4
    measures = result["measures"]
    # validity: yes in {yes, no}; red in q2's valid; red in q3's valid; q4 is "Common": glass not in
    # {color, material, shape} though its choices list it -> 3/4
    assert measures["validity"] == {"value": 0.75, "n": 4}
    # plausibility: yes ok; red in {red, white}; red not in {white, blue}; glass not in {color, material, shape}
    # -> 2/4
    assert measures["plausibility"] == {"value": 0.5, "n": 4}
    # consistency, over the correctly answered questions with entailed ones (itself excluded):
    # q1 -> [e1]: "no" == "no" -> 1;  q2 -> [q1, e2]: q1 right, "blue" != "red" -> 1/2;  q3, q4 wrong: not counted
    # -> (1 + 1/2) / 2 = 0.75 over 2 questions
    assert measures["consistency"] == {"value": 0.75, "n": 2}
    # distribution, per global group (q1 has none), chi-square of predicted vs gold counts over the gold answers:
    # color: gold {red: 1, white: 1}, predicted {red: 2}: (2-1)^2/1 + (0-1)^2/1 = 2, over 2 questions
    # common: gold {material: 1}, predicted {glass: 1}: (0-1)^2/1 = 1 (glass is no gold answer: adds nothing), 1 q.
    # weighted by group size: (2*2 + 1*1) / 3 = 5/3; the official score is that over 100 -> 0.01667
    assert measures["distribution"] == {"value": pytest.approx(5 / 3 / 100), "n": 3, "lower_is_better": True}
    # steps leave "exist" out: q1 select+filter (2), q2 and q3 select+query color (2), q4 select, select, common (3)
    assert result["breakdowns"]["steps"] == {"2": {"accuracy": pytest.approx(2 / 3), "n": 3},
                                             "3": {"accuracy": 0.0, "n": 1}}
    # every question a correct answer entails is there (q4's e3 is not, but q4 is wrong, so it is not asked)
    assert "notes" not in result


def test_gqa_measures_need_their_inputs_and_say_what_was_missing() -> None:
    from eval.gqa import score
    plain = score(GQA_ANSWERS, GQA_QUESTIONS)
    assert set(plain["measures"]) == {"consistency", "distribution"}  # no choices: no validity, no plausibility
    without_e2 = score({k: v for k, v in GQA_ANSWERS.items() if k != "e2"}, GQA_QUESTIONS)
    # q1 -> [e1] right: 1;  q2 -> [q1, e2]: e2 unanswered, so q1 alone: 1  -> 1.0, from 2 of the 3 entailed
    assert without_e2["measures"]["consistency"] == {"value": 1.0, "n": 2}
    assert without_e2["notes"][0].startswith("consistency over 2 of the 3 questions entailed by correct answers")
    bare = {q: {k: v for k, v in a.items() if k not in ("entailed", "groups")} for q, a in GQA_QUESTIONS.items()}
    assert "measures" not in score(GQA_ANSWERS, bare)
    with pytest.raises(ValueError, match="no entry for 1 of 4 scored questions"):
        score(GQA_ANSWERS, GQA_QUESTIONS, choices={k: v for k, v in GQA_CHOICES.items() if k != "q3"})


def test_gqa_choices_on_the_command_line(tmp_path: Path, capsys) -> None:
    from eval.scoring import score
    (tmp_path / "questions.json").write_text(json.dumps(GQA_QUESTIONS))
    (tmp_path / "choices.json").write_text(json.dumps(GQA_CHOICES))
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n"
                                                    for q, t in GQA_ANSWERS.items()))
    eval_main(["score", "gqa", str(tmp_path / "answers.jsonl"), "--annotations", str(tmp_path / "questions.json"),
               "--choices", str(tmp_path / "choices.json"), "--report", str(tmp_path / "report")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["measures"]["validity"]["value"] == 0.75 and report["measures"]["plausibility"]["value"] == 0.5
    table = capsys.readouterr().out
    assert "| validity | 75.00 | 4 |" in table and "| plausibility | 50.00 | 4 |" in table
    assert "| consistency | 75.00 | 2 |" in table and "| distribution (lower is better) | 0.0167 | 3 |" in table
    (tmp_path / "bad.json").write_text(json.dumps({"q1": ["yes"]}))
    with pytest.raises(ValueError, match="bad.json: not a GQA choices file"):
        score("gqa", [], GQA_QUESTIONS, choices=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="--choices is for gqa$"):
        score("vqav2", [], {}, choices=tmp_path / "choices.json")
