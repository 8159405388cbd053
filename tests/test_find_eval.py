"""`evaluate_find`: exact counts and instance recall and precision of `find`, on scenes and answers made by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from finetune.tap.find_eval import Case, evaluate_find, matched
from finetune.tap.world import Annotation, Scene


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((8, 8), bool)
    mask[y0:y1, x0:x1] = True
    return mask


CAR_1, CAR_2, PERSON, DOG = box(0, 2, 0, 4), box(4, 6, 0, 4), box(0, 8, 6, 8), box(2, 6, 2, 6)


def scene(image_id: int, *regions: tuple[str, str, np.ndarray]) -> Scene:
    return Scene(image_id, np.full((8, 8, 3), image_id, np.uint8),
                 [Annotation(image_id * 1000 + k, concept, None, kind, mask)
                  for k, (concept, kind, mask) in enumerate(regions)])


SCENES = [
    scene(1, ("sky", "stuff", box(0, 8, 0, 8)), ("car", "object", CAR_1), ("wheel", "part", box(1, 2, 0, 1)),
          ("car", "object", CAR_2), ("person", "object", PERSON)),
    scene(2, ("dog", "object", DOG)),
]
ANSWERS = {  # (image, concept) -> the masks the fake `find` returns
    (1, "car"): [CAR_1, box(5, 8, 0, 4)],  # two found, as many as there are; the second misses (IoU 1/4)
    (1, "person"): [PERSON, PERSON],  # a duplicate: one match only, and one too many
    (1, "dog"): [DOG],  # absent from scene 1: a false instance
    (2, "dog"): [DOG],
}


class FakePredictor:
    """What `evaluate_find` reads of a `TapPredictor`: the vocabulary, `set_image` and `find`."""

    def __init__(self) -> None:
        self.model = SimpleNamespace(concept_projector=SimpleNamespace(names=["sky", "wheel", "car", "person", "dog"]))
        self.asked: list[tuple[int, str, dict]] = []

    def set_image(self, image: np.ndarray) -> str:
        return str(int(image[0, 0, 0]))

    def find(self, query: str, *, key: str, **options) -> list[SimpleNamespace]:
        self.asked.append((int(key), query, options))
        return [SimpleNamespace(mask=m) for m in ANSWERS.get((int(key), query), [])]


def test_counts_recall_and_precision_over_objects_and_one_absent_concept_per_scene():
    fake = FakePredictor()
    scores = evaluate_find(fake, SCENES, min_score=0.7)
    # pairs: car (2 of 2), person (2 of 1), dog absent (1 of 0), dog (1 of 1), car or person absent (0 of 0)
    assert scores == {"find_exact_count": 3 / 5, "find_recall": 3 / 4, "find_precision": 3 / 6, "find_pairs": 5,
                      "find_instances": 4, "find_found": 6, "find_matched": 3}
    asked = [(image, concept) for image, concept, _ in fake.asked]
    assert asked[:4] == [(1, "car"), (1, "person"), (1, "dog"), (2, "dog")]  # no stuff, no parts
    assert asked[4] in [(2, "car"), (2, "person")] and len(asked) == 5
    assert all(options == {"caption": False, "min_score": 0.7} for _, _, options in fake.asked)


def test_a_scene_asks_for_its_objects_and_one_absent_concept_drawn_from_its_id():
    case = Case.of(SCENES[0])
    assert list(case.objects) == ["car", "person"] and len(case.objects["car"]) == 2  # no stuff, no parts
    assert [c for c, _ in case.queries(["car", "person"])] == ["car", "person"]  # nothing absent to ask
    other = Case.of(SCENES[1])
    drawn = {other.queries(["car", "dog", "person", "tree"])[1][0] for _ in range(3)}
    assert len(drawn) == 1 and drawn < {"car", "person", "tree"}


@pytest.mark.parametrize(("found", "expected"), [
    ([], 0), ([CAR_1], 1), ([CAR_1, CAR_1], 1), ([CAR_2, CAR_1], 2), ([box(0, 1, 0, 4)], 1), ([box(0, 1, 0, 3)], 0),
])
def test_matching_is_one_to_one_at_mask_iou_one_half(found, expected):
    assert matched(found, [CAR_1, CAR_2]) == expected
