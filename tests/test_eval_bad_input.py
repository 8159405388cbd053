"""Bad input to `python -m eval run` and `score`, as a user meets it: each case of a corpus of broken files is run
through the real command line under a memory ceiling, and must end with one plain message naming the file and what
is wrong (exit code 2, no traceback), or, for a bad record among good ones, skip and list it and still use the good
records around it."""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

ROOT = Path(__file__).resolve().parents[1]
# Address space a command may take. Measured (VmPeak, 2 threads): `score` 0.66 GB (torch and the evaluators
# imported), a `run` refused while reading its files 0.79 GB, a whole tiny chat-model run 1.26 GB and a tiny TAP run
# 1.06 GB. A reader that decoded a declared size, or copied a file, without bound would hit it (a 100000 x 100000
# mask alone is 10 GB). Threads and malloc arenas are capped so the figure does not grow with the machine's cores.
CEILING = 4 << 30
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2"}


def write_corpus(d: Path) -> None:
    """Good files and broken ones, side by side, for the cases below."""
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (48, 40), "red").save(d / "images" / "red.png")
    Image.new("RGB", (40, 56), "blue").save(d / "images" / "blue.png")
    suffix = "\nAnswer the question using a single word or phrase."
    good = [{"question_id": 1, "image": "red.png", "text": "Is it red?" + suffix},
            {"question_id": 3, "image": "blue.png", "text": "Is it blue?" + suffix}]
    lines = [json.dumps(good[0]), '{"question_id": 2, "image": "red.png", "text": ', json.dumps(good[1]),
             json.dumps({"question_id": 4, "image": "gone.png", "text": "Is it there?" + suffix})]
    (d / "mixed.jsonl").write_text("\n".join(lines) + "\n")  # a torn line and a missing image among good ones
    (d / "binary.jsonl").write_bytes(bytes(range(128, 256)) * 4)
    (d / "object.jsonl").write_text(json.dumps({"questions": good}, indent=2))
    (d / "broken.tar.gz").write_bytes(gzip.compress(b"not a tar archive at all" * 40)[:200])
    (d / "vqa_ann.json").write_text(json.dumps({"annotations": [
        {"question_id": q, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10} for q in (1, 2, 3, 4)]}))
    (d / "vqa_ann_no_answers.json").write_text(json.dumps({"annotations": [{"question_id": 1}]}))
    (d / "not_json.json").write_text("question_id,answer\n1,yes\n")
    answers = [json.dumps({"question_id": q, "text": "yes"}) for q in (1, 3)]
    (d / "answers_mixed.jsonl").write_text("\n".join([answers[0], "{torn", answers[1], '{"text": "no id"}']) + "\n")
    (d / "answers_garbage.jsonl").write_text("hello\nworld\n")
    (d / "seed_no_types.json").write_text(json.dumps({"questions": [{"question_id": 1, "answer": "A"}]}))
    write_instances(d)


def write_instances(d: Path) -> None:
    """A COCO instances file over two non-square images with two boxes each, detections and results for it, and
    copies with one thing wrong."""
    images, annotations = [], []
    for image_id, (width, height) in ((1, (64, 40)), (2, (40, 64))):
        Image.new("RGB", (width, height), "gray").save(d / "images" / f"scene{image_id}.png")
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"scene{image_id}.png"})
        for x, y, w, h in ((4, 4, 20, 16), (24, 20, 12, 16)):
            mask = np.zeros((height, width), np.uint8)
            mask[y:y + h, x:x + w] = 1
            encoded = coco_mask.encode(np.asfortranarray(mask))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 5 + image_id,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": {"size": [height, width], "counts": encoded["counts"].decode()}})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 6, "name": "square"}, {"id": 7, "name": "oblong"}]}
    (d / "instances.json").write_text(json.dumps(data))
    no_bbox = json.loads(json.dumps(data))
    del no_bbox["annotations"][1]["bbox"]
    (d / "instances_no_bbox.json").write_text(json.dumps(no_bbox))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
                "segmentation": a["segmentation"]} for a in annotations]
    (d / "results.json").write_text(json.dumps(perfect))
    (d / "results_unknown_image.json").write_text(json.dumps(perfect + [{**perfect[0], "image_id": 99}]))
    (d / "results_no_image_id.json").write_text(json.dumps(
        perfect[:2] + [{k: v for k, v in perfect[2].items() if k != "image_id"}] + perfect[2:]))
    (d / "results_only_unknown.json").write_text(json.dumps([{**p, "image_id": 99} for p in perfect]))
    swapped = {**perfect[0], "segmentation": {**perfect[0]["segmentation"], "size": [64, 40]}}
    (d / "results_swapped_mask.json").write_text(json.dumps(perfect + [swapped]))
    huge = {**perfect[2], "segmentation": {"size": [100000, 100000], "counts": "0" + "1" * 20}}
    (d / "results_huge_mask.json").write_text(json.dumps(perfect + [huge]))
    (d / "results_object.json").write_text(json.dumps({"annotations": perfect}))
    (d / "dets_mixed.json").write_text(json.dumps(
        [perfect[0], {k: v for k, v in perfect[1].items() if k != "image_id"}, {**perfect[1], "image_id": 99},
         perfect[2]]))  # images 1 and 2 keep a good box each


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def answered(out: Path, ids: list[int]) -> bool:
    """The good records around the bad ones were answered, and only they."""
    got = sorted(json.loads(line)["question_id"] for line in (out / "a.jsonl").read_text().splitlines())
    assert got == ids
    return True


