"""The lmms-lab Hugging Face layout: parquet files with the images inside (lmms-lab/GQA, VQAv2, textvqa,
SEED-Bench, MMBench), from a local folder or the hub cache.

Each loader returns what the Bunny-layout loaders give (questions with image paths, and the scorer's annotations),
so one runner and one set of scorers serve both layouts. Images are written once into an image folder; a rerun
finds them there.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .questions import Question

SHORT = "\nAnswer the question using a single word or phrase."
HUB = {"gqa": ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
       "vqav2": ("lmms-lab/VQAv2", None, "validation"), "textvqa": ("lmms-lab/textvqa", None, "validation"),
       "seed": ("lmms-lab/SEED-Bench", None, "test"), "mmbench": ("lmms-lab/MMBench", "en", "dev")}
GQA_IMAGES = "testdev_balanced_images"
# SEED-Bench-1's dimensions by question_type_id (the parquet carries only the ids).
SEED_DIMENSIONS = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes",
                   4: "Instance Location", 5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction",
                   8: "Visual Reasoning", 9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction",
                   12: "Procedure Understanding"}


class DataMissing(FileNotFoundError):
    """Raised with a message that says what is missing and where to get it."""


@dataclass
class Loaded:
    questions: list[Question]
    annotations: Any  # the benchmark scorer's input
    bad: dict[str, str]


def read_rows(source: str | Path, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a local folder of parquet files (those under `config/` when it exists, then those whose name starts
    with `split`), or of a dataset id in the Hugging Face cache."""
    import datasets
    from datasets import Image
    folder = Path(source)
    if folder.exists():
        base = folder / config if config and (folder / config).is_dir() else folder
        files = sorted(base.rglob("*.parquet"))
        named = [f for f in files if f.name.startswith(split)] or files
        if not named:
            raise DataMissing(f"no .parquet files under {base}")
        data = datasets.load_dataset("parquet", data_files=[str(f) for f in named], split="train")
    else:
        try:
            data = datasets.load_dataset(str(source), config, split=split)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not there"
            raise DataMissing(f"{source} ({config or 'default'}, {split}) is neither a folder nor in the Hugging "
                              f"Face cache: download it with `huggingface-cli download {source} --repo-type dataset` "
                              f"on a machine with internet, or pass the folder of its parquet files "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
    for name, feature in data.features.items():  # keep images as bytes: they are written out, never decoded here
        if isinstance(feature, Image):
            data = data.cast_column(name, Image(decode=False))
    return list(data)


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, list):
        value = value[len(value) // 2] if value else None  # SEED video questions: the middle frame
    if isinstance(value, dict):
        return value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else None)
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if hasattr(value, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return None


def _write(image_dir: Path, name: str, value: Any) -> str | None:
    path = image_dir / name
    if not path.exists():
        data = _image_bytes(value)
        if data is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return name


def load(benchmark: str, source: str | Path, image_dir: str | Path, *, split: str | None = None,
         ocr: bool = False) -> Loaded:
    """Questions and annotations of `benchmark` from its lmms-lab parquet (`source`: folder or dataset id).
    `ocr` adds TextVQA's "Reference OCR token" line to the prompt (lmms-eval's option, off by default there too)."""
    _, config, default_split = HUB[benchmark]
    rows = read_rows(source, config, split or default_split)
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    if benchmark == "gqa":
        return _gqa(rows, image_dir, source)
    if benchmark in ("vqav2", "textvqa"):
        return _vqa(rows, image_dir, benchmark, ocr)
    return _seed(rows, image_dir) if benchmark == "seed" else _mmbench(rows, image_dir)


def _gqa(rows: list[dict], image_dir: Path, source: str | Path) -> Loaded:
    wanted = {r["imageId"] for r in rows}
    written = {}
    for r in read_rows(source, GQA_IMAGES, "testdev"):
        if r["id"] in wanted:
            written[r["id"]] = _write(image_dir, f"{r['id']}.jpg", r["image"])
    questions, annotations, bad = [], {}, {}
    for r in rows:
        qid = str(r["id"])
        annotations[qid] = {k: r.get(k) for k in ("answer", "question", "types", "semantic", "isBalanced")}
        annotations[qid]["semantic"] = annotations[qid]["semantic"] or []
        annotations[qid]["types"] = annotations[qid]["types"] or {}
        if written.get(r["imageId"]) is None:
            bad[qid] = f"image {r['imageId']} not in {GQA_IMAGES}"
            continue
        questions.append(Question(qid, written[r["imageId"]], r["question"] + SHORT, "default", r["id"]))
    return Loaded(questions, annotations, bad)


def _vqa(rows: list[dict], image_dir: Path, benchmark: str, ocr: bool) -> Loaded:
    """VQAv2 val / TextVQA val: annotations are question id -> (answers, answer type) for local VQA accuracy."""
    questions, annotations, bad = [], {}, {}
    for r in rows:
        qid = str(r["question_id"])
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in (r.get("answers") or [])]
        name = _write(image_dir, f"{r.get('image_id', qid)}.jpg", r.get("image"))
        if name is None:
            bad[qid] = "no image in the row"
            continue
        if answers:
            annotations[qid] = {"answers": answers, "answer_type": r.get("answer_type") or "all"}
        question = r["question"]
        if benchmark == "textvqa":
            question = question[:1].upper() + question[1:]
            if ocr and r.get("ocr_tokens"):
                question += "\nReference OCR token: " + ", ".join(r["ocr_tokens"])
        questions.append(Question(qid, name, question + SHORT, r.get("answer_type") or "default", r["question_id"]))
    return Loaded(questions, annotations, bad)


def _seed(rows: list[dict], image_dir: Path) -> Loaded:
    """To the official SEED-Bench.json shape, with images where `seed.questions` looks for them."""
    from . import seed
    bench = {"question_type": {v: k for k, v in SEED_DIMENSIONS.items()}, "questions": []}
    bad = {}
    for r in rows:
        q = {k: r[k] for k in ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer",
                               "data_type", "data_id", "question_type_id")}
        q["question_type_id"] = int(q["question_type_id"])
        name = (f"SEED-Bench-image/{q['data_id']}" if q["data_type"] == "image"
                else f"SEED-Bench-video-image/{q['question_type_id']}_{q['question_id']}.png")
        if _write(image_dir, name, r.get("image")) is None:
            bad[str(q["question_id"])] = "no image in the row"
            continue
        bench["questions"].append(q)
    return Loaded(seed.questions(bench, video_frames=True), bench, bad)


def _mmbench(rows: list[dict], image_dir: Path) -> Loaded:
    """To the legacy TSV's rows (base64 image), then the TSV path: circular questions, same scorer."""
    from . import mmbench
    tsv = []
    for r in rows:
        row = {k: ("" if v is None else str(v)) for k, v in r.items() if k != "image"}
        data = _image_bytes(r.get("image"))
        row["image"] = base64.b64encode(data).decode() if data else ""
        tsv.append(row)
    return Loaded(mmbench.questions(tsv, image_dir), tsv, {})
