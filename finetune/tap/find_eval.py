"""How well `TapPredictor.find` finds every instance of a concept, on held-out world scenes whose instances are known.

Each scene is asked for every object concept it holds and for one it does not (so "none" is tested, as the chat
data's count questions do). Only objects count as instances: stuff (sky, grass, road) has one mask per scene and no
count, and a part (window, wheel) is a piece of an object that the world's count questions never ask about; a part's
concept is not an object's, so leaving them out removes no object instance. Found masks are matched one to one to
the true masks, greedily by mask IoU, a match needing IoU >= 0.5 (COCO's loosest threshold).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tokenizer_tap.predictor import TapPredictor

from .world import Scene

THRESHOLD = 0.5  # mask IoU at which a found instance is a true one


def mask_ious(found: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> np.ndarray:
    """(F, T) IoU of every found mask with every true one."""
    if not len(found) or not len(truth):
        return np.zeros((len(found), len(truth)))
    a = np.stack([m.reshape(-1) for m in found]).astype(np.float32)
    b = np.stack([m.reshape(-1) for m in truth]).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return inter / np.maximum(union, 1)


def matched(found: Sequence[np.ndarray], truth: Sequence[np.ndarray], threshold: float = THRESHOLD) -> int:
    """How many found masks match a true one: pairs taken best IoU first, each mask used at most once."""
    ious = mask_ious(found, truth)
    used_f, used_t = set(), set()
    for flat in np.argsort(-ious, axis=None, kind="stable"):
        f, t = np.unravel_index(flat, ious.shape)
        if ious[f, t] < threshold:
            break
        if f not in used_f and t not in used_t:
            used_f.add(f)
            used_t.add(t)
    return len(used_f)


@dataclass
class Case:
    """What one scene asks of `find`: its image and the true masks of each object concept in it (a scene's stuff and
    parts are dropped as it is read, so many scenes fit in memory)."""

    image_id: int
    image: np.ndarray
    objects: dict[str, list[np.ndarray]]

    @classmethod
    def of(cls, scene: Scene) -> Case:
        objects: dict[str, list[np.ndarray]] = {}
        for r in scene.regions:
            if r.kind == "object":
                objects.setdefault(r.concept, []).append(r.mask)
        return cls(scene.image_id, scene.image, objects)

    def queries(self, concepts: Sequence[str]) -> list[tuple[str, list[np.ndarray]]]:
        """(concept, true masks) for each object concept present, then one of `concepts` absent (drawn from the
        scene's id, so the same scene always asks the same)."""
        absent = sorted(set(concepts) - set(self.objects))
        out = list(self.objects.items())
        if absent:
            out.append((absent[int(np.random.default_rng(self.image_id).integers(len(absent)))], []))
        return out


def evaluate_find(predictor: TapPredictor, scenes: Iterable[Scene], concepts: Sequence[str] | None = None,
                  threshold: float = THRESHOLD, **find_options) -> dict:
    """Exact counts per (scene, concept) and instance recall and precision (micro-averaged) of `find`.

    `concepts`: the object concepts an absent query is drawn from (default: every object concept of `scenes` that
    the predictor's vocabulary names). `find_options` go to `find` (captions are off: they do not change masks).
    """
    cases = [Case.of(s) for s in scenes]
    if concepts is None:
        concepts = sorted({c for case in cases for c in case.objects} & set(predictor.model.concept_projector.names))
    pairs = exact = true = found = right = 0
    for case in cases:
        key = predictor.set_image(case.image)
        for concept, masks in case.queries(concepts):
            got = [r.mask for r in predictor.find(concept, key=key, caption=False, **find_options)]
            pairs += 1
            exact += len(got) == len(masks)
            true += len(masks)
            found += len(got)
            right += matched(got, masks, threshold)
    return {"find_exact_count": exact / max(pairs, 1), "find_recall": right / max(true, 1),
            "find_precision": right / max(found, 1), "find_pairs": pairs, "find_instances": true,
            "find_found": found, "find_matched": right}
