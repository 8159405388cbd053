"""`--dtype auto` on CPU: the timed choice, its cache, the override, and where it applies."""

from __future__ import annotations

import json

import pytest
import torch

from tokenizer_tap import cpu
from tokenizer_tap.build import resolve_dtype


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv("TAPCHAT_AUTO_DTYPE", raising=False)  # conftest pins it for every other test


def test_the_probe_times_both_kinds_of_work_and_names_a_dtype_for_each():
    choice = cpu.probe()
    assert set(choice) == {"compute", "turn"}
    assert set(choice.values()) <= {"float32", "bfloat16"}


def test_the_choice_is_timed_once_per_machine_and_cached(unpinned, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "probe", lambda: calls.append(1) or {"compute": "float32", "turn": "bfloat16"})
    cache = tmp_path / "dtypes.json"
    assert cpu.fastest_dtype("compute", cache) is torch.float32
    assert cpu.fastest_dtype("turn", cache) is torch.bfloat16
    assert len(calls) == 1
    (key, value), = json.loads(cache.read_text()).items()
    assert cpu.cpu_name() in key and torch.__version__ in key and value["turn"] == "bfloat16"


def test_a_broken_cache_file_is_timed_again_not_an_error(unpinned, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "probe", lambda: {"compute": "bfloat16", "turn": "bfloat16"})
    cache = tmp_path / "dtypes.json"
    cache.write_text("{not json")
    assert cpu.fastest_dtype("compute", cache) is torch.bfloat16


def test_the_override_wins_and_a_bad_one_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "probe", lambda: pytest.fail("an override must not time anything"))
    monkeypatch.setenv("TAPCHAT_AUTO_DTYPE", "bfloat16")
    assert cpu.fastest_dtype("compute", tmp_path / "c.json") is torch.bfloat16
    monkeypatch.setenv("TAPCHAT_AUTO_DTYPE", "int3")
    with pytest.raises(ValueError, match="TAPCHAT_AUTO_DTYPE"):
        cpu.fastest_dtype("turn", tmp_path / "c.json")


def test_auto_on_cpu_follows_the_choice_per_kind_of_work_and_explicit_dtypes_are_kept(unpinned, monkeypatch,
                                                                                      tmp_path):
    monkeypatch.setattr(cpu, "probe", lambda: {"compute": "float32", "turn": "bfloat16"})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), work="turn") is torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16


def test_the_machine_line_names_the_cpu_and_its_flags():
    line = cpu.machine_line()
    assert cpu.cpu_name() in line and "flags" in line and torch.__version__ in line
    assert set(cpu.cpu_flags()) <= set(cpu.FLAGS)
