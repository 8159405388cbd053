"""Overlay drawing: the bounding-box-confined tint matches tinting the whole image."""

from __future__ import annotations

import numpy as np

from tokenizer_tap.visualize import _edges, anchor, draw_regions, tint


def whole_image_tint(image, masks, colours, alpha=0.45):
    out = image.astype(np.float32)
    for mask, col in zip(masks, colours):
        out[mask] = out[mask] * (1 - alpha) + np.asarray(col, np.float32) * alpha
        out[_edges(mask)] = col
    return out.clip(0, 255).astype(np.uint8)


def test_tint_equals_the_whole_image_version() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    masks = []
    for _ in range(8):
        m = np.zeros((60, 80), bool)
        y, x = rng.integers(0, 55), rng.integers(0, 75)
        m[y:y + rng.integers(1, 30), x:x + rng.integers(1, 30)] = True
        masks.append(m & (rng.random((60, 80)) > 0.2))
    masks += [np.ones((60, 80), bool), np.zeros((60, 80), bool)]  # touching every border; empty
    colours = [(25 * i, 200, 30) for i in range(len(masks))]
    assert np.array_equal(tint(image, masks, colours), whole_image_tint(image, masks, colours))
    assert np.array_equal(tint(image, masks, colours, 0.6), whole_image_tint(image, masks, colours, 0.6))


def test_labels_sit_at_the_centre_of_mass() -> None:
    mask = np.zeros((50, 50), bool)
    mask[10:20, 30:40] = True
    assert anchor(mask) == (34, 14) and anchor(np.zeros((5, 5), bool)) is None
    out = np.asarray(draw_regions(np.zeros((50, 50, 3), np.uint8), [mask], ["1"], colours=[(255, 0, 0)]))
    assert out[14, 34].any() and not out[45, 5].any()
