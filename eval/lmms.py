"""The lmms-lab Hugging Face layout: parquet files with the images inside (lmms-lab/GQA, VQAv2, textvqa,
SEED-Bench, MMBench), from a local folder or the hub cache.

Each loader returns what the Bunny-layout loaders give (questions with image paths, and the scorer's annotations),
so one runner and one set of scorers serve both layouts. Images are written once into an image folder; a rerun
finds them there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .questions import Question
from .spec import RunInputs

SHORT = "\nAnswer the question using a single word or phrase."


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
    import datasets  # heavy (pyarrow, pandas): only the lmms-lab layout needs it
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


def image_bytes(value: Any) -> bytes | None:
    """The bytes of a parquet image cell (bytes, {bytes|path}, a PIL image; a frame list: its middle frame)."""
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


def write_image(image_dir: Path, name: str, value: Any) -> str | None:
    """Write an image cell once as `image_dir/name`; the name, or None when the row has no image."""
    path = image_dir / name
    if not path.exists():
        data = image_bytes(value)
        if data is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return name


def load(benchmark: ModuleType, source: str | Path, image_dir: str | Path, *, split: str | None = None,
         ocr: bool = False, name: str | None = None) -> Loaded:
    """Questions and annotations of a benchmark module (`eval.benchmarks.load_lmms` looks it up by name) from its
    lmms-lab parquet (`source`: folder or dataset id). `ocr` adds TextVQA's "Reference OCR token" line to the prompt
    (lmms-eval's option, off by default there too); `name` is the benchmark's name in messages."""
    if benchmark.LMMS is None:
        raise DataMissing(f"{name or benchmark.__name__} is not published as lmms-lab parquet: pass --questions")
    _, config, default_split = benchmark.LMMS
    rows = read_rows(source, config, split or default_split)
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    return benchmark.from_lmms(rows, image_dir, source, RunInputs(images=image_dir, split=split, ocr=ocr))


def vqa_questions(rows: list[dict], image_dir: Path, *, textvqa: bool, ocr: bool) -> Loaded:
    """VQAv2 val / TextVQA val: annotations are question id -> (answers, answer type) for local VQA accuracy."""
    questions, annotations, bad = [], {}, {}
    for r in rows:
        qid = str(r["question_id"])
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in (r.get("answers") or [])]
        name = write_image(image_dir, f"{r.get('image_id', qid)}.jpg", r.get("image"))
        if name is None:
            bad[qid] = "no image in the row"
            continue
        if answers:
            annotations[qid] = {"answers": answers, "answer_type": r.get("answer_type") or "all"}
        question = r["question"]
        if textvqa:
            question = question[:1].upper() + question[1:]
            if ocr and r.get("ocr_tokens"):
                question += "\nReference OCR token: " + ", ".join(r["ocr_tokens"])
        questions.append(Question(qid, name, question + SHORT, r.get("answer_type") or "default", r["question_id"]))
    return Loaded(questions, annotations, bad)
