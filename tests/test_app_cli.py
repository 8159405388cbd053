"""`python -m app`: options, the startup line, and starting offline without weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import cli
from app.config import AppConfig
from assistant.engine import Assistant
from assistant.loading import load
from assistant.store import ChatStore


def test_options_become_the_config(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("carol:pw3\n")
    config = cli.parse_args(["--host", "0.0.0.0", "--port", "8080", "--data-dir", str(tmp_path), "--db",
                             str(tmp_path / "h.db"), "--auth", "alice:pw1", "--auth-file", str(users), "--tiny",
                             "--llm", "some/llm", "--chat-checkpoint", "runs/x", "--tap-model", "tap_vit_b",
                             "--share", "--quantization", "4bit"])
    assert (config.host, config.port, config.tiny, config.share) == ("0.0.0.0", 8080, True, True)
    assert config.auth == [("alice", "pw1"), ("carol", "pw3")]
    assert config.db_path == tmp_path / "h.db" and config.image_dir == tmp_path / "images"
    assert (config.llm, config.chat_checkpoint, config.tap_model, config.quantization) == (
        "some/llm", "runs/x", "tap_vit_b", "4bit")
    with pytest.raises(SystemExit):
        cli.parse_args(["--auth", "no-password"])


def test_offline_without_weights_or_demo_models_starts_on_tiny_models_and_says_so(tmp_path: Path) -> None:
    # conftest hides any demo bundle (with one: tests/test_demo_models.py)
    config = AppConfig(data_dir=tmp_path)  # HF is offline with an empty cache in the tests
    bot, fallback = load(Assistant, config, ChatStore(config.db_path, config.image_dir), fall_back="demo-or-tiny")
    banner = cli.models_banner(config, fallback)
    assert banner.startswith("**Model weights not found**") and "make demo-models" in banner
    assert bot.config.llm == "tiny-phi"


def test_startup_line_names_models_and_history(tmp_path: Path, monkeypatch, capsys) -> None:
    launched = []
    monkeypatch.setattr(cli, "launch", lambda demo, config: launched.append(config))
    cli.main(["--tiny", "--data-dir", str(tmp_path), "--port", "7999"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("TAP-Chat: TAP tap_tiny + tiny-phi (tapchat mode)")
    assert str(tmp_path / "history.db") in line and "http://127.0.0.1:7999" in line
    assert launched and launched[0].port == 7999
