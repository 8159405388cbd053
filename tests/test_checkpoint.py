"""Weights loading: restricted unpickling, formats, strict key/shape reports."""

import collections
import os
import pickle

import numpy as np
import pytest
import torch

from tokenizer_tap import CheckpointError, build_tap
from tokenizer_tap.checkpoint import (
    check_state_dict,
    load_concepts,
    load_weights,
    read_state_dict,
    safe_unpickle,
    save_safetensors,
)
from tokenizer_tap.config import PRESETS
from tokenizer_tap.modeling import TAP


class _Exploit:
    """Pickles to a call of os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(collections.OrderedDict(w=_Exploit(marker))))
    with pytest.raises(CheckpointError, match="refusing to load.*system"):
        read_state_dict(evil)
    assert not marker.exists()
    # The same file really is dangerous under plain pickle (so the test is meaningful).
    pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_official_style_pickle_roundtrip(tmp_path):
    state = collections.OrderedDict(a=np.arange(6, dtype=np.float16).reshape(2, 3), n=np.array(3, dtype=np.int64))
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps(state, protocol=4))
    loaded = read_state_dict(path)
    assert loaded["a"].dtype == torch.float16 and loaded["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert loaded["n"].item() == 3


@pytest.mark.parametrize("payload", [b"", b"\x80\x04garbage", pickle.dumps([1, 2, 3])[:-3], pickle.dumps([1, 2])])
def test_corrupt_or_wrong_pickles(tmp_path, payload):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError):
        read_state_dict(path)


def test_fixture_checkpoint_loads_and_converts(fixture_a, tmp_path):
    state = read_state_dict(fixture_a / "checkpoint.pkl")
    assert len(state) == 305
    save_safetensors(state, tmp_path / "a.safetensors")
    torch.save(state, tmp_path / "a.pt")
    for path in (tmp_path / "a.safetensors", tmp_path / "a.pt"):
        again = read_state_dict(path)
        assert again.keys() == state.keys()
        assert all(torch.equal(again[k], state[k]) for k in state)
    W, names = load_concepts(fixture_a / "concepts.pkl")
    assert W.shape == (1024, 50) and names[0] == "concept_0"


def test_strict_report_names_missing_unexpected_and_misshaped():
    model = TAP(PRESETS["tap_tiny"])
    state = dict(model.state_dict())
    del state["image_decoder.iou_token.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["prompt_encoder.point_embed.weight"] = torch.zeros(4, 256)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model, state)
    msg = str(err.value)
    assert "missing (1)" in msg and "image_decoder.iou_token.weight" in msg
    assert "unexpected (1)" in msg and "extra.weight" in msg
    assert "wrong shape (1)" in msg and "file (4, 256) vs model (5, 256)" in msg


def test_wrong_model_size_hint(tmp_path):
    save_safetensors(TAP(PRESETS["tap_tiny"]).state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="another model size"):
        load_weights(TAP(PRESETS["tap_tiny"].__class__(encoder_embed_dim=128, encoder_num_heads=2,
                                                       encoder_depth=4, text_embed_dim=64, text_num_heads=1,
                                                       text_decoder_depth=2, vocab_size=384)),
                     tmp_path / "tiny.safetensors")


def test_build_from_converted_checkpoint(tmp_path):
    src = build_tap("tap_tiny", random_weights=True, seed=3, device="cpu")
    save_safetensors(src.state_dict(), tmp_path / "t.safetensors")
    loaded = build_tap("tap_tiny", tmp_path / "t.safetensors", concepts=None, device="cpu", dtype="float32")
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_restricted_unpickler_accepts_concept_format(tmp_path):
    path = tmp_path / "c.pkl"
    path.write_bytes(pickle.dumps([np.ones((4, 2), np.float32), ["a", "b"]]))
    W, names = safe_unpickle(path)
    assert W.shape == (4, 2) and names == ["a", "b"]


class _ForgedDtype:
    """An object dtype whose pickled state claims it holds no Python objects: numpy would read bytes as pointers."""

    def __reduce__(self):
        return np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0)


class _ForgedArray:
    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (1,), _ForgedDtype(), False, b"AAAAAAAA"))


class _ForgedScalar:
    def __reduce__(self):
        return np._core.multiarray.scalar, (_ForgedDtype(), b"AAAAAAAA")


class _HugeArray:
    """Asks numpy to allocate a huge array directly (a memory bomb in a few bytes)."""

    def __reduce__(self):
        return np.ndarray, ((1024, 10**7), np.dtype("f8"))


@pytest.mark.parametrize("payload,match", [
    (collections.OrderedDict(w=_ForgedArray()), "not numeric"),
    ([_ForgedArray(), ["a"]], "not numeric"),
    (collections.OrderedDict(w=_ForgedScalar()), "scalar"),
    ([_HugeArray(), ["a"]], "not a readable pickle"),
    (collections.OrderedDict(w=np.array(["text"])), "not numeric"),
    (collections.OrderedDict(w=np.array([1 + 2j])), "not numeric"),
    (collections.OrderedDict(w=np.array([1, "a"], dtype=object)), "numeric raw data|not numeric"),
])
def test_crafted_numpy_payloads_are_refused(tmp_path, payload, match):
    path = tmp_path / "crafted.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path) if isinstance(payload, dict) else load_concepts(path)


class _ShortArray:
    """Claims 4 float32 values but carries 8 bytes."""

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (4,), np.dtype("f4"), False, b"\0" * 8))


def test_array_size_must_match_its_data(tmp_path):
    path = tmp_path / "short.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(w=_ShortArray()), protocol=4))
    with pytest.raises(CheckpointError, match="does not match its data size"):
        read_state_dict(path)


def test_big_endian_and_fortran_arrays_load_correctly(tmp_path):
    state = collections.OrderedDict(be=np.arange(6, dtype=">f4").reshape(2, 3),
                                    f=np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)))
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps(state, protocol=4))
    loaded = read_state_dict(path)
    assert loaded["be"].tolist() == [[0, 1, 2], [3, 4, 5]] and loaded["f"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_corrupt_relative_position_index_is_refused(tmp_path):
    state = TAP(PRESETS["tap_tiny"]).state_dict()
    state["image_encoder.blocks.1.attn.rel_pos_embed.index"] = state[
        "image_encoder.blocks.1.attn.rel_pos_embed.index"] + 7
    save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="blocks.1.attn.rel_pos_embed.index differs"):
        load_weights(TAP(PRESETS["tap_tiny"]), tmp_path / "bad.safetensors")
