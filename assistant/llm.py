"""The language model: Phi-2 through transformers, its tokenizer, LoRA through peft, 4/8-bit through bitsandbytes,
weight-only int8/int4 on the CPU through assistant/quantize.py.

Phi-2's tokenizer has one special token, `<|endoftext|>` (id 50256), serving as BOS, EOS, UNK and pad; it adds no
BOS. The tiny random model used for tests and `--tiny` keeps all of that, with a bundled byte-level BPE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from tokenizer_tap.errors import WeightsNotFoundError
from tokenizer_tap.hub import hub_reachable

from .options import BITSANDBYTES, QUANTIZATIONS, WEIGHT_ONLY
from .quantize import QuantScheme, load_quantized, quantize_llm, stored_scheme

DEFAULT_LLM = "microsoft/phi-2"
TINY_LLM = "tiny-phi"
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_chat_tokenizer.json"
EOS_TEXT = "<|endoftext|>"
#: Files `from_pretrained("microsoft/phi-2")` needs; listed up front so an offline user gets every name at once.
ESSENTIAL = ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on Phi-2 as Bunny trains it: every linear layer of the decoder, lm_head excluded."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")

    def to_dict(self) -> dict:
        """JSON-ready fields (`target_modules` as a list), as `config.json` stores them."""
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, data: dict) -> LoraSettings:
        """Inverse of `to_dict`; missing keys take the defaults."""
        return cls(**{**data, "target_modules": tuple(data.get("target_modules", cls.target_modules))})


@dataclass(frozen=True)
class TinyPhi:
    """A Phi-architecture model small enough for unit tests (same layer names, rotary, parallel block)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        head = self.hidden_size // self.num_attention_heads
        if self.hidden_size % self.num_attention_heads or int(head * 0.4) % 2:
            raise ValueError(f"TinyPhi: hidden_size {self.hidden_size} / {self.num_attention_heads} heads must give a "
                             "head size whose rotary part (0.4 of it, as Phi-2's 32 of 80) is a whole even number")

    def config(self, vocab_size: int) -> PhiConfig:
        """A `PhiConfig` of this size; BOS, EOS and pad are id 0, the bundled tiny tokenizer's `<|endoftext|>`."""
        return PhiConfig(vocab_size=vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                         num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
                         max_position_embeddings=self.max_position_embeddings, partial_rotary_factor=0.4,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)


def load_tokenizer(name: str | Path = DEFAULT_LLM) -> PreTrainedTokenizerFast:
    """Phi-2's tokenizer (hub id or folder), a `tokenizer.json` file of the same kind (byte-level BPE whose one
    special token is `<|endoftext|>`), or the bundled one for `tiny-phi`; pad is set to EOS."""
    if str(name) == TINY_LLM or str(name).endswith(".json"):
        file = TINY_TOKENIZER if str(name) == TINY_LLM else Path(name)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file {file} not found")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(file), eos_token=EOS_TEXT, bos_token=EOS_TEXT,
                                      unk_token=EOS_TEXT)
    else:
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(name), local_files_only=_offline(name))
        except OSError as exc:
            raise WeightsNotFoundError(_missing_message(name, missing_files(name), exc)) from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name} has no end-of-text token")
    tok.pad_token = tok.eos_token  # as Bunny: pad == eos; attention masks are built from lengths, not ids
    tok.padding_side = "left"
    return tok


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """bitsandbytes settings: 4-bit NF4 with double quantisation (QLoRA) or LLM.int8()."""
    from transformers import BitsAndBytesConfig
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZATIONS)}")


