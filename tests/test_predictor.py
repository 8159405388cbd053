"""The predictor on the tiny random-weight model: caching, batching, routing, segment-everything."""

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer_tap import Prompt, PromptError, TapPredictor


def test_predict_returns_full_size_regions(tiny_predictor, photo):
    tiny_predictor.set_image(photo)
    regions = tiny_predictor.predict([Prompt.point(200, 150), Prompt.from_box(150, 100, 260, 200)], top_k=2)
    assert len(regions) == 2
    for r in regions:
        assert r.mask.shape == (300, 400) and r.mask.dtype == bool
        assert len(r.concepts) == 2 and r.concepts[0][1] >= r.concepts[1][1]
        assert isinstance(r.caption, str) and r.sem_token.shape == (256,)
        assert 0 <= r.area <= 1
    assert regions[0].mask_index in (1, 2, 3)  # a point never routes to the box mask
    assert regions[1].mask_index == 0
    assert regions[0].describe().startswith(f"{regions[0].concept} (")


def test_candidates_hold_every_mask_and_the_one_predict_routes_to(tiny_predictor, photo):
    key = tiny_predictor.set_image(photo)
    prompts = [Prompt.point(200, 150), Prompt.from_box(150, 100, 260, 200), Prompt.point(30, 40)]
    routed = tiny_predictor.predict(prompts, image=key, caption=False)
    for c, r in zip(tiny_predictor.candidates(prompts, image=key), routed):
        m = tiny_predictor.model.config.num_mask_tokens
        assert c.masks.shape == (m, 300, 400) and c.masks.dtype == bool and c.iou.shape == (m,)
        assert c.chosen == r.mask_index
        np.testing.assert_array_equal(c.masks[c.chosen], r.mask)
        assert c.iou[c.chosen] == pytest.approx(r.iou, abs=1e-6)


def test_second_click_and_same_image_never_reencode(photo):
    p = TapPredictor.random(device="cpu", dtype="float32")
    p.set_image(photo)
    p.predict([Prompt.point(10, 10)])
    p.set_image(photo.copy())  # same content, new array: cache hit
    p.predict([Prompt.point(300, 200)], caption=False)
    assert p.encoder_calls == 1


def test_lru_cache_is_bounded(photo):
    p = TapPredictor.random(device="cpu", dtype="float32", cache_size=2)
    images = [np.roll(photo, i, axis=1) for i in range(3)]
    for img in images:
        p.set_image(img)
    assert p.encoder_calls == 3
    p.set_image(images[2])
    p.set_image(images[1])
    assert p.encoder_calls == 3
    p.set_image(images[0])  # evicted
    assert p.encoder_calls == 4


def test_batched_prompts_equal_one_by_one(tiny_predictor, photo):
    tiny_predictor.set_image(photo)
    prompts = [Prompt.point(50, 60), Prompt.from_box(20, 20, 200, 150), Prompt.point(300, 200, [(320, 220)]),
               Prompt.scribble([(100, 100), (120, 140), (140, 180)]), Prompt.point(390, 290)]
    together = tiny_predictor.predict(prompts)
    for prompt, region in zip(prompts, together):
        alone, = tiny_predictor.predict([prompt])
        assert alone.mask_index == region.mask_index
        assert np.array_equal(alone.mask, region.mask)
        assert alone.caption == region.caption
        assert abs(alone.iou - region.iou) < 1e-5


def test_errors_are_typed(photo):
    p = TapPredictor.random(device="cpu", dtype="float32")
    with pytest.raises(RuntimeError, match="set_image"):  # misuse of the API, not bad user data
        p.predict([Prompt.point(1, 1)])
    p.set_image(photo)
    assert p.predict([]) == []
    with pytest.raises(PromptError, match="outside"):
        p.predict([Prompt.point(1, 1), Prompt.point(1000, 1)])
    with pytest.raises(PromptError, match="list of Prompt"):
        p.predict(Prompt.point(1, 1))
    with pytest.raises(PromptError, match="list of Prompt"):
        p.predict([(1, 1)])
    with pytest.raises(PromptError, match="top_k"):
        p.predict([Prompt.point(1, 1)], top_k=0)
    with pytest.raises(ValueError, match="cache_size"):
        TapPredictor(p.model, p.tokenizer, cache_size=0)


def test_predict_on_a_cached_image_by_key(photo):
    p = TapPredictor.random(device="cpu", dtype="float32")
    first = p.set_image(photo)
    p.set_image(np.ascontiguousarray(photo[::-1]))
    by_key, = p.predict([Prompt.point(200, 150)], image=first, caption=False)
    p.set_image(photo)
    current, = p.predict([Prompt.point(200, 150)], caption=False)
    assert np.array_equal(by_key.mask, current.mask) and p.encoder_calls == 2
    with pytest.raises(RuntimeError, match="no longer cached"):
        p.predict([Prompt.point(1, 1)], image="0" * 32)


def test_region_json_and_recaption_in_bf16(photo):
    import json
    p = TapPredictor.random(device="cpu", dtype="bfloat16")
    p.set_image(photo)
    region, = p.predict([Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1]))], max_new_tokens=4)
    json.dumps(region.to_dict())
    again = p.caption(torch.from_numpy(region.sem_token)[None], max_new_tokens=4)
    assert again == [region.caption]


def test_exif_rotated_photo_gives_masks_in_display_orientation(tiny_predictor, photo, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "rot.jpg"
    Image.fromarray(photo).save(path, exif=exif.tobytes())
    tiny_predictor.set_image(path)
    assert tiny_predictor.image_size == (300, 400)
    region, = tiny_predictor.predict([Prompt.point(250, 350)], caption=False)
    assert region.mask.shape == (400, 300)


def test_segment_everything_dedupes_and_ranks(tiny_predictor, photo):
    regions = tiny_predictor.segment_everything(photo, points_per_side=6, iou_threshold=-1e9, min_area=0.01,
                                                overlap_threshold=0.5, max_regions=10, caption=False)
    assert 1 <= len(regions) <= 10
    ious = [r.iou for r in regions]
    assert ious == sorted(ious, reverse=True)
    for i, a in enumerate(regions):
        assert a.area >= 0.005  # min_area is applied on the low-res mask; full-res area stays close
        for b in regions[i + 1:]:
            inter = np.logical_and(a.mask, b.mask).sum()
            union = np.logical_or(a.mask, b.mask).sum()
            assert inter / max(union, 1) <= 0.6
    assert tiny_predictor.segment_everything(photo, points_per_side=2, iou_threshold=1e9) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(dtype, photo, tiny_predictor):
    p = TapPredictor.random(device="cpu", dtype=dtype)
    p.set_image(photo)
    region, = p.predict([Prompt.point(200, 150)], max_new_tokens=5)
    assert region.mask.shape == (300, 400) and p.model.dtype == dtype
    assert region.sem_token.dtype == np.float32 and np.isfinite(region.sem_token).all()
    tiny_predictor.set_image(photo)
    ref, = tiny_predictor.predict([Prompt.point(200, 150)], caption=False)
    assert np.abs(region.sem_token - ref.sem_token).max() < 0.15 * np.abs(ref.sem_token).max()


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3000, 2)])
def test_tiny_and_extreme_images(tiny_predictor, shape):
    tiny_predictor.set_image(np.full((*shape, 3), 128, np.uint8))
    region, = tiny_predictor.predict([Prompt.point(shape[1] / 2, shape[0] / 2)], caption=False)
    assert region.mask.shape == shape
