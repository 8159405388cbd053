"""TAP checkpoint folders (what `tap-train` writes) load everywhere and convert to the official layout; the encoder's
named trunk API is the one forward pass the predictor and the chat vision tower share; regularisation is train-only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer_tap.build import TINY_TOKENIZER, build_tap
from tokenizer_tap.checkpoint import read_state_dict, save_pretrained
from tokenizer_tap.cli import main as tap_cli
from tokenizer_tap.config import get_config
from tokenizer_tap.errors import CheckpointError
from tokenizer_tap.modeling import TAP
from tokenizer_tap.predictor import TapPredictor
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.transforms import preprocess

IMAGE = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
PROMPTS = [Prompt.point(40, 50), Prompt.from_box(10, 10, 100, 90)]


def describe(predictor: TapPredictor) -> list[tuple]:
    predictor.set_image(IMAGE)
    return [(r.mask.sum(), round(r.iou, 5), r.concepts, r.caption) for r in predictor.predict(PROMPTS)]


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, TapPredictor]:
    predictor = TapPredictor.random("tap_tiny", seed=3, device="cpu", dtype="float32")
    cp = predictor.model.concept_projector
    save_pretrained(predictor.model, tmp_path / "tap", TINY_TOKENIZER, (cp.weights.numpy(), cp.names))
    return tmp_path / "tap", predictor


def test_a_saved_folder_loads_with_the_same_outputs(folder) -> None:
    path, original = folder
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "text_tokenizer.model",
                                                "concepts.safetensors"}
    assert json.loads((path / "config.json").read_text())["model"]["name"] == "tap_tiny"
    for loaded in (TapPredictor.from_pretrained(str(path), device="cpu", dtype="float32"),
                   TapPredictor.from_pretrained("tap_vit_l", path, device="cpu", dtype="float32")):
        assert describe(loaded) == describe(original)


def test_the_assistant_and_the_chat_trainer_take_a_folder(folder) -> None:
    from assistant.engine import Assistant
    path, original = folder
    bot = Assistant.from_pretrained(None, tap_model="tap_tiny", tap_checkpoint=str(path), llm="tiny-phi",
                                    device="cpu", dtype="float32")
    assert describe(bot.predictor) == describe(original)
    assert get_config(path).name == "tap_tiny"
    tap = build_tap("tap_tiny", path, concepts=None, device="cpu", dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(tap.state_dict().values(),
                                                 original.model.state_dict().values()))


def test_convert_round_trips_through_the_official_pickle(folder, tmp_path: Path) -> None:
    path, original = folder
    assert tap_cli(["convert", str(path), str(tmp_path / "mine.pkl")]) == 0
    state = read_state_dict(tmp_path / "mine.pkl")
    assert set(state) == set(original.model.state_dict())
    assert state["image_encoder.pos_embed.weight"].dtype == torch.float16  # the official fp16 layout
    assert state["image_encoder.blocks.0.attn.rel_pos_embed.index"].dtype == torch.int64
    assert tap_cli(["convert", str(tmp_path / "mine.pkl"), str(tmp_path / "again"), "--model", "tap_tiny",
                    "--tokenizer", str(TINY_TOKENIZER)]) == 0
    again = build_tap("tap_tiny", tmp_path / "again", concepts=None, device="cpu", dtype="float32")
    for key, value in original.model.state_dict().items():
        expect = value.half().float() if value.is_floating_point() else value
        assert torch.equal(again.state_dict()[key].float(), expect.float()), key


def test_bad_folders_give_plain_errors(folder, tmp_path: Path) -> None:
    path, _ = folder
    with pytest.raises(ValueError, match="not a TAP checkpoint folder"):
        get_config(tmp_path)  # a folder without config.json
    config = json.loads((path / "config.json").read_text())
    config["model"]["encoder_embed_dim"] = 96
    config["model"]["encoder_num_heads"] = 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong shape"):
        TapPredictor.from_pretrained(str(path), device="cpu", dtype="float32")


def test_the_trunk_api_is_the_forward_pass_the_predictor_and_vision_tower_share() -> None:
    from finetune.vision import VisionTower
    predictor = TapPredictor.random("tap_tiny", seed=1, device="cpu", dtype="float32")
    key = predictor.set_image(IMAGE)
    model = predictor.model
    batch, _ = preprocess(IMAGE, 1024)
    images = torch.from_numpy(batch)[None]
    taps: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        features = model.get_features(images, taps)
        last = f"cross_conv{len(model.config.cross_indices) - 1}"
        assert torch.allclose(predictor.trunk_features(key), taps[last].permute(0, 3, 1, 2), atol=1e-5)
        assert torch.allclose(predictor._current(key).features, features, atol=1e-5)
        for k in (0, 1):
            tower = VisionTower(model, trainable_blocks=k)
            assert torch.allclose(tower(images), predictor.trunk_features(key), atol=1e-5)


def test_drop_path_and_dropout_act_only_in_training() -> None:
    config = dataclasses.replace(get_config("tap_tiny"), image_size=128, window_size=8, drop_path=0.5,
                                 decoder_dropout=0.5, text_dropout=0.5)
    torch.manual_seed(0)
    tap = TAP(config)
    plain = TAP(dataclasses.replace(config, drop_path=0.0, decoder_dropout=0.0, text_dropout=0.0))
    plain.load_state_dict(tap.state_dict())
    x = torch.randint(0, 255, (1, 128, 128, 3), dtype=torch.uint8)
    points = torch.tensor([[[30.0, 40.0, 1.0], [0.0, 0.0, 4.0]]])
    tokens = torch.tensor([[1, 5, 9]])
    tap.eval(), plain.eval()
    with torch.no_grad():
        f1, f2 = tap.get_features(x), plain.get_features(x)
        assert torch.equal(f1, f2)
        o1, o2 = tap.get_outputs(f1, points), plain.get_outputs(f2, points)
        assert torch.equal(o1["mask_pred"], o2["mask_pred"])
        assert torch.equal(tap.text_decoder(o1["sem_tokens"][:, 0], tokens),
                           plain.text_decoder(o2["sem_tokens"][:, 0], tokens))
        tap.train()
        assert not torch.equal(tap.image_encoder(tap.normalize(x)), plain.image_encoder(plain.normalize(x)))
        assert not torch.equal(tap.get_outputs(f1, points)["mask_pred"], o1["mask_pred"])
        assert not torch.equal(tap.text_decoder(o1["sem_tokens"][:, 0], tokens),
                               plain.text_decoder(o2["sem_tokens"][:, 0], tokens))