def scored(path: Path, n: int) -> bool:
    assert report(path)["scored"] == n
    return True


def perfect_ap(path: Path) -> bool:
    """The good detections (exact boxes and masks) were all scored."""
    assert report(path)["metrics"]["AP"] == pytest.approx(100)
    return True


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (`{d}` the corpus, `{o}` this case's output folder), the exit code, a
    regex the message must match (stderr for a refusal, stdout when the run goes on), and what must hold of the
    good records around the bad one."""

    name: str
    argv: str
    code: int
    message: str
    then: Callable[[Path], None] | None = None


RUN_VQA = "run vqav2 --images {d}/images --answers {o}/a.jsonl --tiny --max-new-tokens 2"
RUN_SEG = "run coco-seg --questions {d}/instances.json --images {d}/images --answers {o}/a.jsonl --tiny"
SCORE_SEG = "score coco-seg {d}/%s --annotations {d}/instances.json --report {o}/r"
CASES = [
    Case("run: questions file missing", RUN_VQA + " --questions {d}/nowhere.jsonl", 2,
         r"/nowhere\.jsonl: no such file or directory \(question JSONL\)"),
    Case("run: questions not text", RUN_VQA + " --questions {d}/binary.jsonl", 2,
         r"/binary\.jsonl: not a valid question JSONL: not UTF-8 text"),
    Case("run: questions without one record", RUN_VQA + " --questions {d}/object.jsonl", 2,
         r"/object\.jsonl: no question records \(\d+ bad, first: line 1: not a question record"),
    Case("run: questions archive broken", RUN_VQA + " --questions {d}/broken.tar.gz", 2,
         r"/broken\.tar\.gz: not a readable archive \(question JSONL\)"),
    Case("run: annotations missing", RUN_VQA + " --questions {d}/mixed.jsonl --annotations {d}/none.json", 2,
         r"/none\.json: no such file or directory \(annotations file\)"),
    Case("run: annotations of another shape", RUN_VQA + " --questions {d}/mixed.jsonl --annotations "
         "{d}/vqa_ann_no_answers.json", 2, r"/vqa_ann_no_answers\.json: not a valid annotations file: a record has no "
         r"'answers' field"),
    Case("run: a torn line and a missing image among good questions",
         RUN_VQA + " --questions {d}/mixed.jsonl --annotations {d}/vqa_ann.json", 0,
         r"2 answered, 0 already in .*, 2 bad records\n  line 2: not a question record \(JSONDecodeError\)\n"
         r"  4: .*gone\.png",
         lambda o: answered(o, [1, 3]) and scored(o / "a.report.json", 2)),
    Case("run: instances file with an annotation without bbox", RUN_SEG.replace("instances.json",
         "instances_no_bbox.json") + " --detections {d}/results.json", 2,
         r"/instances_no_bbox\.json: 1 malformed records, which the evaluator cannot score against: annotation 2: "
         r"no bbox"),
    Case("run: detections not JSON", RUN_SEG + " --detections {d}/not_json.json", 2,
         r"/not_json\.json: not a valid detections file \(COCO results JSON\): not JSON"),
    Case("run: detections without image_id or of an unknown image among good ones",
         RUN_SEG + " --detections {d}/dets_mixed.json", 0,
         r"2 bad records\n  detection 1: no integer image_id\n  detection 2: image 99 is not in the annotations file",
         lambda o: answered(o, [1, 2])),
    Case("run: a vocabulary whose names are not the dataset's", "run lvis-cls --questions {d}/instances.json "
         "--images {d}/images --answers {o}/a.jsonl --tiny", 2,
         r"lvis-cls: the concept vocabulary does not match the dataset's categories: 22 of 22 names are not category "
         r"names \(entries 0: 'person'; 1: 'dog'"),
    Case("score: results file missing", SCORE_SEG % "none.json", 2,
         r"/none\.json: no such file or directory \(results file\)"),
    Case("score: results not JSON", SCORE_SEG % "not_json.json", 2,
         r"/not_json\.json: no answers to score \(2 malformed records, first line 1: not JSON"),
    Case("score: results a JSON object", SCORE_SEG % "results_object.json", 2,
         r"/results_object\.json: a JSON object, not a COCO results list"),
    Case("score: a detection on an unknown image among good ones", SCORE_SEG % "results_unknown_image.json", 0,
         r"1 records of .*/results_unknown_image\.json skipped:\n  image 99: not in the annotations file",
         lambda o: perfect_ap(o / "r.json")),
    Case("score: a detection without image_id among good ones", SCORE_SEG % "results_no_image_id.json", 0,
         r"1 records of .*/results_no_image_id\.json skipped:\n  detection 2: no integer image_id",
         lambda o: perfect_ap(o / "r.json")),
    Case("score: a mask of the image's size swapped among good ones", SCORE_SEG % "results_swapped_mask.json", 0,
         r"image 1 detection 2: mask size \[64, 40\] is not the image's \[height, width\] \[40, 64\]",
         lambda o: perfect_ap(o / "r.json") and report(o / "r.json")["skipped_records"] == 1),
    Case("score: a mask declaring 100000 x 100000 pixels among good ones", SCORE_SEG % "results_huge_mask.json", 0,
         r"image 2 detection 2: mask size \[100000, 100000\] is not the image's \[height, width\] \[64, 40\]",
         lambda o: perfect_ap(o / "r.json")),
    Case("score: every detection on unknown images", SCORE_SEG % "results_only_unknown.json", 2,
         r"no detections left to score: 1 records skipped, first image 99: not in the annotations file"),
    Case("score: annotations missing", "score coco-seg {d}/results.json --annotations {d}/none.json", 2,
         r"/none\.json: no such file\."),
    Case("score: annotations not JSON", "score vqav2 {d}/answers_mixed.jsonl --annotations {d}/not_json.json", 2,
         r"/not_json\.json: not a valid vqav2 annotations file: not JSON"),
    Case("score: instances file with an annotation without bbox",
         "score coco-cls {d}/results.json --annotations {d}/instances_no_bbox.json", 2,
         r"/instances_no_bbox\.json: 1 malformed records, .*annotation 2: no bbox"),
    Case("score: annotations lacking what the scorer reads late", "score seed {d}/answers_mixed.jsonl "
         "--annotations {d}/seed_no_types.json", 2,
         r"/seed_no_types\.json: not a valid seed annotations file: a record has no 'question_type' field"),
    Case("score: torn and incomplete answer lines among good ones",
         "score vqav2 {d}/answers_mixed.jsonl --annotations {d}/vqa_ann.json --report {o}/r", 0,
         r"2 records of .*answers_mixed\.jsonl skipped:\n  line 2: not JSON .*\n  line 4: not an answer record",
         lambda o: scored(o / "r.json", 2)),
    Case("compare: a file that is not a report", "compare {d}/vqa_ann.json {d}/vqa_ann.json", 2,
         r"/vqa_ann\.json: not a report JSON"),
    Case("run: resuming onto a file that is not answers", "run vqav2 --images {d}/images --answers "
         "{d}/answers_garbage.jsonl --tiny --questions {d}/mixed.jsonl", 2,
         r"/answers_garbage\.jsonl: line 1 is not an answer record \(JSONDecodeError"),
    Case("score: no answer line readable", "score vqav2 {d}/answers_garbage.jsonl --annotations {d}/vqa_ann.json",
         2, r"/answers_garbage\.jsonl: no answers to score \(2 malformed records, first line 1: not JSON"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d)
    return d


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CEILING, CEILING))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_plain_message(case: Case, corpus: Path, tmp_path: Path) -> None:
    argv = case.argv.format(d=corpus, o=tmp_path).split()
    done = subprocess.run([sys.executable, "-m", "eval", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=ENV, preexec_fn=limit_memory, timeout=300)
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == case.code, done.stdout[-2000:] + done.stderr[-2000:]
    if case.code:
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and done.stderr.count("error: ") == 1, done.stderr
        assert re.search(case.message, last), done.stderr
    else:
        assert re.search(case.message, done.stdout), done.stdout
    if case.then is not None:
        assert case.then(tmp_path), done.stdout
