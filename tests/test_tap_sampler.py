"""The two-stage prompt sampler and the pre-training losses, on masks made here (no model)."""

from __future__ import annotations

import numpy as np
import torch

from finetune.tap.batch import caption_tokens, jitter_image, low_res_mask
from finetune.tap.config import TapSamplerConfig
from finetune.tap.losses import concept_loss, dice_loss, focal_loss, route_training, segmentation_loss
from finetune.tap.priors import target_log_probs
from finetune.tap.sampler import first_stage, second_stage
from tokenizer_tap.build import TINY_TOKENIZER
from tokenizer_tap.modeling import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PAD, POSITIVE
from tokenizer_tap.text_tokenizer import TextTokenizer
from tokenizer_tap.transforms import ResizeInfo, resize_and_pad

STRIDE = 4.0  # a 64 x 64 low-res mask in a 256 px input


def square(y0: int, x0: int, side: int, size: int = 64) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def inside(mask: torch.Tensor, xy: torch.Tensor) -> bool:
    cells = (xy / STRIDE).long()
    return bool(mask[cells[:, 1], cells[:, 0]].all())


def test_first_stage_draws_boxes_and_points_half_each_and_points_lie_in_the_mask():
    masks = [square(10, 20, 12)] * 400
    boxes = torch.tensor([[80.0, 40.0, 128.0, 88.0]]).repeat(400, 1)
    rows, is_box = first_stage(masks, boxes, TapSamplerConfig(), STRIDE, 256, torch.Generator().manual_seed(0))
    assert rows.shape == (400, 2, 3)
    assert 0.4 < is_box.float().mean() < 0.6
    assert (rows[is_box][:, :, 2] == torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT])).all()
    noise = (rows[is_box][:, :, :2].reshape(-1, 4) - boxes[0]).abs()
    assert 0 < noise.max() <= 0.1 * 48 + 1e-4  # SAM-style jitter, 10 % of the side
    points = rows[~is_box]
    assert (points[:, 0, 2] == POSITIVE).all() and (points[:, 1, 2] == PAD).all()
    assert inside(masks[0], points[:, 0, :2])


def test_caption_only_regions_always_get_their_box():
    rows, is_box = first_stage([None, None], torch.tensor([[1.0, 2, 30, 40], [5, 5, 9, 9]]),
                               TapSamplerConfig(box_noise=0), STRIDE, 256, torch.Generator().manual_seed(1))
    assert is_box.all() and torch.equal(rows[0, :, :2], torch.tensor([[1.0, 2], [30, 40]]))


def test_second_stage_points_come_from_the_error_region_with_the_right_labels():
    gt = square(10, 10, 20)
    pred = square(14, 20, 20)  # misses the left part, spills over on the right and bottom
    cfg = TapSamplerConfig(non_interactive_prob=0.0)
    first = torch.tensor([[[60.0, 60.0, POSITIVE], [0, 0, PAD]]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows, is_box = second_stage([gt], first, torch.tensor([False]), pred[None], cfg, STRIDE, gen)
        real = rows[0][rows[0, :, 2] != PAD]
        assert torch.equal(real[0], first[0, 0]) and not is_box[0]  # the stage-1 point is kept
        new = real[1:]
        assert 1 <= len(new) <= 8 and len(real) <= 9
        cells = (new[:, :2] / STRIDE).long()
        for (x, y), label in zip(cells.tolist(), new[:, 2].tolist()):
            assert bool(gt[y, x] ^ pred[y, x])  # in the error region
            assert label == (POSITIVE if gt[y, x] else NEGATIVE)


def test_second_stage_non_interactive_draw_has_1_to_9_positive_points():
    gt = square(5, 5, 30)
    cfg = TapSamplerConfig(non_interactive_prob=1.0)
    gen = torch.Generator().manual_seed(3)
    counts = set()
    for _ in range(200):
        rows, is_box = second_stage([gt], torch.zeros(1, 2, 3), torch.tensor([True]), gt[None], cfg, STRIDE, gen)
        real = rows[0][rows[0, :, 2] != PAD]
        assert (real[:, 2] == POSITIVE).all() and inside(gt, real[:, :2]) and not is_box[0]
        counts.add(len(real))
    assert counts == set(range(1, 10))


def test_box_start_keeps_its_corners_and_routes_as_a_box():
    gt, pred = square(0, 0, 10), square(0, 0, 5)
    first = torch.tensor([[[0.0, 0.0, BOX_TOP_LEFT], [40.0, 40.0, BOX_BOTTOM_RIGHT]]])
    rows, is_box = second_stage([gt], first, torch.tensor([True]), pred[None], TapSamplerConfig(non_interactive_prob=0),
                                STRIDE, torch.Generator().manual_seed(0))
    assert is_box[0] and torch.equal(rows[0, :2], first[0])


def test_losses_vanish_on_a_perfect_prediction_and_routing_follows_inference():
    target = square(8, 8, 16).float()[None]
    perfect = (target * 40 - 20)[:, None].repeat(1, 4, 1, 1)
    assert float(focal_loss(perfect, target[:, None].expand_as(perfect)).max()) < 1e-6
    assert float(dice_loss(perfect, target[:, None].expand_as(perfect)).max()) < 0.01
    per_mask = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.1, 0.5, 0.2, 0.9]])
    assert route_training(per_mask, torch.tensor([True, False])).tolist() == [0, 2]
    loss, chosen = segmentation_loss(perfect, target, torch.ones(1, 4), torch.tensor([False]))
    assert float(loss[0]) < 0.02 and int(chosen[0]) in (1, 2, 3)
    wrong_iou, _ = segmentation_loss(perfect, target, torch.zeros(1, 4), torch.tensor([False]))
    assert float(wrong_iou[0]) > 0.9  # the IoU head is told every mask's IoU (1 here)


