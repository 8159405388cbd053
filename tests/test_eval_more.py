"""eval: region captioning (metrics on known cases, end to end with tiny TAP), the lmms-lab parquet layout for every
benchmark end to end, VQAv2 val, reports, `compare` and the MMBench submission."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.captioning import score as caption_score
from eval.cli import main as eval_main

JAVA = shutil.which("java") is not None
REFS = {"1": ["a red car parked on the street"], "2": ["two dogs playing in the grass"],
        "3": ["a man riding a horse on the beach"]}


def png(colour: str, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- caption metrics
def test_caption_metrics_on_known_cases() -> None:
    perfect = caption_score({k: v[0] for k, v in REFS.items()}, REFS, meteor=False)["metrics"]
    # CIDEr-D of a caption equal to its only reference, with no n-gram shared across images: 10 per image (x100).
    assert perfect["CIDEr"] == pytest.approx(1000.0, abs=1e-6)
    assert perfect["BLEU-4"] == pytest.approx(100.0, abs=1e-4) and perfect["ROUGE-L"] == pytest.approx(100.0)
    disjoint = caption_score({"1": "zebra", "2": "violin", "3": "teapot"}, REFS, meteor=False)["metrics"]
    assert disjoint["CIDEr"] == 0.0 and disjoint["ROUGE-L"] == 0.0
    half = caption_score({"1": "a red car parked on the street", "2": "violin"}, REFS, meteor=False)
    assert half["scored"] == 2 and half["coverage"] == pytest.approx(2 / 3)


def require_java() -> None:
    """METEOR runs on Java: without it the test skips on a user's machine, and fails in CI (TAP_REQUIRE_JAVA=1,
    set by .ci/run, which installs Java)."""
    if JAVA:
        return
    if os.environ.get("TAP_REQUIRE_JAVA") == "1":
        pytest.fail("METEOR is required (TAP_REQUIRE_JAVA=1) but `java` is missing (apt-get install default-jre)")
    pytest.skip("METEOR runs on Java (.ci/run installs it)")


def test_meteor_rewards_the_right_caption() -> None:
    require_java()
    good = caption_score({k: v[0] for k, v in REFS.items()}, REFS)["metrics"]["METEOR"]
    bad = caption_score({"1": "a blue bicycle", "2": "a cat sleeping", "3": "a plate of food"}, REFS)
    assert good > 90 and bad["metrics"]["METEOR"] < 30 and not bad["notes"]


@pytest.fixture()
def regions(tmp_path: Path) -> Path:
    """A VG/GRiT-style test.json: 2 images, 4 regions (one with a second reference), one broken record."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "bbox": [5, 5, 30, 20], "caption": "a red square"},
                            {"id": 11, "image_id": 1, "bbox": [40, 10, 45, 55], "caption": "edge of the frame",
                             "captions": ["edge of the frame", "the right side"]},
                            {"id": 12, "image_id": 2, "bbox": [0, 0, 80, 60], "caption": "the whole picture"},
                            {"id": 13, "image_id": 2, "bbox": [10, 10, 5, 5], "caption": "a small patch"},
                            {"id": 14, "image_id": 2, "caption": "no box"}]}
    (tmp_path / "test.json").write_text(json.dumps(data))
    return tmp_path


