"""The benchmark registry: each name maps to the module that loads, asks and scores it (interface in `eval/spec.py`).

The CLI, the scorer and the lmms-lab reader look benchmarks up here; nothing else branches on a benchmark's name.
"""

from __future__ import annotations

from types import ModuleType

from . import captioning, gqa, instance_cls, instance_seg, mmbench, seed, short_answer, textvqa, vqa

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
