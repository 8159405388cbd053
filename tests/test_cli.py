"""The command line as a user runs it."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from tokenizer_tap.cli import main

EXAMPLE = "examples/scene.jpg"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenizer_tap", *args], capture_output=True, text=True)


def test_describe_tiny_prints_regions_and_writes_overlay(tmp_path):
    out = tmp_path / "overlay.png"
    res = run("describe", EXAMPLE, "--tiny", "--point", "510,270", "--box", "380,330,640,560",
              "--scribble", "175,260 170,330 176,400", "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("1. ") and "): " in lines[0]
    assert Image.open(out).size == (960, 720)


def test_describe_json(capsys):
    assert main(["describe", EXAMPLE, "--tiny", "--point", "100,100", "--neg", "120,120", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["region"] == 1 and data[0]["mask_index"] in (1, 2, 3)
    assert data[0]["prompt"]["labels"] == [1, 0]
    assert set(data[0]) >= {"concept", "concepts", "iou", "caption", "bbox", "area"}


def test_bad_inputs_give_plain_errors(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for args in (["describe", str(text), "--tiny", "--point", "1,1"],
                 ["describe", EXAMPLE, "--tiny", "--point", "5000,10"],
                 ["describe", EXAMPLE, "--checkpoint", str(tmp_path / "none.pkl"), "--point", "1,1"]):
        res = run(*args)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    for args in (["describe", EXAMPLE, "--model", "tap_vit_q", "--point", "1,1"],
                 ["describe", EXAMPLE, "--tiny", "--device", "gpu", "--point", "1,1"],
                 ["describe", EXAMPLE, "--tiny", "--dtype", "float64", "--point", "1,1"],
                 ["describe", EXAMPLE, "--tiny", "--point", "1,1", "--out", str(tmp_path / "no" / "x.png")],
                 ["describe", EXAMPLE, "--tiny", "--point", "1,1", "--out", str(tmp_path / "x.txt")]):
        res = run(*args)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, args
    res = run("describe", EXAMPLE, "--tiny", "--point", "1;2")
    assert res.returncode == 2 and "comma-separated" in res.stderr
    res = run("describe", EXAMPLE, "--tiny", "--point", "1,1", "--top-k", "0")
    assert res.returncode == 2 and ">= 1" in res.stderr


def test_convert_pkl_to_safetensors(fixture_a, tmp_path):
    dst = tmp_path / "a.safetensors"
    res = run("convert", str(fixture_a / "checkpoint.pkl"), str(dst))
    assert res.returncode == 0 and "305 tensors" in res.stdout
    res = run("convert", str(fixture_a / "checkpoint.pkl"), str(dst), "--model", "tap_vit_b")
    assert res.returncode == 2 and "wrong shape" in res.stderr


def test_demo_without_a_bundle_says_how_to_build_one(capsys):
    from assistant.engine import Assistant
    from tokenizer_tap.errors import WeightsNotFoundError
    assert main(["describe", EXAMPLE, "--demo", "--point", "1,1"]) == 2  # conftest hides any built bundle
    err = capsys.readouterr().err
    assert err.startswith("error: no demo models at ") and "`make demo-models` builds them" in err
    with pytest.raises(WeightsNotFoundError, match="make demo-models"):
        Assistant.demo()
