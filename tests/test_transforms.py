"""Resize/pad rules and coordinate maps, checked on the cases the official code documents."""

import numpy as np
import pytest
import torch

from tokenizer_tap.transforms import PAD_BGR, ResizeInfo, resize_and_pad, upscale_masks


@pytest.mark.parametrize("hw,resized", [
    ((1264, 1190), (1024, 964)),    # the notebook's fairytale image
    ((3000, 3001), (1024, 1024)),   # near-square keeps the short-side scale
    ((1000, 1001), (1023, 1024)),
    ((500, 500), (1024, 1024)),     # small images are upscaled
    ((1, 10000), (1, 1024)),        # extreme aspect ratio never collapses to 0 px
])
def test_resize_rule(hw, resized):
    assert ResizeInfo.for_image(*hw).resized_hw == resized


def test_scale_is_float32_like_upstream():
    info = ResizeInfo.for_image(1264, 1190)
    assert info.scale32 == np.float32(0.8101266)


def test_pad_is_bottom_right_with_truncated_mean():
    img = np.full((300, 400, 3), 7, np.uint8)
    info = ResizeInfo.for_image(300, 400)
    out = resize_and_pad(img, info)
    assert out.shape == (1024, 1024, 3)
    assert (out[:768, :1024] == 7).all()
    assert tuple(out[-1, -1]) == PAD_BGR == (103, 116, 123)


def test_upscale_masks_to_original_size():
    info = ResizeInfo.for_image(300, 400)
    logits = torch.full((2, 256, 256), -1.0)
    logits[0, :96, :128] = 1.0  # top-left quarter of the valid (192x256 -> 768x1024) region
    masks = upscale_masks(logits, info)
    assert masks.shape == (2, 300, 400) and masks.dtype == torch.bool
    assert not masks[1].any()
    assert abs(float(masks[0].float().mean()) - 0.25) < 0.02
