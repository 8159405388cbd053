"""Engine building blocks that need no LLM: template strings, region lines, the conv projector."""

import json

import numpy as np
import pytest
import torch

from assistant.projector import ConvProjector, ProjectorConfig
from assistant.template import SYSTEM, Turn, grid_box, grounding_block, line, parse_line, render, render_pretrain
from tokenizer_tap.region import Region


def test_template_matches_bunny_character_for_character():
    assert SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions.")
    assert render([Turn("What is in the image?", "A cat.")]) == (
        SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.<|endoftext|>")
    assert render([Turn("Q1", "A1"), Turn("Q2", "A2")]) == (
        SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1<|endoftext|>USER: Q2 ASSISTANT: A2<|endoftext|>")
    assert render([Turn("What is this?")]) == SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    assert render([Turn("Hi")], image=False) == SYSTEM + " USER: Hi ASSISTANT:"
    assert render_pretrain("a red circle") == "<image>a red circle\n"
    with pytest.raises(ValueError):
        render([Turn("Q1"), Turn("Q2")])
    with pytest.raises(ValueError):
        render([])


def test_region_line_format_is_stable():
    r = Region([("dog", 0.9134)], "a brown dog lying on grass", box=(112, 340, 499, 881), area=0.1412,
               size=(1000, 1000), number=2)
    assert line(r) == ('<region2>: dog (0.91), box [112,340,498,880] on a 0-999 grid, 14% of image, '
                       '"a brown dog lying on grass"')
    back = parse_line(line(r))
    assert (back.number, back.concepts, grid_box(back), back.area, back.caption, back.kind) == (
        2, [("dog", 0.91)], (112, 340, 498, 880), 0.14, "a brown dog lying on grass", "region")
    assert line(back) == line(r)


def test_region_line_cleans_text_and_scales_boxes():
    r = Region([('a "quoted"\nname', 1.0)], 'say "hi"\x07' + "x" * 300, box=(0, 0, 640, 480), area=0.004,
               size=(640, 480), number=10)
    text = line(r)
    assert "\n" not in text and "\x07" not in text
    assert text.startswith("<region10>: a 'quoted' name (1.00), box [0,0,999,999]") and "<1% of image" in text
    back = parse_line(text)
    assert back.caption.startswith("say 'hi' x") and len(back.caption) <= 120 and back.area == 0.005
    cat = Region([("cat", 0.5)], "c", box=(1, 2, 4, 5), area=0.5, size=(1000, 1000), number=1)
    assert grounding_block([r, cat]).splitlines()[0].startswith("<region1>:")
    with pytest.raises(ValueError):
        parse_line("<region1> dog")


def test_one_region_round_trips_through_to_dict_with_its_mask_decoded_once():
    mask = np.zeros((30, 40), bool)
    mask[5:10, 8:20] = True
    region = Region.from_mask(mask, [("dog", 0.9)], "a dog", iou=0.8, number=3, image="k")
    assert (region.box, region.size, region.area) == ((8, 5, 20, 10), (40, 30), 60 / 1200)
    data = json.loads(json.dumps(region.to_dict()))
    back = Region.from_dict(data)
    assert (back.box, back.size, back.area, back.number, back.image, back.concepts) == (
        region.box, region.size, region.area, 3, "k", [("dog", 0.9)])
    assert line(back) == line(region)
    assert back._mask is None  # nothing decoded yet: a line needs no pixels
    first = back.mask
    assert np.array_equal(first, mask) and back.mask is first  # decoded once, then kept
    with pytest.raises(ValueError, match="not a region"):
        Region.from_dict({"mask": {"size": [2, 2], "counts": [9]}})


def test_projector_shapes_and_identity_init():
    torch.manual_seed(0)
    cfg = ProjectorConfig(in_dim=32, hidden_dim=48, out_dim=64)
    proj = ConvProjector(cfg).eval()
    x = torch.randn(2, 32, 64, 64)
    out = proj(x)
    assert out.shape == (2, 1024, 64) and cfg.num_tokens() == 1024
    # Zero-initialised last convs: the residual blocks are the identity, so the output is MLP(merge(x)).
    merged = proj.merge(torch.nn.functional.pixel_unshuffle(x, 2))
    assert torch.allclose(out, proj.mlp(merged.flatten(2).transpose(1, 2)))
    # Token t is the 2x2 neighbourhood at row t // 32, col t % 32: changing one patch changes one token.
    y = x.clone()
    y[0, :, 10, 21] += 1
    changed = (proj(y) - out).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [5 * 32 + 10]
    assert ConvProjector(ProjectorConfig(in_dim=8, hidden_dim=8, out_dim=8, merge=4))(
        torch.randn(1, 8, 64, 64)).shape == (1, 256, 8)
    with pytest.raises(ValueError):
        proj(torch.randn(1, 32, 63, 64))


def test_projector_mixes_across_windows_once_trained():
    """After the zero-init convs move, a token sees neighbours beyond its own 16x16 encoder window."""
    torch.manual_seed(0)
    proj = ConvProjector(ProjectorConfig(in_dim=4, hidden_dim=8, out_dim=8)).eval()
    for block in proj.blocks:
        torch.nn.init.normal_(block.conv2.weight, std=0.1)
    x = torch.randn(1, 4, 64, 64)
    y = x.clone()
    y[0, :, 15, 15] += 10  # last patch of window (0, 0)
    diff = (proj(y) - proj(x)).abs().sum(-1)[0].view(32, 32)
    assert diff[8, 8] > 0  # first token of window (1, 1) at the 32x32 grid
