"""Weight-only int8 / int4 on CPU (`--quantization int8|int4`, assistant/quantize.py): the layer against the float
one, whole models against bf16, LoRA kept in its precision, the quantized folder that loads without quantising
again, every front end's option, the combinations refused, and greedy answers of a model trained here."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import PhiForCausalLM

from assistant import quantize
from assistant.cli import main as assistant_main
from assistant.config import ChatConfig
from assistant.engine import Assistant
from assistant.llm import TINY_LLM, LoraSettings, TinyPhi, load_llm, load_tokenizer
from assistant.loading import LoadOptions, load
from assistant.model import ChatModel, merge_checkpoint
from assistant.projector import ProjectorConfig
from assistant.quantize import QuantScheme, WeightOnlyLinear, quantize_llm, scheme_of


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


# ------------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize(("kind", "group", "bound"), [("int8", 128, 0.01), ("int4", 32, 0.09), ("int4", 128, 0.09)])
def test_a_quantized_layer_computes_the_float_layer(kind: str, group: int, bound: float, monkeypatch) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192)
    layer = WeightOnlyLinear.of(linear, kind, group)
    assert (layer.bits, layer.group_size) == ((8, 0) if kind == "int8" else (4, group))
    x = torch.randn(2, 5, 256)
    with torch.inference_mode():
        out, ref = layer(x), linear(x)
        assert out.dtype == torch.float32 and layer(x.bfloat16()).dtype == torch.bfloat16  # the caller's dtype
        assert relative_error(out, ref) < bound
        many = torch.randn(quantize.DEQUANT_ROWS[layer.bits] + 1, 256)  # a prefill: dequantised, then a matmul
        dequantised = layer(many)
        monkeypatch.setitem(quantize.DEQUANT_ROWS, layer.bits, 1 << 30)
        assert relative_error(dequantised, layer(many)) < 0.01  # the kernel, up to bf16 rounding
    layer.to(torch.float64)  # casting a model casts the bias; codes and scales keep the kernels' dtypes
    assert layer.bias.dtype == torch.float64 and {b.dtype for n, b in layer.named_buffers() if n != "bias"} <= {
        torch.int8, torch.uint8, torch.bfloat16}


def test_a_prefill_with_gradients_does_not_share_the_dequantised_weight() -> None:
    """Without autograd a prefill dequantises into one reused buffer; with it, each layer keeps its own weight for
    the backward pass (LoRA over a quantized base)."""
    torch.manual_seed(0)
    first, second = (WeightOnlyLinear.of(torch.nn.Linear(64, 64), "int8", 64) for _ in range(2))
    x = torch.randn(quantize.DEQUANT_ROWS[8] + 1, 64, requires_grad=True)
    out = first(x)
    second(x.detach())  # another layer dequantises meanwhile
    out.sum().backward()
    expected = first.dequantized().float().sum(0).expand_as(x)
    assert relative_error(x.grad, expected) < 0.01


def test_the_state_dict_is_portable_and_loads_back() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = WeightOnlyLinear.of(linear, "int4", 32)
    state = layer.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        "qweight": ((64, 64), torch.uint8), "scales": ((64, 4), torch.bfloat16), "zeros": ((64, 4), torch.bfloat16),
        "bias": ((64,), torch.float32)}
    # two codes per byte, the even input in the low nibble, weight = (code - 8) * scale + zero
    codes = torch.stack([state["qweight"] & 15, state["qweight"] >> 4], -1).view(64, 4, 32).float()
    weight = ((codes - 8) * state["scales"].float()[..., None] + state["zeros"].float()[..., None]).view(64, 128)
    assert relative_error(weight, linear.weight) < 0.09
    again = WeightOnlyLinear(128, 64, bits=4, group_size=32)
    again.load_state_dict(state)
    x = torch.randn(3, 128)
    assert torch.equal(again(x), layer(x))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())


def test_shapes_the_int4_kernel_cannot_take_are_int8() -> None:
    assert WeightOnlyLinear.of(torch.nn.Linear(64, 994), "int4", 64).bits == 8  # outputs: not a multiple of 64
    assert WeightOnlyLinear.of(torch.nn.Linear(80, 64), "int4", 64).bits == 8  # inputs: no group size divides
    assert WeightOnlyLinear.of(torch.nn.Linear(320, 64), "int4", 128).group_size == 64  # the largest that divides
    with pytest.raises(ValueError, match="group size"):
        QuantScheme("int4", group_size=48)


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("shape", [TinyPhi(), TinyPhi(hidden_size=640, intermediate_size=2560, num_attention_heads=8)])
def test_quantized_models_stay_close_to_the_full_model(shape: TinyPhi) -> None:
    ids = torch.randint(0, 576, (2, 24), generator=torch.Generator().manual_seed(0))
    full = logits(load_llm(TINY_LLM, vocab_size=576, tiny=shape), ids)

    def error(**kwargs) -> float:
        return relative_error(logits(load_llm(TINY_LLM, vocab_size=576, tiny=shape, **kwargs), ids), full)
    errors = {"bf16": error(dtype=torch.bfloat16), "int8": error(quantization="int8"),
              "int4": error(quantization="int4")}
    assert errors["bf16"] < 0.01 and errors["int8"] < 0.03 and errors["int4"] < 0.25, errors
    model = load_llm(TINY_LLM, vocab_size=576, tiny=shape, quantization="int4")
    kinds = {name.rsplit(".", 1)[-1]: m.bits for name, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert kinds == {"q_proj": 4, "k_proj": 4, "v_proj": 4, "dense": 4, "fc1": 4, "fc2": 4, "lm_head": 8}
    assert model.model.embed_tokens.weight.dtype == torch.float32 and scheme_of(model) == QuantScheme("int4")


def tiny_config(lora: bool = True) -> ChatConfig:
    return ChatConfig(mode="tapchat", tap_model="tap_tiny", llm=TINY_LLM,
                      projector=ProjectorConfig(in_dim=64, hidden_dim=64, out_dim=64),
                      lora=LoraSettings(r=8, alpha=16) if lora else None)


def with_trained_lora(chat: ChatModel) -> ChatModel:
    """Non-zero LoRA B matrices, so that the adapter changes the outputs."""
    torch.manual_seed(1)
    for name, p in chat.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return chat


def test_lora_keeps_its_precision_and_only_base_layers_are_quantized(tmp_path: Path) -> None:
    source = with_trained_lora(ChatModel.create(tiny_config()))
    source.save_pretrained(tmp_path / "ckpt")
    chat = ChatModel.from_pretrained(tmp_path / "ckpt", quantization="int8")
    wrapper = chat.llm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapper.base_layer, WeightOnlyLinear)
    assert type(wrapper.lora_A["default"]) is torch.nn.Linear and wrapper.lora_B["default"].weight.dtype == (
        torch.float32)
    assert torch.equal(wrapper.lora_B["default"].weight, source.llm.base_model.model.model.layers[0].self_attn
                       .q_proj.lora_B["default"].weight)
    assert not any(isinstance(m, WeightOnlyLinear) for m in chat.projector.modules())  # not part of the LLM
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    adapted, plain = logits(source.llm, ids), logits(source.base_llm(), ids)
    assert relative_error(logits(chat.llm, ids), adapted) < 0.3 * relative_error(plain, adapted)  # LoRA is applied
    with pytest.raises(ValueError, match="quantized"):
        chat.merged()
    with pytest.raises(ValueError, match="python -m assistant quantize"):
        chat.base_llm()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_folder_loads_as_saved_without_quantising_again(kind: str, tmp_path: Path, monkeypatch) -> None:
    with_trained_lora(ChatModel.create(tiny_config())).save_pretrained(tmp_path / "ckpt")
    assert assistant_main(["quantize", str(tmp_path / "ckpt"), str(tmp_path / kind), "--quantization", kind,
                           "--group-size", "32"]) == 0
    folder = tmp_path / kind
    expected = ChatModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).merged()  # what the command did
    quantize_llm(expected.llm, QuantScheme(kind, group_size=32))
    assert not (folder / "adapter").exists() and ChatConfig.load(folder).lora is None
    marker = json.loads((folder / "llm" / "config.json").read_text())["quantization_config"]
    assert marker == {"quant_method": "tapchat-weight-only", "kind": kind, "group_size": 32, "head": "int8"}
    with safe_open(str(folder / "llm" / quantize.WEIGHTS), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - not a dict
    assert stored["model.layers.0.mlp.fc1.qweight"] == ("I8" if kind == "int8" else "U8")
    assert stored["lm_head.qweight"] == "I8" and "model.layers.0.mlp.fc1.weight" not in stored

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized folder must load without quantising again")
    for name in ("quantize_llm", "quantize_int8", "quantize_int4"):
        monkeypatch.setattr(quantize, name, refuse)
    monkeypatch.setattr(quantize.WeightOnlyLinear, "of", refuse)
    loaded = ChatModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert scheme_of(loaded.llm) == QuantScheme(kind, group_size=32)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded.llm, ids), logits(expected.llm, ids))
    projector = "projector.safetensors"  # not part of the LLM: copied in its own precision
    assert (folder / projector).read_bytes() == (tmp_path / "ckpt" / projector).read_bytes()
    assert ChatModel.from_pretrained(folder, quantization=kind).dtype == torch.float32  # the rest in fp32
    with pytest.raises(ValueError, match=f"is {kind} already"):
        merge_checkpoint(folder, tmp_path / "again", QuantScheme("int4"))
    with pytest.raises(ValueError, match=f"holds {kind} weights"):
        ChatModel.from_pretrained(folder, quantization="int4" if kind == "int8" else "int8")
    with pytest.raises(OSError, match="model.safetensors"):  # transformers alone refuses rather than misreads it
        PhiForCausalLM.from_pretrained(str(folder / "llm"))


# ------------------------------------------------------------------------------------------------ front ends
def test_every_front_end_takes_int8_and_int4(tmp_path: Path, capsys) -> None:
    from app import cli as app_cli
    from eval.cli import main as eval_main
    assert app_cli.parse_args(["--tiny", "--quantization", "int4"]).quantization == "int4"
    with pytest.raises(SystemExit):
        eval_main(["run", "--help"])
    assert "int8,int4" in capsys.readouterr().out.replace(" ", "").replace("\n", "")
    bot = load(Assistant, LoadOptions(tiny=True, quantization="int4")).assistant  # the app, eval and LangChain
    assert scheme_of(bot.chat.llm) == QuantScheme("int4")
    code = assistant_main(["chat", "--tiny", "--quantization", "int8", "--ask", "What is this?", "--max-new-tokens",
                           "4", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["turns"][0]["complete"]


def test_the_combinations_that_cannot_run_are_refused_in_a_sentence(tmp_path: Path) -> None:
    for kind in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"{kind} is weight-only quantization for the CPU.*4bit or 8bit"):
            load_llm(TINY_LLM, device="cuda", quantization=kind)
    with pytest.raises(ValueError, match="unknown quantization"):
        load_llm(TINY_LLM, quantization="int2")
    with pytest.raises(ValueError, match="int4 is weight-only quantization for the CPU"):
        ChatModel.create(tiny_config(), device="cuda", quantization="int4")  # before any weight is loaded
    with pytest.raises(ValueError, match="merge LoRA"):
        quantize.save_quantized(load_llm(TINY_LLM, vocab_size=576), tmp_path)  # not quantized


# ------------------------------------------------------------------------------------------------ answers
#: Each word is one token of the tiny tokenizer.
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "brown", "grey", "orange", "purple"]
THINGS = ["circle", "square", "car", "tree", "house", "dog", "cat", "bird", "sky", "box"]


@pytest.fixture(scope="module")
def memorised() -> tuple[PhiForCausalLM, list[tuple[str, str]]]:
    """A small Phi trained here to answer 200 questions ("item 17:" -> " blue car"), about 30 s on one thread:
    a model whose greedy answers rest on learned margins, unlike a random one's."""
    tok = load_tokenizer(TINY_LLM)
    rng = random.Random(0)
    pairs = [(f"item {i}:", f" {rng.choice(COLOURS)} {rng.choice(THINGS)}") for i in range(200)]
    rows = [tok(q + a + tok.eos_token).input_ids for q, a in pairs]
    asked = [len(tok(q).input_ids) for q, _ in pairs]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (row, n) in enumerate(zip(rows, asked, strict=True)):
        ids[i, :len(row)], mask[i, :len(row)], labels[i, n:len(row)] = torch.tensor(row), 1, torch.tensor(row[n:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PhiForCausalLM(TinyPhi(hidden_size=64, intermediate_size=256).config(len(tok)))
        steps = 300
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        for _ in range(steps):
            batch = torch.randint(0, len(rows), (64,))
            loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval(), pairs


def greedy_answers(model: torch.nn.Module, questions: list[str]) -> list[str]:
    """Answers of up to 3 tokens, 8 questions at a time (decode steps on the kernels, prefills of both kinds)."""
    tok = load_tokenizer(TINY_LLM)
    answers = []
    for start in range(0, len(questions), 8):
        batch = tok(questions[start:start + 8], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        answers += tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return answers


def test_greedy_answers_of_a_trained_model_keep_their_accuracy(memorised) -> None:
    """int8 within 1 point and int4 within 3 points of bf16's exact-match accuracy."""
    model, pairs = memorised
    models = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16),
              "int8": quantize_llm(copy.deepcopy(model), QuantScheme("int8")),
              "int4": quantize_llm(copy.deepcopy(model), QuantScheme("int4"))}
    answers = {name: greedy_answers(m, [q for q, _ in pairs]) for name, m in models.items()}
    accuracy = {name: sum(a.strip() == t.strip() for a, (_, t) in zip(got, pairs, strict=True)) / len(pairs)
                for name, got in answers.items()}
    same = {name: sum(a == b for a, b in zip(got, answers["bf16"], strict=True)) / len(pairs)
            for name, got in answers.items()}
    print(f"exact match {accuracy}\nidentical to bf16's answers {same}")
    assert accuracy["bf16"] >= 0.9, accuracy  # it learned them: the comparison means something
    assert accuracy["int8"] >= accuracy["bf16"] - 0.01, (accuracy, same)
    assert accuracy["int4"] >= accuracy["bf16"] - 0.03, (accuracy, same)