def test_region_captioning_runs_resumes_and_reports(regions: Path, capsys) -> None:
    answers = regions / "vg.jsonl"
    argv = ["run", "vg", "--questions", str(regions / "test.json"), "--images", str(regions / "images"),
            "--answers", str(answers), "--tiny", "--max-new-tokens", "5", "--batch-size", "3"]
    eval_main(argv)
    out = capsys.readouterr().out
    assert "4 answered, 0 already" in out and "1 bad records" in out and "14: no usable bbox" in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted(r["question_id"] for r in rows) == [10, 11, 12, 13] and all(r["model_id"] == "tap_tiny" for r in rows)
    report = json.loads((regions / "vg.report.json").read_text())
    assert report["scored"] == 4 and {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(report["metrics"])
    assert ("METEOR" in report["metrics"]) == JAVA
    table = (regions / "vg.report.md").read_text()
    assert "| TAP-L v1.1 (published) |" in table and "154.7" in table
    assert (regions / "vg.report.png").is_file()
    eval_main(argv)  # resumed: nothing recomputed
    assert "0 answered, 4 already" in capsys.readouterr().out
    assert len(answers.read_text().splitlines()) == 4


# -------------------------------------------------------------------------------------- lmms-lab parquet layout
def parquet(folder: Path, rows: dict[str, list], name: str = "test-00000-of-00001.parquet") -> None:
    """Write rows as lmms-lab does: images as `Image` features (bytes inside), SEED's as a list of them."""
    from datasets import Dataset, List
    from datasets import Image as HFImage
    ds = Dataset.from_dict(rows)
    if "image" in rows:
        ds = ds.cast_column("image", List(HFImage()) if isinstance(rows["image"][0], list) else HFImage())
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / name))


