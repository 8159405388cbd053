"""`python -m assistant`: one-shot answers, the REPL commands, merge, and plain errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from assistant.cli import main

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.fixture
def image_file(tmp_path, photo: np.ndarray):
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    return path


def test_one_shot_json_with_regions(image_file, capsys):
    code = main(["chat", str(image_file), "--tiny", "--point", "200,150", "--box", "10,10,120,90",
                 "--ask", "What is <region1>?", "--ask", "And <region2>?", "--max-new-tokens", "6", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in out["regions"]] == ["<region1>", "<region2>"]
    assert len(out["turns"]) == 2 and all(t["complete"] for t in out["turns"])


def test_the_answer_check_note_is_printed_after_the_answer(image_file, capsys, monkeypatch):
    monkeypatch.setattr("assistant.session.check_answer", lambda *a: ["TAP sees a dog here (<region1>)"])
    args = ["chat", str(image_file), "--tiny", "--point", "200,150", "--ask", "What is <region1>?",
            "--max-new-tokens", "4"]
    assert main(args) == 0
    assert capsys.readouterr().out.rstrip().endswith("\n⚠ TAP sees a dog here (<region1>)")
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["turns"][0]["note"] == "TAP sees a dog here (<region1>)"


def test_repl_commands_and_history(image_file, tmp_path, monkeypatch, capsys):
    lines = iter(["/point 200,150 -20,20", "/regions", "What is <region1>?", "/box 1,2", "/nope", "/remove 7",
                  "/history", f"/export {tmp_path / 'out.json'}", "/image /no/such/file.png", "", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code = main(["chat", str(image_file), "--tiny", "--db", str(tmp_path / "h.db"), "--owner", "ann",
                 "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("<region1>: ") >= 2  # added, then listed
    assert "a box is X1,Y1,X2,Y2 (4 comma-separated numbers)" in out and "unknown command /nope" in out
    assert "unknown region <region7>" in out and "no such file" in out
    assert "1 record(s)" in out
    record, = json.loads((tmp_path / "out.json").read_text())
    assert record["conversations"][0]["value"].startswith("<image>\n<region1>: ")


def test_repl_find_prints_each_instance_and_the_counts(cars_scene, monkeypatch, capsys):
    lines = iter(["/point 66,50", "/find cars and balloons", "/find unicorns", "/find car", "/regions", "/help",
                  "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(cars_scene), "--demo", "--demo-models", str(DEMO), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    first = out.index("found: 3 × car, 0 × balloon")
    found = out[first - 3:first]
    assert sorted(line.split()[0] for line in found) == ["<region2>", "<region3>", "<region4>"]  # after the click
    for line in found:
        ref, concept, score, box, xyxy = line.split()
        assert concept == "car" and 0.5 <= float(score) <= 1 and box == "box" and len(xyxy.split(",")) == 4
    error = out[first + 1]
    assert error.startswith("error: 'unicorns' is not in the concept vocabulary") and "closest: " in error
    again = out.index("found: 3 × car", first + 1)  # the REPL went on; the cars kept their numbers
    assert out[again - 3:again] == found
    assert sum(line.startswith("<region") and ": car (" in line for line in out) == 3  # /regions lists them once
    assert any(line.strip().startswith("/find QUERY") for line in out)  # in /help


def test_merge_command(tmp_path, capsys):
    from assistant.engine import Assistant
    bot = Assistant.tiny("tapchat")
    bot.chat.save_pretrained(tmp_path / "ckpt")
    assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "llm" / "config.json").is_file()
    assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "merged")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_user_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["chat", str(bad), "--tiny", "--ask", "hi"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["chat", "--ask", "hello", "--tiny", "--point", "1,1"]) == 2  # region without an image
    assert "add an image" in capsys.readouterr().err
    assert main(["chat", "--ask", "hi"]) == 2
    err = capsys.readouterr().err
    assert "phi-2" in err and "tap_vit_l" in err  # every missing file in one message
