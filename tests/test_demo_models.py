"""`python -m finetune demo-models`: the whole pipeline (world, chat data, TAP stages 1-2, chat stages 1-2,
evaluation, bundle) at smoke size, and a bundle that loads from anywhere as the app loads models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from app import cli as app_cli
from app.config import AppConfig
from assistant import cli as assistant_cli
from assistant.decoding import GenerationSettings
from assistant.engine import Assistant
from assistant.loading import load
from assistant.store import ChatStore
from finetune import demo
from finetune.cli import main
from finetune.demo import MAX_BUNDLE_MB
from finetune.demo_bundle import prompt
from finetune.demo_eval import TARGETS, caption_named
from finetune.demo_readme import cell
from finetune.tap.world import Annotation
from tokenizer_tap import cli as tap_cli
from tokenizer_tap.config import folder_config
from tokenizer_tap.prompts import Prompt


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("demo")
    with pytest.raises(SystemExit) as done:
        main(["demo-models", "--smoke", "--out", str(root / "bundle"), "--work", str(root / "work")])
    assert done.value.code == 0
    return root / "bundle", root / "work"


def test_bundle_holds_both_checkpoints_in_float16_within_the_size_limit(built) -> None:
    bundle, _ = built
    metrics = json.loads((bundle / "metrics.json").read_text())
    files = [p for p in bundle.rglob("*") if p.is_file()]
    packed = [p for p in files if p.name not in ("README.md", "metrics.json")]  # the size metrics.json reports
    assert sum(p.stat().st_size for p in packed) / 2**20 == pytest.approx(metrics["bundle_mb"], abs=0.01)
    assert metrics["bundle_mb"] < MAX_BUNDLE_MB
    assert {"tap/model.safetensors", "tap/text_tokenizer.model", "tap/concepts.safetensors", "chat/config.json",
            "chat/projector.safetensors", "chat/llm/model.safetensors", "chat/llm/tokenizer.json"} <= {
        str(p.relative_to(bundle)) for p in files}
    for path in bundle.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            assert {f.get_tensor(k).dtype for k in names} <= {torch.float16, torch.int64}, path
    assert json.loads((bundle / "chat" / "config.json").read_text())["tap_model"] == "../tap"


def test_metrics_and_readme_report_every_target(built) -> None:
    bundle, _ = built
    metrics = json.loads((bundle / "metrics.json").read_text())
    for key in (*TARGETS, "box_miou", "point_miou_oracle", "grid_ceiling", "answers_blind", "answers_blind_by_kind",
                "seconds", "cores", "stages", "files", "built"):
        assert key in metrics
    assert metrics["point_miou"] <= metrics["point_miou_oracle"]
    assert set(metrics["point_miou_by_kind"]) <= {"one-piece object", "object made of parts", "part", "stuff"}
    assert set(metrics["seconds"]) == {"world", "tap_stage1", "tap_stage2", "tap_decoder", "tap_iou", "chat_stage1",
                                       "chat_stage2", "evaluate"}
    assert set(metrics["answers_by_kind"]) == {"overall", "colour", "count", "position", "relation", "region"}
    readme = (bundle / "README.md").read_text()
    assert "not on photos" in readme and "smoke size" in readme
    assert f"| point-click mIoU | {metrics['point_miou']:.3f} |  | >= 0.7 |" in readme
    assert (f"| short answers, exact match (colour, count, position) | {metrics['answers']:.3f} | "
            f"{metrics['answers_blind']:.3f} | >= 0.7 |") in readme
    assert "region questions (the answer is written in the prompt's region line)" in readme
    assert "label-supervised priors" in readme and "not CLIP" in readme
    assert all(f"- `{stage}` (config sha256 " in readme for stage in metrics["stages"])
    assert f"(ceiling) | {metrics['grid_ceiling']:.3f} |  |  |" in readme
    examples = json.loads((bundle / "gallery" / "examples.json").read_text())
    assert [g["image"] for g in metrics["gallery"]] == [e["image"] for e in examples]
    for g in metrics["gallery"]:  # what the app said on each gallery scene, in the README's table
        assert f"| {g['image']} | {g['concept']} ({g['colour']}) | {cell(g['chip'])} |" in readme


def test_bundle_loads_from_another_folder_as_the_app_loads_it(built, tmp_path, monkeypatch) -> None:
    bundle, work = built
    monkeypatch.chdir(tmp_path)  # ../tap is read beside the chat folder, not from the working directory
    bot = Assistant.from_pretrained(bundle / "chat", device="cpu", dtype="float32")
    assert bot.predictor.model.config == folder_config(bundle / "tap")
    assert next(bot.predictor.model.parameters()).dtype == torch.float32
    assert len(bot.chat.tokenizer) == len(json.loads((work / "world" / "tokenizer.json").read_text())
                                          ["model"]["vocab"])
    image = np.asarray(Image.open(next((work / "world" / "eval").glob("sa_*.jpg"))).convert("RGB"))
    conv = bot.start(image=image)
    bot.add_region(conv, Prompt.point(60, 100))
    reply = bot.ask(conv, "What colour is <region1>?", GenerationSettings(max_new_tokens=4))
    assert isinstance(reply.text, str)


def test_where_weights_are_absent_every_front_end_runs_the_demo_models_and_says_so(built, tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    bundle, work = built
    monkeypatch.setenv("TAPCHAT_DEMO_MODELS", str(bundle))
    config = AppConfig(data_dir=tmp_path)  # HF is offline with an empty cache in the tests
    store = ChatStore(config.db_path, config.image_dir)
    bot, fallback = load(Assistant, config, store, fall_back="demo-or-tiny")
    banner = app_cli.models_banner(config, fallback)
    assert banner.startswith("**Model weights not found**") and "demo models" in banner and "not on photos" in banner
    assert "are missing)." in banner  # the reason reads as a sentence; the list of files goes to the log
    assert bot.config.tap_model == "../tap" and bot.config.llm == "tiny-phi"
    monkeypatch.delenv("TAPCHAT_DEMO_MODELS")  # --demo-models names the bundle as well
    config = AppConfig(data_dir=tmp_path, demo=True, demo_models=bundle)
    bot, fallback = load(Assistant, config, store, fall_back="demo-or-tiny")
    assert fallback is None and app_cli.models_banner(config, fallback) == app_cli.DEMO_BANNER
    monkeypatch.setenv("TAPCHAT_DEMO_MODELS", str(bundle))
    image = str(next((work / "world" / "eval").glob("sa_*.jpg")))
    capsys.readouterr()
    assert tap_cli.main(["describe", image, "--point", "60,100", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "running the demo TAP" in out.err and out.out.startswith("1. ")
    assert assistant_cli.main(["chat", image, "--point", "60,100", "--ask", "What colour is <region1>?",
                               "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "running the demo models" in capsys.readouterr().err


def test_gallery_holds_held_out_scenes_with_a_click_and_a_known_answer(built, tmp_path, monkeypatch) -> None:
    bundle, _ = built
    items = json.loads((bundle / "gallery" / "examples.json").read_text())
    assert len(items) == 4 and len({e["concept"] for e in items}) == 4
    for e in items:
        image = np.asarray(Image.open(bundle / "gallery" / e["image"]).convert("RGB"))
        (kind, xy), = e["regions"][0].items()
        assert image.shape == (256, 256, 3) and kind in ("point", "box")
        assert all(0 <= v <= 256 for v in xy) and (kind == "point" or (xy[0] < xy[2] and xy[1] < xy[3]))
        assert int(e["image"].removeprefix("scene_").removesuffix(".jpg")) > 1_000_000  # an eval-split id
        assert e["question"] == "What colour is <region1>?" and e["answer"]
    monkeypatch.setenv("TAPCHAT_DEMO_MODELS", str(bundle))
    seen = {}
    monkeypatch.setattr(app_cli.ui, "build", lambda service, **kw: seen.update(kw) or gr.Blocks())
    app_cli.build_app(AppConfig(data_dir=tmp_path, demo=True))
    assert seen["gallery"] == bundle / "gallery"
    shown = app_cli.ui.load_examples(seen["gallery"])
    assert [e["question"] for e in shown[:4]] == [e["question"] for e in items] and len(shown) > 4


def test_gallery_clicks_a_one_piece_object_and_boxes_one_made_of_parts() -> None:
    mask = np.zeros((16, 16), bool)
    mask[4:8, 2:10] = True
    sun = Annotation(1, "sun", "yellow", "object", mask)
    x, y = prompt(sun)["point"]
    assert [x, y] == [round(v) for v in sun.point()] and mask[y, x]
    house = Annotation(2, "house", "red", "object", mask, parts=[3, 4])
    assert prompt(house) == {"box": [2, 4, 10, 8]}


def test_each_stage_names_as_inputs_the_earlier_stages_whose_outputs_it_reads() -> None:
    """`--reuse` retrains a stage when one of its inputs trained again, so its inputs must be exactly the stage
    folders its overrides read, each run before it."""
    names = [stage.name for stage in demo.STAGES]
    for i, stage in enumerate(demo.STAGES):
        read = {v.removeprefix("{work}/") for v in stage.overrides.values() if v.startswith("{work}/")}
        assert read == set(stage.inputs) and set(stage.inputs) <= set(names[:i]), stage.name
        assert demo.stage_config(stage.name).is_file()
    assert set(demo.PACKED) <= set(names)


def test_reuse_keeps_finished_stages_and_their_times(built, capsys, monkeypatch, tmp_path) -> None:
    bundle, work = built
    first = json.loads((bundle / "metrics.json").read_text())["seconds"]
    with pytest.raises(SystemExit) as done:
        main(["demo-models", "--smoke", "--reuse", "--out", str(bundle.parent / "again"), "--work", str(work)])
    assert done.value.code == 0
    again = json.loads((bundle.parent / "again" / "metrics.json").read_text())["seconds"]
    stages = ("tap_stage1", "tap_stage2", "tap_decoder", "tap_iou", "chat_stage1", "chat_stage2")
    assert {k: again[k] for k in stages} == {k: first[k] for k in stages}
    out = capsys.readouterr().out
    assert all(f"demo-models: {stage} reused" in out for stage in stages)
    configs = tmp_path / "configs"  # chat stage 1's config edited: it and what learnt from it train again
    shutil.copytree(demo.CONFIGS, configs)
    with (configs / "demo_chat_stage1.yaml").open("a") as f:
        f.write("# edited\n")
    monkeypatch.setattr(demo, "CONFIGS", configs)
    with pytest.raises(SystemExit) as done:
        main(["demo-models", "--smoke", "--reuse", "--out", str(bundle.parent / "again"), "--work", str(work)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "tap_stage2 reused" in out and "chat_stage1 reused" not in out and "chat_stage2 reused" not in out
    assert "tap_decoder reused" in out and "tap_iou reused" in out  # they learn from TAP stage 2 alone
    assert (work / "chat_stage2" / "FINISHED.json").is_file()
    (work / "tap_stage2" / "FINISHED.json").unlink()  # everything downstream of TAP stage 2 trains again
    with pytest.raises(SystemExit) as done:
        main(["demo-models", "--smoke", "--reuse", "--out", str(bundle.parent / "again"), "--work", str(work)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "tap_stage1 reused" in out and not any(f"{s} reused" in out for s in stages[1:])


def test_size_128_builds_tap_at_128_px_and_keeps_the_chat_models_8_by_8_tokens(built, capsys) -> None:
    _, work = built  # stages finished at the default 256 px: a 128 px build reuses none of them
    out = work.parent / "bundle128"
    with pytest.raises(SystemExit) as done:
        main(["demo-models", "--smoke", "--size", "128", "--reuse", "--out", str(out), "--work", str(work)])
    assert done.value.code == 0
    assert " reused" not in capsys.readouterr().out
    assert folder_config(out / "tap").image_size == 128
    chat = json.loads((out / "chat" / "config.json").read_text())
    assert chat["projector"]["merge"] == 1
    assert Image.open(next((work / "world" / "train").glob("*.jpg"))).size == (128, 128)
    assert json.loads((out / "metrics.json").read_text())["recipe"]["size"] == 128


@pytest.mark.parametrize(("caption", "obj", "named"), [
    ("a red car left of a house", {"concept": "car", "colour": "red"}, True),
    ("a blue car", {"concept": "car", "colour": "red"}, False),
    ("the head of a person in red", {"concept": "head", "colour": None}, True),
    ("a red carpet", {"concept": "car", "colour": "red"}, False),
])
def test_a_caption_names_its_region_by_whole_words(caption, obj, named) -> None:
    assert caption_named(caption, obj) is named


def test_verify_passes_on_a_fresh_bundle_and_names_each_thing_changed_after_packing(built, tmp_path, monkeypatch,
                                                                                   capsys) -> None:
    bundle, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    assert main_code(["demo-models", "--verify", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"{copy}: verified"
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["box_miou"] += 0.05  # a figure claimed beyond what the files score
    (copy / "metrics.json").write_text(json.dumps(metrics, indent=1))
    config = json.loads((copy / "chat" / "config.json").read_text())
    config["max_context"] -= 1  # a packed file edited by hand
    (copy / "chat" / "config.json").write_text(json.dumps(config))
    with (copy / "README.md").open("a") as f:
        f.write("hand-written\n")
    configs = tmp_path / "configs"  # a stage config changed since the build
    shutil.copytree(demo.CONFIGS, configs)
    with (configs / "tap_world_iou.yaml").open("a") as f:
        f.write("# edited\n")
    monkeypatch.setattr(demo, "CONFIGS", configs)
    assert main_code(["demo-models", "--verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "box_miou: metrics.json says" in err
    assert "chat/config.json: changed since packing" in err
    assert "README.md: differs from the README its metrics.json writes" in err
    assert "tap_iou: built with" in err and "tap_stage1: built with" not in err


def test_verify_refuses_a_bundle_packed_without_provenance(built, tmp_path, capsys) -> None:
    bundle, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    del metrics["stages"]
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert main_code(["demo-models", "--verify", str(copy)]) == 1
    assert "records no stage provenance" in capsys.readouterr().err


class Stopped(Exception):
    """Stands for a build stopped from outside (a session's end, Ctrl-C) right after a checkpoint."""


def test_a_stopped_stage_resumes_from_its_checkpoint_and_the_readme_says_so(built, tmp_path, monkeypatch) -> None:
    from finetune.loop import TrainLoop
    _, work = built
    configs = tmp_path / "configs"  # the IoU refit saves a checkpoint after its first step
    shutil.copytree(demo.CONFIGS, configs)
    text = (configs / "tap_world_iou.yaml").read_text()
    (configs / "tap_world_iou.yaml").write_text(text.replace("save_every: 500", "save_every: 1"))
    monkeypatch.setattr(demo, "CONFIGS", configs)
    save = TrainLoop.save_checkpoint

    def save_then_stop(self, epoch: int, micro: int):
        save(self, epoch, micro)
        raise Stopped

    monkeypatch.setattr(TrainLoop, "save_checkpoint", save_then_stop)
    recipe = demo.Recipe.smoke()
    with pytest.raises(Stopped):
        demo.build(tmp_path / "bundle", work, recipe, reuse=True)
    assert not (work / "tap_iou" / demo.FINISHED).exists()
    monkeypatch.setattr(TrainLoop, "save_checkpoint", save)
    metrics = demo.build(tmp_path / "bundle", work, recipe, reuse=True, command="demo-models --smoke --reuse")
    first, second = metrics["stages"]["tap_iou"]["runs"]
    assert (first["from_step"], first["to_step"], first["stopped"]) == (0, 1, True)
    assert (second["from_step"], second["to_step"], second["stopped"]) == (1, None, False)
    assert metrics["stages"]["tap_stage1"]["runs"] == json.loads(
        (work / "tap_stage1" / demo.FINISHED).read_text())["runs"]  # reused: the runs of the build that trained it
    readme = (tmp_path / "bundle" / "README.md").read_text()
    assert "resumed from its step-1 checkpoint to the end" in readme and "(stopped)" in readme
    assert "`demo-models --smoke --reuse`, packed at commit " in readme


def main_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code