def load_llm(name: str | Path = DEFAULT_LLM, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             quantization: str = "none", vocab_size: int | None = None, seed: int = 0, tiny: TinyPhi | None = None,
             adapt: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> torch.nn.Module:
    """Phi-2 weights from the hub cache or a folder; `tiny-phi` builds seeded random weights instead; a folder
    `python -m assistant quantize` wrote loads as saved. `adapt` (attaching LoRA) runs on the loaded model before
    int8/int4 quantisation, so adapters wrap full-precision layers and only their base layers are quantised."""
    check_quantization(quantization, device)
    if (saved := stored_scheme(name)) is not None:
        if quantization not in ("none", saved.kind) or adapt is not None:
            raise ValueError(f"{name} holds {saved.kind} weights, LoRA merged in: load it with quantization none or "
                             f"{saved.kind} and no adapter")
        check_quantization(saved.kind, device)
        return load_quantized(name, dtype=dtype)
    weight_only = quantization in WEIGHT_ONLY
    if str(name) == TINY_LLM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PhiForCausalLM((tiny or TinyPhi()).config(vocab_size or 1024))
        model = model.to(device=device, dtype=dtype)
        if quantization in BITSANDBYTES:
            model = quantize_model(model, quantization, dtype)
    else:  # int8/int4 start from bf16 weights: half the memory of fp32 while the full weights are held
        model = _from_pretrained(name, torch.bfloat16 if weight_only else dtype, device, quantization)
    if adapt is not None:
        model = adapt(model)
    if weight_only:
        model = quantize_llm(model, QuantScheme(quantization)).to(dtype)
    return model.eval()


def check_quantization(quantization: str, device: torch.device | str) -> None:
    """Unknown kinds, and int8/int4 (CPU kernels) anywhere but on the CPU, are refused in one sentence."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization in WEIGHT_ONLY and torch.device(device).type != "cpu":
        raise ValueError(f"{quantization} is weight-only quantization for the CPU (PyTorch's CPU kernels); on "
                         f"{torch.device(device).type} use --quantization 4bit or 8bit (bitsandbytes) instead")


def _from_pretrained(name: str | Path, dtype: torch.dtype, device: torch.device | str,
                     quantization: str) -> PhiForCausalLM:
    """Phi weights from the hub cache or a folder, through bitsandbytes for 4bit/8bit."""
    missing = missing_files(name)
    kwargs: dict = {"dtype": dtype, "local_files_only": _offline(name)}
    if quantization in BITSANDBYTES:
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
        kwargs["device_map"] = {"": str(device)}
    try:
        model = PhiForCausalLM.from_pretrained(str(name), **kwargs)
    except OSError as exc:  # no network, gated, or a folder without weights
        raise WeightsNotFoundError(_missing_message(name, missing, exc)) from None
    return model if quantization in BITSANDBYTES else model.to(device)


def quantize_model(model: PhiForCausalLM, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Quantise an in-memory model: int8/int4 in place (`quantize.quantize_llm`; the rest cast to `compute_dtype`),
    4bit/8bit by a save/load round trip through bitsandbytes (how tiny and random-weight models get them)."""
    if kind in WEIGHT_ONLY:
        return quantize_llm(model, QuantScheme(kind)).to(compute_dtype)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        device = next(model.parameters()).device
        return PhiForCausalLM.from_pretrained(tmp, dtype=compute_dtype, device_map={"": str(device)},
                                              quantization_config=quantization_config(kind, compute_dtype))


def apply_lora(model: PhiForCausalLM, settings: LoraSettings):
    """Wrap `model` with fresh LoRA adapters (B = 0, so outputs are unchanged until trained)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def missing_files(name: str | Path) -> list[str]:
    """Weight and tokenizer files of hub model `name` that are not in the local HF cache (none for a folder)."""
    if Path(str(name)).expanduser().is_dir():
        return []
    from huggingface_hub import try_to_load_from_cache
    return [f for f in ESSENTIAL if not isinstance(try_to_load_from_cache(str(name), f), str)]


def _missing_message(name: str | Path, missing: list[str], exc: Exception) -> str:
    if Path(str(name)).expanduser().is_dir():
        return f"cannot load a language model from folder {name}: {str(exc).splitlines()[0][:300]}"
    lines = "\n".join(f"- https://huggingface.co/{name}/resolve/main/{f}" for f in missing) or f"- {exc}"
    return (f"{len(missing) or 'some'} file(s) of {name} are not in the local Hugging Face cache and could not be "
            f"downloaded:\n{lines}\n  Fix: run `huggingface-cli download {name}` with network access, or pass "
            "--llm FOLDER holding those files; --tiny runs with small random models instead.")


def _offline(name: str | Path) -> bool:
    """True when files must come from disk: a local folder, HF_HUB_OFFLINE set, or the hub unreachable."""
    if Path(str(name)).expanduser().is_dir():
        return True
    return not hub_reachable()


def load_input_embeddings(name: str | Path, *, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> torch.nn.Embedding:
    """Only the token-embedding table of an LLM (hub id or folder), read from its safetensors.

    What a client of an LLM server needs to send prompt embeddings: 0.26 GB for Phi-2 in bf16 instead of 5.6 GB.
    """
    from safetensors import safe_open
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(name), local_files_only=_offline(name))
        with torch.device("meta"):
            skeleton = PhiForCausalLM(config)
        table = skeleton.get_input_embeddings()
        key = next(n for n, m in skeleton.named_modules() if m is table) + ".weight"
        with safe_open(_weights_file(name, key), framework="pt") as f:
            weight = f.get_tensor(key)
    except (OSError, StopIteration) as exc:
        raise WeightsNotFoundError(_missing_message(name, missing_files(name), exc)) from None
    return torch.nn.Embedding.from_pretrained(weight.to(device=device, dtype=dtype), freeze=True)


def _weights_file(name: str | Path, key: str) -> str:
    """The safetensors file of `name` (a folder or hub id, sharded or not) that holds tensor `key`."""
    import json

    def fetch(filename: str) -> str | None:
        folder = Path(str(name)).expanduser()
        if folder.is_dir():
            return str(folder / filename) if (folder / filename).is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        try:
            return hf_hub_download(str(name), filename, local_files_only=_offline(name))
        except EntryNotFoundError:
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        shard = fetch(json.loads(Path(index).read_text())["weight_map"][key])
    else:
        shard = fetch("model.safetensors")
    if shard is None:
        raise OSError(f"no safetensors file of {name} holds {key}")
    return shard