def test_concept_loss_is_the_kl_to_the_teacher_distribution():
    g = torch.Generator().manual_seed(0)
    weights = torch.nn.functional.normalize(torch.randn(32, 10, generator=g), dim=0) * 30
    v_c = torch.randn(5, 32, generator=g)
    assert float(concept_loss(v_c * 3.0, v_c, weights).abs().max()) < 1e-5  # same direction: same distribution
    other = concept_loss(torch.randn(5, 32, generator=g), v_c, weights)
    assert (other > 0).all()
    tgt = target_log_probs(v_c, weights).exp()
    assert torch.allclose(tgt.sum(-1), torch.ones(5))


def test_without_jitter_the_training_image_is_the_inference_input():
    rgb = np.random.default_rng(0).integers(0, 255, (90, 200, 3), dtype=np.uint8)
    image, scale, offset, visible = jitter_image(rgb, 256, (1.0, 1.0), torch.Generator().manual_seed(0))
    info = ResizeInfo.for_image(90, 200, size=256)
    assert np.array_equal(image, resize_and_pad(np.ascontiguousarray(rgb[..., ::-1]), info))
    assert offset == (0, 0) and visible == info.resized_hw and scale == info.scale


def test_jitter_crops_big_scales_and_masks_follow_the_image():
    rgb = np.zeros((100, 100, 3), np.uint8)
    mask = np.zeros((100, 100), bool)
    mask[60:90, 60:90] = True
    rgb[mask] = 255
    image, scale, offset, _ = jitter_image(rgb, 128, (2.0, 2.0), torch.Generator().manual_seed(5))
    low = low_res_mask(mask, scale, offset, 128, 32)
    white = torch.from_numpy(image[..., 0] > 127)
    down = torch.nn.functional.avg_pool2d(white[None, None].float(), 4)[0, 0] > 0.5
    assert offset != (0, 0) and (low ^ down).float().mean() < 0.02


def test_caption_tokens_teach_each_next_word_and_stop():
    tok = TextTokenizer(TINY_TOKENIZER)
    inputs, target = caption_tokens(tok, ["a red car", ""], max_len=39)
    ids = tok.encode("a red car")
    assert inputs[0, 0] == tok.bos_id and inputs[0, 1:len(ids) + 1].tolist() == ids
    assert target[0, :len(ids) + 1].tolist() == ids + [tok.eos_id]
    assert (target[0, len(ids) + 1:] == -100).all()
    long_in, long_target = caption_tokens(tok, ["word " * 80], max_len=39)
    assert long_in.shape[1] == 39 and long_target[0, -1] == tok.eos_id