def image_cell(colour: str) -> dict:
    return {"bytes": png(colour), "path": None}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    """Tiny lmms-lab-style parquet folders for the five benchmarks."""
    root = tmp_path_factory.mktemp("hf")
    types = [{"structural": "verify", "semantic": "attr", "detailed": "x"},
             {"structural": "query", "semantic": "obj", "detailed": "y"}]
    parquet(root / "GQA" / "testdev_balanced_instructions",
            {"id": ["201", "202", "203"], "imageId": ["n1", "n1", "n2"],
             "question": ["Is it red?", "What is it?", "Is it blue?"], "answer": ["yes", "car", "no"],
             "isBalanced": [True, True, True], "types": [types[0], types[1], types[0]],
             "semantic": [[{"operation": "select"}], [{"operation": "select"}, {"operation": "query"}],
                          [{"operation": "select"}]]}, "testdev-00000-of-00001.parquet")
    parquet(root / "GQA" / "testdev_balanced_images",
            {"id": ["n1", "n2"], "image": [image_cell("red"), image_cell("blue")]}, "testdev-00000-of-00001.parquet")
    answers = [[{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(10)],
               [{"answer": "2", "answer_confidence": "yes", "answer_id": i} for i in range(10)]]
    parquet(root / "VQAv2", {"question_id": [301, 302], "question": ["Is it red?", "How many?"],
                             "image_id": [1, 2], "answers": answers, "answer_type": ["yes/no", "number"],
                             "image": [image_cell("red"), image_cell("green")]}, "validation-00000-of-00001.parquet")
    parquet(root / "textvqa", {"question_id": [401], "question": ["what brand is it?"], "image_id": ["t1"],
                               "answers": [["kodak"] * 10], "ocr_tokens": [["KODAK"]],
                               "image": [image_cell("yellow")]}, "validation-00000-of-00001.parquet")
    parquet(root / "SEED-Bench", {"question_id": ["501", "502"], "question": ["What?", "Who?"],
                                  "choice_a": ["a", "b"], "choice_b": ["c", "d"], "choice_c": ["e", "f"],
                                  "choice_d": ["g", "h"], "answer": ["A", "B"], "data_type": ["image", "video"],
                                  "data_id": ["x.jpg", "v.mp4"], "question_type_id": [1, 10],
                                  "segment": [None, [0, 1]],
                                  "image": [[image_cell("red")], [image_cell("red"), image_cell("blue")]]})
    parquet(root / "MMBench" / "en", {"index": [7], "question": ["Which colour?"], "hint": [None],
                                      "A": ["red"], "B": ["blue"], "C": ["green"], "D": [None], "answer": ["A"],
                                      "category": ["attribute"], "L2-category": ["x"], "source": ["s"],
                                      "split": ["dev"], "image": [image_cell("red")]}, "dev-00000-of-00001.parquet")
    return root


@pytest.mark.parametrize(("name", "folder", "answered"), [
    ("gqa", "GQA", 3), ("vqav2", "VQAv2", 2), ("textvqa", "textvqa", 1), ("seed", "SEED-Bench", 2),
    ("mmbench", "MMBench", 3)])
def test_every_benchmark_runs_from_lmms_lab_parquet(hf: Path, tmp_path: Path, name: str, folder: str,
                                                     answered: int, capsys) -> None:
    answers = tmp_path / "answers.jsonl"
    eval_main(["run", name, "--hf", str(hf / folder), "--images", str(tmp_path / "images"),
               "--answers", str(answers), "--tiny", "--max-new-tokens", "2", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert f"{answered} answered, 0 already" in out, out
    report = json.loads((tmp_path / "answers.report.json").read_text())
    assert report["benchmark"] == name and report["scored"] > 0 and 0 <= report["accuracy"] <= 1
    # The same answers scored from the command line, annotations from the parquet: the same numbers.
    eval_main(["score", name, str(answers), "--hf", str(hf / folder), "--images", str(tmp_path / "images"),
               "--report", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["accuracy"] == report["accuracy"] and again.get("breakdowns") == report.get("breakdowns")


def test_missing_data_says_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="huggingface-cli download lmms-lab/GQA"):
        eval_main(["run", "gqa", "--hf", "lmms-lab/GQA", "--images", str(tmp_path), "--answers",
                   str(tmp_path / "a.jsonl"), "--tiny"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .parquet files"):
        eval_main(["run", "gqa", "--hf", str(tmp_path / "empty"), "--images", str(tmp_path), "--answers",
                   str(tmp_path / "a.jsonl"), "--tiny"])


# ------------------------------------------------------------------------------ VQAv2 val, reports, submissions
def test_vqav2_val_scores_locally_by_answer_type(tmp_path: Path) -> None:
    ann = {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answer_type": "number", "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8},
        {"question_id": 3, "answer_type": "other", "answers": [{"answer": "red"}] * 10}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    rows = [{"question_id": 1, "text": "Yes."}, {"question_id": 2, "text": "two"}, {"question_id": 3, "text": "blue"}]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_main(["score", "vqav2", str(tmp_path / "answers.jsonl"), "--annotations", str(tmp_path / "ann.json"),
               "--report", str(tmp_path / "r")])
    report = json.loads((tmp_path / "r.json").read_text())
    # "2" is given by 2 of 10 annotators: leaving out one of those two leaves 1 match (1/3), one of the others 2 (2/3)
    two = (2 * (1 / 3) + 8 * (2 / 3)) / 10
    assert report["breakdowns"]["answer type"]["number"]["accuracy"] == pytest.approx(two)
    assert report["accuracy"] == pytest.approx((1 + two + 0) / 3)


def test_compare_two_reports(tmp_path: Path, capsys) -> None:
    a = {"benchmark": "gqa", "model": "base", "accuracy": 0.5, "scored": 4,
         "breakdowns": {"structural": {"verify": {"accuracy": 0.5, "n": 2}, "query": {"accuracy": 0.5, "n": 2}}}}
    b = {**a, "model": "tuned", "accuracy": 0.75,
         "breakdowns": {"structural": {"verify": {"accuracy": 1.0, "n": 2}, "query": {"accuracy": 0.5, "n": 2}}}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    eval_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "| overall | 50.00 | 75.00 | 25.00 |" in out and "| structural: verify | 50.00 | 100.00 | 50.00 |" in out
    (tmp_path / "c.json").write_text(json.dumps({**a, "benchmark": "seed"}))
    with pytest.raises(SystemExit, match="cannot compare gqa with seed") as refused:
        eval_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    assert refused.value.code == 2 and capsys.readouterr().err == "error: cannot compare gqa with seed\n"


def test_mmbench_submission_xlsx_and_tsv(hf: Path, tmp_path: Path) -> None:
    import base64
    import csv

    import pandas as pd
    tsv = tmp_path / "MMBench_TEST_EN_legacy.tsv"
    with tsv.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "answer", "category", "source", "l2-category", "image"])
        w.writerow(["3", "Q?", "h", "x", "y", "", "cat", "src", "l2", base64.b64encode(png("red")).decode()])
    (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": "3-0", "text": "B"}) + "\n" +
                                            json.dumps({"question_id": "3-1", "text": "A"}) + "\n")
    for name in ("up.xlsx", "up.tsv"):
        eval_main(["score", "mmbench", str(tmp_path / "answers.jsonl"), "--annotations", str(tsv),
                   "--submission", str(tmp_path / name)])
    frame = pd.read_excel(tmp_path / "up.xlsx")
    assert list(frame.columns) == ["index", "question", "A", "B", "answer", "prediction"]
    assert frame.loc[0, "prediction"] == "B"
    assert pd.read_csv(tmp_path / "up.tsv", sep="\t").loc[0, "prediction"] == "B"


def test_likelihood_choice_answers_with_one_letter(hf: Path, tmp_path: Path) -> None:
    from assistant.engine import Assistant
    from eval.runner import letter_tokens
    bot = Assistant.tiny()
    allowed = letter_tokens(bot, "ABCD")
    assert {bot.chat.tokenizer.decode([t]).strip() for t in allowed} == set("ABCD")
    answers = tmp_path / "answers.jsonl"
    eval_main(["run", "seed", "--hf", str(hf / "SEED-Bench"), "--images", str(tmp_path / "images"),
               "--answers", str(answers), "--tiny", "--likelihood"])
    texts = [json.loads(line)["text"] for line in answers.read_text().splitlines()]
    assert len(texts) == 2 and all(t in {"A", "B", "C", "D"} for t in texts)


def test_refcocog_in_the_refer_toolkit_layout(regions: Path, capsys) -> None:
    import pickle
    folder = regions / "refcocog"
    folder.mkdir()
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 100, "image_id": 1, "bbox": [5, 5, 30, 20]},
                        {"id": 101, "image_id": 2, "bbox": [10, 10, 40, 30]}]}))
    refs = [{"ref_id": 7, "ann_id": 100, "image_id": 1, "split": "val",
             "sentences": [{"raw": "The red box on the left.", "sent": "the red box on the left"},
                           {"raw": "left square", "sent": "left square"}]},
            {"ref_id": 8, "ann_id": 101, "image_id": 2, "split": "train", "sentences": [{"raw": "x", "sent": "x"}]}]
    (folder / "refs(umd).p").write_bytes(pickle.dumps(refs))
    answers = regions / "refcocog.jsonl"
    eval_main(["run", "refcocog", "--questions", str(folder), "--images", str(regions / "images"), "--answers",
               str(answers), "--tiny", "--max-new-tokens", "4"])
    assert "1 answered" in capsys.readouterr().out  # the val ref only
    report = json.loads((regions / "refcocog.report.json").read_text())
    assert report["scored"] == 1 and "CIDEr" in report["metrics"]
    evil = folder / "evil"
    evil.mkdir()
    (evil / "instances.json").write_text("{}")
    (evil / "refs(umd).p").write_bytes(pickle.dumps(print))  # a callable: refused, never run
    from eval.captioning import load_refer
    with pytest.raises(pickle.UnpicklingError, match="not plain data"):
        load_refer(evil)


