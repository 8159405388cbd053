"""Benchmark questions in the Bunny/LLaVA layout: JSON lines `{"question_id", "image", "text", "category"}` (the
answer-format suffix already in `text`), plain or inside a .tar.gz, and an image folder."""

from __future__ import annotations

import binascii
import csv
import gzip
import io
import json
import math
import pickle
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Question:
    id: str  # as text, for keys; `raw_id` keeps the file's type (VQAv2 submissions need ints)
    image: str | None
    text: str
    category: str = "default"
    raw_id: str | int = ""
    box: tuple[float, float, float, float] | None = None  # region captioning: the prompt box, x0 y0 x1 y1 pixels
    # instance benchmarks: every box prompt of the image, x0 y0 x1 y1 (+ the detector's category id and score)
    regions: tuple[tuple[float, ...], ...] = ()


def shard(questions: Sequence[Question], num_shards: int, index: int) -> list[Question]:
    """Contiguous piece `index` of `num_shards` (ceil-sized, as Bunny's get_chunk), so merging keeps the order."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard {index} is not in 0..{num_shards - 1}")
    size = math.ceil(len(questions) / num_shards)
    return list(questions[index * size:(index + 1) * size])


@contextmanager
def reading(path: str | Path | None, what: str) -> Iterator[None]:
    """Read a user's `what` file inside this: what its parsing raises (unreadable, not UTF-8, not JSON, a broken
    archive, a field missing or of the wrong type) becomes one message naming the file and the problem, which the
    CLI prints instead of a traceback. Our own messages (other ValueErrors, OSErrors without a file) pass through."""
    name = path if path is not None else what
    try:
        yield
    except gzip.BadGzipFile as exc:  # an OSError without a file name
        raise ValueError(f"{name}: not a readable archive ({what}): {exc}") from None
    except OSError as exc:
        if exc.filename is None:
            raise
        raise type(exc)(f"{exc.filename}: {(exc.strerror or str(exc)).lower()} ({what})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not a valid {what}: not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") \
            from None
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not a valid {what}: not UTF-8 text") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(":")  # tarfile lists every method it tried
        raise ValueError(f"{name}: not a readable archive ({what}): {why}") from None
    except KeyError as exc:
        raise ValueError(f"{name}: not a valid {what}: a record has no {exc.args[0]!r} field") from None
    except (TypeError, IndexError, AttributeError, csv.Error, binascii.Error, pickle.UnpicklingError) as exc:
        raise ValueError(f"{name}: not a valid {what}: {type(exc).__name__}: {exc}") from None


def read_json_or_tar(path: str | Path, member_suffix: str) -> bytes:
    """A file's bytes, or those of the first tar member ending with `member_suffix` when `path` is a .tar.gz."""
    path = Path(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(member_suffix):
                    return tar.extractfile(member).read()
        raise FileNotFoundError(f"{path} holds no *{member_suffix} file")
    return path.read_bytes()


def load_questions(path: str | Path) -> tuple[list[Question], dict[str, str]]:
    """The questions, and the bad records (line number or id -> reason) that were skipped; a file without a single
    question is refused."""
    with reading(path, "question JSONL"):
        text = read_json_or_tar(path, ".jsonl").decode("utf-8")
    questions, bad = [], {}
    for n, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, prompt = str(row["question_id"]), row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            bad[f"line {n}"] = f"not a question record ({type(exc).__name__})"
            continue
        if not isinstance(prompt, str) or not prompt.strip():
            bad[qid] = "empty question"
            continue
        questions.append(Question(qid, row.get("image"), prompt, str(row.get("category", "default")),
                                  row["question_id"]))
    if not questions:
        first = next(iter(bad.items()), None)
        raise ValueError(f"{path}: no question records" + (f" ({len(bad)} bad, first: {first[0]}: {first[1]})"
                                                          if first else ""))
    return questions, bad


def load_bunny(inputs, load_annotations) -> tuple[list[Question], object, dict[str, str]]:
    """A Bunny-layout run: the question JSONL, and the scorer's annotations when `--annotations` is given."""
    if inputs.questions is None:
        raise FileNotFoundError("pass --questions FILE (Bunny/official layout) or --hf SOURCE (lmms-lab parquet)")
    questions, bad = load_questions(inputs.questions)
    if inputs.annotations is None:
        return questions, None, bad
    with reading(inputs.annotations, "annotations file"):
        return questions, load_annotations(inputs.annotations), bad
