"""Architecture details that parity alone would not localise, and the caption decoder's cache logic."""

import pytest
import torch

from tokenizer_tap import TAPConfig, build_tap
from tokenizer_tap.config import PRESETS
from tokenizer_tap.modeling import TAP
from tokenizer_tap.modeling.image_encoder import relative_position_index, window_merge, window_partition


def test_relative_position_index_formula():
    index = relative_position_index(16)
    assert index.shape == (256, 256) and index.dtype == torch.int64
    assert int(index.min()) == 0 and int(index.max()) == 960
    assert bool((index.diagonal() == 480).all())
    # token (r, c) = (1, 2) against (0, 0): (1 + 15) * 31 + (2 + 15)
    assert int(index[1 * 16 + 2, 0]) == 16 * 31 + 17


def test_window_partition_order_and_inverse():
    x = torch.arange(64 * 64).view(1, 64, 64, 1).float()
    windows = window_partition(x, 16)
    assert windows.shape == (16, 256, 1)
    # window 5 = (wy 1, wx 1); its token (r, c) = (2, 3) is grid cell (18, 19)
    assert windows[5, 2 * 16 + 3, 0] == 18 * 64 + 19
    assert torch.equal(window_merge(windows, 16, 64), x)


@pytest.mark.parametrize("name,keys", [("tap_vit_b", 537), ("tap_vit_l", 705), ("tap_vit_h", 817)])
def test_released_sizes_have_official_key_counts(name, keys):
    with torch.device("meta"):
        model = TAP(PRESETS[name])
    assert len(model.state_dict()) == keys


def test_vit_b_parameter_count_matches_release():
    with torch.device("meta"):
        model = TAP(PRESETS["tap_vit_b"])
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e6, 2) == 174.55


def test_xl_is_about_0_4b_encoder():
    with torch.device("meta"):
        model = TAP(PRESETS["tap_vit_xl"])
    encoder = sum(p.numel() for p in model.image_encoder.parameters())
    assert 0.35e9 < encoder < 0.45e9
    assert PRESETS["tap_vit_xl"].hub_file == ""


def test_config_validation_messages():
    with pytest.raises(ValueError, match="multiple of 4"):
        TAPConfig(encoder_depth=6)
    with pytest.raises(ValueError, match="heads"):
        TAPConfig(encoder_embed_dim=100, encoder_num_heads=3)
    assert TAPConfig(encoder_depth=8).cross_indices == (1, 3, 5, 7)


@pytest.fixture(scope="module")
def tiny():
    return build_tap("tap_tiny", random_weights=True, seed=1, device="cpu", dtype="float32")


def test_kv_cache_generation_matches_teacher_forcing(tiny):
    torch.manual_seed(0)
    sem = torch.randn(3, 1, 256)
    buf = tiny.text_decoder.generate(sem, 1, eos_id=-1, pad_id=383, max_new_tokens=12)
    with torch.inference_mode():
        logits = tiny.text_decoder(sem, buf[:, :-1])
    assert torch.equal(logits.argmax(-1), buf[:, 1:])


def test_batched_captions_equal_single_and_stop_at_eos(tiny):
    torch.manual_seed(1)
    sem = torch.randn(5, 1, 256)
    single = torch.cat([tiny.text_decoder.generate(s[None], 1, 2, 383, 20) for s in sem])
    batched = tiny.text_decoder.generate(sem, 1, 2, 383, 20)
    assert torch.equal(single, batched)
    # With an EOS id that some rows emit early, those rows stop (pad afterwards) and leave the batch; every row
    # must still match the no-EOS run up to and including its own first EOS.
    free = tiny.text_decoder.generate(sem, 1, -1, 383, 20)
    for eos in {int(t) for t in free[:, 1:6].flatten()}:
        stopped = tiny.text_decoder.generate(sem, 1, eos, 383, 20)
        for row_free, row in zip(free, stopped):
            hits = (row_free[1:] == eos).nonzero()
            end = int(hits[0, 0]) + 2 if len(hits) else row.numel()
            assert torch.equal(row[:end], row_free[:end])
            assert bool((row[end:] == 383).all())


def test_max_new_tokens_bounds(tiny):
    sem = torch.randn(2, 1, 256)
    assert tiny.text_decoder.generate(sem, 1, 2, 383, 0).shape == (2, 1)
    assert tiny.text_decoder.generate(sem, 1, -1, 383, 1000).shape == (2, 39)  # capped by the 40-slot context