def test_spice_is_skipped_with_a_note_when_it_cannot_run(monkeypatch) -> None:
    """SPICE fetches Stanford CoreNLP (~400 MB) on first use; offline, as here and in CI, that fails. The fetch is
    made to fail the way it does offline, so the outcome does not depend on the machine: no SPICE, one note, and
    every other metric still there."""
    from urllib.error import URLError

    import pycocoevalcap.spice.spice as spice

    def offline() -> None:
        raise URLError("no network")
    monkeypatch.setattr(spice, "get_stanford_models", offline)
    result = caption_score({"1": "a red car"}, REFS, meteor=False, spice=True)
    assert "SPICE" not in result["metrics"] and {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(result["metrics"])
    assert [n for n in result["notes"] if "SPICE" in n] == ["SPICE skipped: URLError: <urlopen error no network>"]


def test_textvqa_ocr_prompt_option(hf: Path, tmp_path: Path) -> None:
    from eval.benchmarks import load_lmms
    plain = load_lmms("textvqa", hf / "textvqa", tmp_path).questions[0].text
    ocr = load_lmms("textvqa", hf / "textvqa", tmp_path, ocr=True).questions[0].text
    assert plain == "What brand is it?\nAnswer the question using a single word or phrase."
    assert ocr == "What brand is it?\nReference OCR token: KODAK\nAnswer the question using a single word or phrase."


def test_vqav2_and_textvqa_run_in_the_bunny_layout(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    for name, colour in (("1.jpg", "red"), ("t1.jpg", "yellow")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "images" / name)
    suffix = "\nAnswer the question using a single word or phrase."
    (tmp_path / "vqav2.jsonl").write_text(json.dumps({"question_id": 11, "image": "1.jpg",
                                                      "text": "Is it red?" + suffix}) + "\n")
    (tmp_path / "vqav2_ann.json").write_text(json.dumps({"annotations": [
        {"question_id": 11, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10}]}))
    (tmp_path / "textvqa.jsonl").write_text(json.dumps({"question_id": "t1", "image": "t1.jpg",
                                                        "text": "What brand?\nReference OCR token: KODAK" + suffix}))
    (tmp_path / "textvqa_ann.json").write_text(json.dumps({"data": [
        {"image_id": "t1", "question": "What brand?", "answers": ["kodak"] * 10}]}))
    for name in ("vqav2", "textvqa"):
        eval_main(["run", name, "--questions", str(tmp_path / f"{name}.jsonl"), "--images", str(tmp_path / "images"),
                   "--answers", str(tmp_path / f"{name}_answers.jsonl"), "--annotations",
                   str(tmp_path / f"{name}_ann.json"), "--tiny", "--max-new-tokens", "2"])
        assert "1 answered" in capsys.readouterr().out
        assert json.loads((tmp_path / f"{name}_answers.report.json").read_text())["scored"] == 1


def test_short_answer_sets_run_and_score_per_kind(tmp_path: Path, capsys) -> None:
    from eval import short_answer
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    items = [{"id": f"q{i}", "image": "red.png", "kind": kind, "question": q, "answer": a}
             for i, (kind, q, a) in enumerate([("colour", "What colour is it?", "red"),
                                               ("count", "How many shapes?", "one"),
                                               ("colour", "And the border?", "Red.")])]
    questions = tmp_path / "eval.json"
    questions.write_text(json.dumps(items))
    annotations = short_answer.load_annotations(questions)
    report = short_answer.score({"q0": "Red.", "q1": "two", "q2": "red"}, annotations)  # exact_match: case, "."
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["breakdowns"]["kind"] == {"colour": {"accuracy": 1.0, "n": 2}, "count": {"accuracy": 0.0, "n": 1}}
    with pytest.raises(ValueError, match="1 of 3 questions have no answer"):
        short_answer.score({"q0": "red", "q1": "one"}, annotations)
    answers = tmp_path / "answers.jsonl"
    eval_main(["run", "short-answer", "--questions", str(questions), "--images", str(tmp_path),
               "--answers", str(answers), "--tiny", "--max-new-tokens", "3", "--report", str(tmp_path / "r.json")])
    assert "3 answered" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["benchmark"] == "short-answer" and result["scored"] == 3
    assert set(result["breakdowns"]["kind"]) == {"colour", "count"}
