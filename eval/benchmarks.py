"""The benchmark registry: each name maps to the module that loads, asks and scores it (interface in `eval/spec.py`).

The CLI and the scorer look benchmarks up here, and hand the lmms-lab reader the module (`load_lmms`); nothing else
branches on a benchmark's name.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from . import captioning, gqa, instance_cls, instance_seg, lmms, mmbench, seed, short_answer, textvqa, vqa

REGISTRY: dict[str, ModuleType] = {"gqa": gqa, "vqav2": vqa, "textvqa": textvqa, "seed": seed, "mmbench": mmbench,
                                   "vg": captioning, "refcocog": captioning,
                                   "lvis-cls": instance_cls, "coco-cls": instance_cls,  # Table 1
                                   "coco-seg": instance_seg, "lvis-seg": instance_seg,  # Table 3
                                   "short-answer": short_answer}  # held-out synthetic questions
BENCHMARKS = tuple(REGISTRY)


def get(name: str) -> ModuleType:
    """The module of benchmark `name`; an unknown name is a ValueError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}: one of {', '.join(BENCHMARKS)}") from None


def load_lmms(benchmark: str, source: str | Path, image_dir: str | Path, *, split: str | None = None,
              ocr: bool = False) -> lmms.Loaded:
    """Questions and annotations of benchmark `benchmark` from its lmms-lab parquet (`eval.lmms.load`)."""
    return lmms.load(get(benchmark), source, image_dir, split=split, ocr=ocr, name=benchmark)
