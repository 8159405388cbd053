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


@pytest.mark.parametrize("make,match", [
    (lambda: Prompt(), "at least one point or a box"),
    (lambda: Prompt.point(101, 5), "outside the 100x100 image"),
    (lambda: Prompt.point(-1, 5), "outside"),
    (lambda: Prompt.from_box(10, 10, 10.5, 50), "empty"),
    (lambda: Prompt.from_box(200, 200, 300, 300), "lies outside"),
    (lambda: Prompt.point(float("nan"), 3), "finite"),
    (lambda: Prompt(points=((1, 1),), labels=(3,)), "label"),
    (lambda: Prompt(points=((1, 1),), labels=(0.5,)), "label"),
    (lambda: Prompt(points=((1, 1), (2, 2)), labels=(1,)), "labels"),
    (lambda: Prompt(points=((1, 2, 1),)), "point must be 2 numbers"),
    (lambda: Prompt(box=(1, 2, 3)), "box must be 4 numbers"),
    (lambda: Prompt.point(1, 1, negatives=(5, 5)), "point must be 2 numbers"),
    (lambda: Prompt(points="12"), "must be a sequence"),
    (lambda: Prompt.point("a", 1), "2 numbers"),
])
def test_invalid_prompts(make, match):
    with pytest.raises(PromptError, match=match):
        make().rows(100, 100)


def test_numpy_inputs_are_normalised():
    p = Prompt(points=np.array([[10.0, 20.0]]), labels=np.array([1]), box=np.array([1, 2, 30, 40]))
    assert p.points == ((10.0, 20.0),) and p.labels == (1,) and p.box == (1.0, 2.0, 30.0, 40.0)
    assert all(type(v) is float for v in p.points[0]) and type(p.labels[0]) is int


def test_scribble_is_sampled_to_nine_points_in_stroke_order():
    stroke = [(i, 2 * i) for i in range(100)]
    p = Prompt.scribble(stroke)
    assert len(p.points) == 9 and p.points[0] == (10, 20) and p.points[-1] == (90, 180)
    assert p.rows(1000, 1000).shape == (10, 3)
    assert len(Prompt.scribble(stroke[:4]).points) == 4


def test_the_json_schema_round_trips_and_reads_its_shorthands():
    for p in (Prompt.point(3, 4, negatives=[(5, 6)]), Prompt.from_box(1, 2, 30, 40), Prompt.scribble([(1, 1), (2, 3)]),
              Prompt(points=((7, 8),), labels=(0,), box=(1, 2, 30, 40), kind="everything")):
        back = Prompt.from_dict(p.to_dict())
        assert back == p and back.kind == p.kind
    assert Prompt.from_dict({"point": [3, 4], "negatives": [[5, 6]]}) == Prompt.point(3, 4, negatives=[(5, 6)])
    assert Prompt.from_dict({"box": [1, 2, 30, 40]}).kind == "box"
    assert Prompt.from_dict({"points": [[1, 2], [3, 4]], "labels": [1, 0]}).labels == (1, 0)
    assert len(Prompt.from_dict({"scribble": [[i, i] for i in range(50)]}).points) == 9


@pytest.mark.parametrize("spec,match", [
    ([1, 2], "a region prompt is an object"),
    ({"circle": 3}, "unknown region prompt key.*'circle'"),
    ({"point": [1, 2], "box": [1, 2, 3, 4]}, "a 'point' region stands alone: drop box"),
    ({"scribble": [[1, 1]], "points": [[1, 1]]}, "a 'scribble' region stands alone"),
    ({"box": [1, 2, 30, 40], "negatives": [[5, 5]]}, "only with a 'point'"),
    ({"point": [1, 2, 3]}, "point must be 2 numbers"),
    ({"kind": "box"}, "needs a point or a box"),
    ({"points": [[1, 1]], "kind": 3}, "kind must be text"),
])
def test_bad_json_prompts_name_the_mistake(spec, match):
    with pytest.raises(PromptError, match=match):
        Prompt.from_dict(spec)


def test_command_line_forms():
    from tokenizer_tap.prompts import parse_box, parse_point, parse_stroke
    assert parse_point("3, 4") == (3.0, 4.0) and parse_box("1,2,3,4") == (1.0, 2.0, 3.0, 4.0)
    assert parse_stroke("1,2 3,4") == [(1.0, 2.0), (3.0, 4.0)]
    for parse, text, match in [(parse_point, "3", "a point is X,Y"), (parse_box, "1,2,3", "a box is"),
                               (parse_point, "nan,1", "X,Y"), (parse_stroke, " ", "a scribble is")]:
        with pytest.raises(PromptError, match=match):
            parse(text)
