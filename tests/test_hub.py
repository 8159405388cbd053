"""Weight resolution: explicit paths, the offline hub cache, and the verified tokenizer copy."""

import shutil

import pytest

from tokenizer_tap import WeightsNotFoundError, build_tap
from tokenizer_tap import hub as hub_module
from tokenizer_tap.config import PRESETS
from tokenizer_tap.hub import checkpoint_path, concepts_path, tokenizer_path


def test_offline_missing_checkpoint_says_where_to_put_it():
    with pytest.raises(WeightsNotFoundError) as err:
        build_tap("tap_vit_b")
    msg = str(err.value)
    assert "models/tap_vit_b_v1_1.pkl" in msg and "--checkpoint" in msg and "BAAI/tokenize-anything" in msg


def test_predictor_reports_every_missing_file_at_once():
    from tokenizer_tap import TapPredictor
    with pytest.raises(WeightsNotFoundError) as err:
        TapPredictor.from_pretrained("tap_vit_h")
    msg = str(err.value)
    assert msg.startswith("3 file(s) needed by tap_vit_h are missing")
    for name in ("models/tap_vit_h_v1_1.pkl", "tokenizer.model", "concepts/merged_2560.pkl"):
        assert name in msg


def test_offline_missing_concepts_and_tokenizer():
    with pytest.raises(WeightsNotFoundError, match="concepts/lvis_1203.pkl.*--concepts"):
        concepts_path("lvis_1203")
    with pytest.raises(WeightsNotFoundError, match="tokenizer.model.*--tokenizer"):
        tokenizer_path()


def test_explicit_paths(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found at"):
        checkpoint_path(PRESETS["tap_vit_l"], tmp_path / "missing.pkl")
    with pytest.raises(WeightsNotFoundError, match="no released weights"):
        checkpoint_path(PRESETS["tap_vit_xl"])


def test_tokenizer_from_hub_is_md5_verified(monkeypatch, tmp_path, llama_tokenizer):
    good, bad = tmp_path / "good.model", tmp_path / "bad.model"
    shutil.copy(llama_tokenizer, good)
    bad.write_bytes(b"something else")
    monkeypatch.setattr(hub_module, "hub_file", lambda repo, *a: bad if repo == hub_module.TOKENIZER_REPOS[0]
                        else good)
    assert tokenizer_path() == good
    monkeypatch.setattr(hub_module, "hub_file", lambda *a: bad)
    with pytest.raises(WeightsNotFoundError, match="wrong md5"):
        tokenizer_path()


def test_hub_reachable_is_checked_quickly_and_respects_offline_and_proxies(monkeypatch) -> None:
    import socket

    from tokenizer_tap import hub

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    for offline, proxy, expected in [("1", "", False), ("0", "", False), ("0", "http://proxy:3128", True)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        hub.hub_reachable.cache_clear()
        assert hub.hub_reachable() is expected
    hub.hub_reachable.cache_clear()
