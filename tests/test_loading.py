"""`assistant.loading`: the one loader every front end uses, its fallbacks, `--demo-models`, and the aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import cli as app_cli
from assistant import cli as assistant_cli
from assistant.engine import Assistant
from assistant.loading import Fallback, LoadOptions, load
from assistant.store import ChatStore
from tokenizer_tap import cli as tap_cli
from tokenizer_tap.errors import WeightsNotFoundError
from tokenizer_tap.hub import demo_models_folder

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "scene.jpg")


def test_every_front_end_names_the_models_with_the_same_options(tmp_path: Path) -> None:
    args = assistant_cli.build_parser().parse_args(["chat", "--tiny", "--mode", "grounded", "--checkpoint", "runs/x",
                                                    "--demo-models", str(tmp_path), "--dtype", "float32"])
    assert LoadOptions.of(args) == LoadOptions(tiny=True, mode="grounded", chat_checkpoint="runs/x",
                                               demo_models=tmp_path, dtype="float32")
    config = app_cli.parse_args(["--demo", "--demo-models", str(tmp_path), "--llm", "some/llm", "--device", "cpu"])
    assert LoadOptions.of(config) == LoadOptions(demo=True, demo_models=tmp_path, llm="some/llm", device="cpu")
    assert LoadOptions.of(LoadOptions(tiny=True)) == LoadOptions(tiny=True)


def test_where_weights_are_absent_load_does_what_it_is_told(tmp_path: Path) -> None:
    # HF is offline with an empty cache and conftest hides any demo bundle
    with pytest.raises(WeightsNotFoundError) as never:
        load(Assistant, LoadOptions())
    assert "tap_vit_l" in str(never.value) and "microsoft/phi-2" in str(never.value)  # every missing file at once
    with pytest.raises(WeightsNotFoundError):  # the command line: no bundle, so the error, not random weights
        load(Assistant, LoadOptions(), fall_back="demo")
    store = ChatStore(tmp_path / "h.db", tmp_path / "images")
    bot, fallback = load(Assistant, LoadOptions(), store, fall_back="demo-or-tiny")  # the app: a page that opens
    assert fallback == Fallback("tiny", str(never.value).splitlines()[0].rstrip(":"))
    assert bot.config.llm == "tiny-phi" and bot.store is store


def test_demo_models_names_the_bundle_before_the_environment(tmp_path: Path, monkeypatch, capsys) -> None:
    named, environment = tmp_path / "named", tmp_path / "environment"
    monkeypatch.setenv("TAPCHAT_DEMO_MODELS", str(environment))
    assert demo_models_folder(named) == named and demo_models_folder() == environment
    with pytest.raises(WeightsNotFoundError, match=f"no demo models at {named} "):
        load(Assistant, LoadOptions(demo=True, demo_models=named))
    with pytest.raises(WeightsNotFoundError, match=f"no demo models at {environment} "):
        Assistant.demo()
    assert assistant_cli.main(["chat", "--demo", "--demo-models", str(named), "--ask", "hi"]) == 2
    assert tap_cli.main(["describe", EXAMPLE, "--demo", "--demo-models", str(named), "--point", "1,1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == [f"error: no demo models at {named}"] * 2


def test_tiny_models_cannot_run_on_an_llm_server() -> None:
    with pytest.raises(ValueError, match="--llm-server needs a checkpoint folder"):
        load(Assistant, LoadOptions(tiny=True, llm_server="http://localhost:8000/v1"))


def test_the_aliases_build_the_class_they_are_called_on() -> None:
    class Custom(Assistant):
        pass

    bot = Custom.tiny("grounded", lora=False, model_id="mine")
    assert type(bot) is Custom and bot.mode == "grounded" and bot.model_id == "mine"
    assert type(Custom.from_options(LoadOptions(tiny=True))) is Custom
