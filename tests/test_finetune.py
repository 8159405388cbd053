"""Fine-tuning: masking golden cases, data checks, collation, freezing, a step, resume equality, the stages
end to end on tiny models, and the proof that it learns (trained vs image-blind on held-out questions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from assistant.llm import load_tokenizer
from assistant.model import IMAGE_TOKEN, tokenize_with_image
from assistant.template import Turn, render
from finetune.cli import main as cli_main
from finetune.config import TrainConfig
from finetune.data import IGNORE, DataError, encode, parse_record, prepare
from finetune.model import Batch
from finetune.synthetic import make
from finetune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "finetune" / "configs" / "tiny_shapes.yaml"


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_tokenizer("tiny-phi")
    return tokenizer, (lambda text: tokenize_with_image(tokenizer, text)), tokenizer.eos_token_id


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    make(folder, train_images=300, eval_images=100, seed=1)
    return folder


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """Colour questions, by place or by clicked region: the quickest to learn from pixels (chance 1/4)."""
    folder = tmp_path_factory.mktemp("colours")
    make(folder, train_images=300, eval_images=300, seed=2, kinds=("colour", "region"))
    return folder


def config(shapes: Path, out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(TINY_CONFIG, [f"data.path={shapes / 'train.json'}", f"data.image_folder={shapes}",
                                         f"output_dir={out}", "report_to=[]", *overrides])


def rec(*turns: str, image: str | None = "a.png", rid: str = "r") -> dict:
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    return {"id": rid, **({"image": image} if image else {}), "conversations": conv}


# ------------------------------------------------------------------------------------------------ masking
@pytest.mark.parametrize(("raw", "turns", "image"), [
    (rec("<image>\nWhat is it?", "A cat."), [("What is it?", "A cat.")], True),
    (rec("<image>\nQ1?", "A1.", "Q2?", "A2 is longer."), [("Q1?", "A1."), ("Q2?", "A2 is longer.")], True),
    (rec("Hello there", "Hi.", image=None), [("Hello there", "Hi.")], False),
    (rec("What is <image> this?", "A dog."), [("What is  this?", "A dog.")], True),  # moved to the front
    (rec("No placeholder given", "Fine."), [("No placeholder given", "Fine.")], True),  # image key only
])
def test_masks_train_exactly_the_answers_and_match_the_template(tok, raw, turns, image) -> None:
    tokenizer, tokenize, eos = tok
    enc = encode(parse_record(raw, 0), tokenize, eos, stage="sft", num_visual=64, max_length=2048)
    rendered = render([Turn(q, a) for q, a in turns], image=image)
    assert enc.ids == tokenize(rendered), "piecewise tokenization equals tokenizing the whole rendered string"
    trained = [t for t in enc.labels if t != IGNORE]
    expected = [t for _, a in turns for t in [*tokenize(f" {a}"), eos]]
    assert trained == expected, "only the answers and their <|endoftext|> are trained"
    assert (IMAGE_TOKEN in enc.ids) == image and enc.positions == len(enc.ids) + (63 if image else 0)


def test_pretrain_trains_the_caption_and_newline_only(tok) -> None:
    _, tokenize, eos = tok
    enc = encode(parse_record(rec("<image>\nDescribe.", "a red circle."), 0), tokenize, eos, stage="pretrain",
                 num_visual=64, max_length=2048)
    assert enc.ids[0] == IMAGE_TOKEN and enc.labels[0] == IGNORE
    assert enc.ids[1:] == enc.labels[1:] == tokenize("a red circle.\n")


def test_long_samples_lose_final_turns_or_are_dropped_and_counted(tok, tmp_path: Path) -> None:
    _, tokenize, eos = tok
    (tmp_path / "a.png").write_bytes(b"x")
    long_answer = "word " * 300
    raws = [rec("<image>\nQ1?", "A1.", "Q2?", long_answer, rid="cut"), rec("<image>\n" + "q " * 600, "A.", rid="gone"),
            rec("<image>\nQ?", "A.", rid="ok")]
    samples, report = prepare(raws, tokenize, eos, stage="sft", num_visual=64, max_length=256,
                              image_folder=tmp_path)
    assert [s.id for s in samples] == ["cut", "ok"]
    assert report.truncated == ["cut"] and report.dropped_too_long == ["gone"]
    assert samples[0].positions <= 256 and "Q2" not in tok[0].decode([t for t in samples[0].ids if t >= 0])


@pytest.mark.parametrize(("raw", "reason"), [
    ({"id": "x"}, "non-empty list"),
    (rec("<image>\nQ", "A", "Q2"), "pairs"),
    ({"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "alternate"),
    (rec("<image>\nQ", "A", "<image>\nQ2", "A2"), "several <image>"),
    (rec("<image>\nQ", "A", image=None), "without an image"),
    (rec("Q", "   "), "empty answer"),
    ({"id": "x", "image": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "relative path"),
])
def test_malformed_records_are_refused_with_a_reason(raw, reason: str) -> None:
    with pytest.raises(DataError, match=reason):
        parse_record(raw, 0)


def test_a_leading_gpt_turn_is_dropped() -> None:
    raw = {"id": "x", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                                        {"from": "gpt", "value": "a"}]}
    assert parse_record(raw, 0).turns == (("q", "a"),)


def test_check_command_counts_everything(tmp_path: Path, capsys) -> None:
    (tmp_path / "img.png").write_bytes(b"not checked here")
    data = [rec("<image>\nQ?", "A.", image="img.png", rid="good"), rec("Q?", "A.", image=None, rid="text"),
            rec("<image>\nQ?", "A.", image="absent.png", rid="lost"), {"id": "bad", "conversations": []}]
    (tmp_path / "d.json").write_text(json.dumps(data))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {tmp_path / 'd.json'}, image_folder: {tmp_path}}}\n"
                   "model: {tap_model: tap_tiny, llm: tiny-phi, projector: {merge: 8}}\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["check", str(cfg)])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "records: 4" in out and "usable samples: 2 (1 text-only)" in out
    assert "images missing: 1" in out and "lost" in out and "malformed records: 1" in out and "bad:" in out


def test_config_overrides_and_typos(tmp_path: Path) -> None:
    c = TrainConfig.load(TINY_CONFIG, ["optim.lr=3e-4", "trainable.encoder_blocks=0", "data.path=x.json"])
    assert c.optim.lr == 3e-4 and c.trainable.encoder_blocks == 0 and c.optim.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.load(TINY_CONFIG, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="full"):
        TrainConfig.load(TINY_CONFIG, ["model.quantization=4bit", "trainable.llm=full"])
    for shipped in (ROOT / "finetune" / "configs").glob("*.yaml"):
        if not shipped.name.startswith("tap_"):  # tap_*.yaml are TAP pre-training configs (test_tap_train.py)
            TrainConfig.load(shipped, ["data.path=x.json"])  # every shipped chat config parses


# ---------------------------------------------------------------------------------------- model and steps
@pytest.fixture(scope="module")
def trainer(shapes, tmp_path_factory) -> Trainer:
    return Trainer(config(shapes, tmp_path_factory.mktemp("run"), "trainable.llm=lora", "model.lora_r=4",
                          "model.lora_alpha=8"))


def test_vision_tower_matches_what_the_assistant_sees(trainer: Trainer, shapes: Path) -> None:
    from tokenizer_tap.image_io import load_image
    from tokenizer_tap.predictor import TapPredictor
    from tokenizer_tap.transforms import preprocess
    rgb = load_image(shapes / "images" / "00000.png")
    predictor = TapPredictor.random("tap_tiny", seed=0, device="cpu")
    expected = predictor.trunk_features(predictor.set_image(rgb))
    with torch.no_grad():
        got = trainer.model.vision(torch.from_numpy(preprocess(rgb, 1024)[0])[None])
    assert torch.allclose(got, expected, atol=1e-4)


def test_exactly_the_intended_parameters_learn(trainer: Trainer) -> None:
    model = trainer.model
    batch = trainer.collate(trainer.samples[:4])
    loss, _ = model(batch)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got <= trainable
    assert any("lora_" in n for n in got) and any(n.startswith("chat.projector.") for n in got)
    assert all("lora_" in n for n in trainable if n.startswith("chat.llm."))
    encoder = {n for n, p in model.vision.tap.image_encoder.named_parameters() if p.requires_grad}
    assert len(encoder) == len([n for n in trainable if n.startswith("vision.tail.")])
    depth = len(model.vision.tap.image_encoder.blocks)
    assert encoder and all(n.startswith((f"blocks.{depth - 1}.", "norm.", "cross_conv.3.")) for n in encoder)
    assert not any(p.requires_grad for n, p in model.vision.tap.named_parameters()
                   if not n.startswith("image_encoder."))
    model.zero_grad(set_to_none=True)


def test_padding_does_not_change_the_loss(trainer: Trainer) -> None:
    """Right padding masked out, trained EOS attended: a batch's loss is the sum of its samples' losses."""
    samples = sorted(trainer.samples[:6], key=lambda s: len(s.ids))
    pair = [samples[0], samples[-1]]
    assert len(pair[0].ids) != len(pair[1].ids)
    with torch.no_grad():
        both, n_both = trainer.model(trainer.collate(pair))
        alone = [trainer.model(trainer.collate([s])) for s in pair]
    assert n_both == sum(n for _, n in alone)
    assert torch.allclose(both, sum(loss for loss, _ in alone), rtol=1e-4)


def test_one_step_moves_only_trainable_weights(shapes, tmp_path: Path) -> None:
    t = Trainer(config(shapes, tmp_path, "max_steps=1", "save_every=0"))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    after = dict(t.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(after[n].requires_grad for n in changed)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "encoder.safetensors").is_file()


def test_qlora_trains_lora_over_a_4bit_base_and_the_result_loads(shapes, tmp_path: Path) -> None:
    from assistant.engine import Assistant
    t = Trainer(config(shapes, tmp_path, "max_steps=1", "model.quantization=4bit", "trainable.llm=lora",
                       "model.lora_r=4", "model.lora_alpha=8", "trainable.encoder_blocks=0", "save_every=0"))
    llm_trainable = [n for n, p in t.model.chat.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert getattr(t.model.chat.llm.get_base_model(), "is_quantized", False)
    t.train()
    bot = Assistant.from_pretrained(tmp_path, device="cpu", dtype="float32")
    assert bot.config.lora.r == 4 and not (tmp_path / "encoder.safetensors").exists()


def test_a_killed_run_resumes_on_the_same_loss_curve(shapes, tmp_path: Path, interrupt_at_step,
                                                     loss_curve) -> None:
    common = ("max_steps=6", "save_every=3", "trainable.llm=lora", "model.lora_r=4", "model.lora_alpha=8",
              "model.lora_dropout=0.1")
    whole = Trainer(config(shapes, tmp_path / "whole", *common))
    whole.train()
    killed = Trainer(config(shapes, tmp_path / "killed", *common))
    interrupt_at_step(Trainer, 4, killed.train)
    Trainer(config(shapes, tmp_path / "killed", *common)).train(resume=True)
    a, b = loss_curve(tmp_path / "whole"), loss_curve(tmp_path / "killed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a)
    from safetensors.torch import load_file
    wa = load_file(tmp_path / "whole" / "projector.safetensors")
    wb = load_file(tmp_path / "killed" / "projector.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_unreadable_images_are_skipped_and_counted(shapes, tmp_path: Path) -> None:
    t = Trainer(config(shapes, tmp_path, "max_steps=1"))
    broken = t.samples[0]
    (tmp_path / "bad.png").write_bytes(b"corrupt")
    t.samples[0] = type(broken)(broken.id, broken.ids, broken.labels, str(tmp_path / "bad.png"), broken.positions)
    batch = t.collate(t.samples[:3])
    assert isinstance(batch, Batch) and len(batch.samples) == 2 and t.skipped_images == [broken.id]


# ---------------------------------------------------------------------------------------------- end to end
def test_stage1_then_stage2_then_own_chats_load_in_the_assistant(shapes, tmp_path: Path) -> None:
    from assistant.engine import Assistant
    from assistant.store import ChatStore
    from tokenizer_tap.prompts import Prompt

    stage1 = tmp_path / "stage1"
    Trainer(config(shapes, stage1, "stage=pretrain", f"data.path={shapes / 'captions.json'}", "max_steps=2",
                   "trainable.llm=frozen")).train()
    stage2 = tmp_path / "stage2"
    Trainer(config(shapes, stage2, f"model.init={stage1}", "max_steps=2", "trainable.llm=full")).train()

    store = ChatStore(tmp_path / "h.db", tmp_path / "images")  # a user's own chats, exported as training data
    bot = Assistant.from_pretrained(stage2, store=store, device="cpu", dtype="float32")
    conv = bot.start("me", image=str(shapes / "images" / "00001.png"))
    bot.add_region(conv, Prompt.point(120, 120))
    answer = bot.ask(conv, "What colour is <region1>?").text
    assert isinstance(answer, str)
    own = tmp_path / "own.json"
    own.write_text(json.dumps(store.export_llava("me", conv.id)))
    own_run = tmp_path / "own"
    Trainer(config(shapes, own_run, f"model.init={stage2}", f"data.path={own}",
                   f"data.image_folder={tmp_path / 'images'}", "max_steps=1", "trainable.llm=full")).train()
    assert Assistant.from_pretrained(own_run, device="cpu", dtype="float32").mode == "tapchat"
    from app.cli import models_banner
    from app.config import AppConfig
    from assistant.loading import load
    app_config = AppConfig(data_dir=tmp_path / "app", chat_checkpoint=str(own_run), device="cpu")
    app_bot, fallback = load(Assistant, app_config, store, fall_back="demo-or-tiny")  # as the app loads it
    assert models_banner(app_config, fallback) == "" and app_bot.mode == "tapchat"  # the app loads it with no edits


def test_it_learns_from_the_image(colours, tmp_path: Path) -> None:
    """Trained on the pixels it beats chance and the same model trained with the images blanked out."""
    from finetune.evaluate import accuracy
    Trainer(config(colours, tmp_path / "seeing", "epochs=5")).train()
    Trainer(config(colours, tmp_path / "blind", "epochs=5", "data.blank_images=true")).train()
    seeing = accuracy(tmp_path / "seeing", colours / "eval.json")
    blind = accuracy(tmp_path / "blind", colours / "eval.json", blank_images=True)
    print(f"seeing {seeing}\nblind {blind}")
    assert seeing["overall"] >= 0.5, seeing  # chance: 0.25
    assert seeing["overall"] >= blind["overall"] + 0.2, (seeing, blind)
