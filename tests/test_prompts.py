"""Prompt validation and conversion to the official (K, 3) row layout."""

import numpy as np
import pytest

from tokenizer_tap import Prompt, PromptError


def test_point_rows_end_with_pad():
    rows = Prompt.point(10, 20, negatives=[(5, 5)]).rows(100, 100)
    assert rows.tolist() == [[10, 20, 1], [5, 5, 0], [0, 0, 4]]
    assert rows.dtype == np.float32


def test_box_rows_first_and_no_pad():
    rows = Prompt(points=((50, 50),), labels=(0,), box=(80, 90, 10, 20)).rows(100, 100)
    assert rows.tolist() == [[10, 20, 2], [80, 90, 3], [50, 50, 0]]


def test_box_partly_outside_is_clipped():
    assert Prompt.from_box(-5, 10, 150, 60).rows(100, 100)[:2].tolist() == [[0, 10, 2], [100, 60, 3]]


@pytest.mark.parametrize("prompt,match", [
    (Prompt(), "at least one point or a box"),
    (Prompt.point(101, 5), "outside the 100x100 image"),
    (Prompt.point(-1, 5), "outside"),
    (Prompt.from_box(10, 10, 10.5, 50), "empty"),
    (Prompt.from_box(200, 200, 300, 300), "lies outside"),
    (Prompt.point(float("nan"), 3), "finite"),
    (Prompt(points=((1, 1),), labels=(3,)), "label"),
    (Prompt(points=((1, 1), (2, 2)), labels=(1,)), "labels"),
])
def test_invalid_prompts(prompt, match):
    with pytest.raises(PromptError, match=match):
        prompt.rows(100, 100)


def test_scribble_is_sampled_to_nine_points_in_stroke_order():
    stroke = [(i, 2 * i) for i in range(100)]
    p = Prompt.scribble(stroke)
    assert len(p.points) == 9 and p.points[0] == (10, 20) and p.points[-1] == (90, 180)
    assert p.rows(1000, 1000).shape == (10, 3)
    assert len(Prompt.scribble(stroke[:4]).points) == 4
