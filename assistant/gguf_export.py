"""A transformers Phi folder as a GGUF file llama.cpp runs (architecture `phi2`), and its Q8_0 / Q4_K_M quants.

Why our own converter: the only other route is llama.cpp's convert script, which is not part of any package we
install. The `gguf` package (llama.cpp's own writer and name tables) does the format; this module only says which
Phi config field is which GGUF key and streams the safetensors over, one tensor in memory at a time, so a 2.7B
model converts in about its F16 size of disk and little RAM. Quantizing is llama.cpp's own (`llama_model_quantize`
through llama-cpp-python): the same k-quant mixes (Q4_K_M keeps some tensors at Q6_K) users download.

Phi-2's attention is stored as separate q/k/v projections with biases (`blk.N.attn_q/k/v`), which llama.cpp's phi2
graph accepts beside the fused `attn_qkv`; rotary covers `partial_rotary_factor` of each head, NEOX-style, as
transformers' `rotate_half`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import gguf

#: Output types of `export_gguf`: 2-D weights in this type, norms and biases always F32 (as llama.cpp reads them).
EXPORT_TYPES = ("f16", "f32")
#: `quantize_gguf` kinds -> llama.cpp's LLAMA_FTYPE_* names.
QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
TOKEN_TABLE = "token_embd.weight"


def export_gguf(folder: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Write `folder` (a `PhiForCausalLM` save: config.json, *.safetensors, tokenizer.json) as one GGUF file."""
    import gguf

    if dtype not in EXPORT_TYPES:
        raise ValueError(f"GGUF export type {dtype!r}: choose one of {', '.join(EXPORT_TYPES)}")
    folder, out = Path(folder), Path(out)
    config = _phi_config(folder)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, config["num_hidden_layers"])
    tensors = _tensor_plan(folder, names, dtype)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI2])
    _write_hparams(writer, config, gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _write_vocab(writer, folder, config["vocab_size"])
    for gguf_name, (_, _, shape, np_dtype) in tensors.items():
        writer.add_tensor_info(gguf_name, shape, np.dtype(np_dtype), int(np.prod(shape)) * np.dtype(np_dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for file, hf_name, _, np_dtype in tensors.values():
        writer.write_tensor_data(_read(file, hf_name).astype(np_dtype))
    writer.close()
    return out


def quantize_gguf(src: str | Path, dst: str | Path, kind: str, threads: int = 0) -> Path:
    """llama.cpp's quantizer on an F16/F32 GGUF file: `kind` is q8_0 or q4_k_m."""
    from .llamacpp import llama_cpp_module

    llama_cpp = llama_cpp_module()
    if kind not in QUANT_TYPES:
        raise ValueError(f"GGUF quantization {kind!r}: choose one of {', '.join(QUANT_TYPES)}")
    if not Path(src).is_file():
        raise FileNotFoundError(f"GGUF file {src} not found")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind} (its log above says why)")
    return Path(dst)


def weight_bytes(path: str | Path) -> int:
    """Bytes of every tensor but the token-embedding table: what one decoded token reads (the table is looked up,
    one row per token, while the separate output matrix is read whole)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != TOKEN_TABLE)


def _phi_config(folder: Path) -> dict:
    """config.json of a full-precision Phi model; quantized or other architectures are refused in one sentence."""
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: GGUF export needs a transformers Phi folder")
    config = json.loads(file.read_text())
    if config.get("model_type") != "phi":
        raise ValueError(f"{folder} holds a {config.get('model_type')!r} model; GGUF export handles Phi (phi2) only")
    if "quantization_config" in config:
        raise ValueError(f"{folder} holds quantized weights; export the full-precision model and quantize the GGUF")
    return config


def _write_hparams(writer: gguf.GGUFWriter, config: dict, file_type: int) -> None:
    """The phi2 keys llama.cpp reads; rotary and theta from transformers 5's `rope_parameters` or older top-level
    fields (microsoft/phi-2's own config.json)."""
    rope = config.get("rope_parameters") or {}
    heads = config["num_attention_heads"]
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(int(factor * (config["hidden_size"] // heads)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_eps(config.get("layer_norm_eps", 1e-5))
    writer.add_file_type(file_type)


def _write_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The folder's byte-level BPE (tokenizer.json) as a gpt2 vocabulary, padded to the model's row count with
    unused tokens (Phi-2: 50295 tokens, 51200 rows); BOS/EOS ids and merges through gguf's `SpecialVocab`."""
    import gguf

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json: GGUF export needs the model's byte-level BPE")
    spec = json.loads(file.read_text())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{file} is a {spec['model']['type']} tokenizer; phi2 GGUF files hold a byte-level BPE")
    tokens = {i: (t, gguf.TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = (added["content"],
                               gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise ValueError(f"{file} has token id {max(tokens)} but the model has only {vocab_size} embedding rows")
    rows = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([t for t, _ in rows])
    writer.add_token_types([k for _, k in rows])
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(False)  # Phi-2 adds no BOS


def _tensor_plan(folder: Path, names: gguf.TensorNameMap,
                 dtype: str) -> dict[str, tuple[Path, str, tuple[int, ...], str]]:
    """GGUF name -> (safetensors file, HF name, shape, numpy dtype to write), in the safetensors' order; read from
    the headers only. Every tensor must have a phi2 name: an unknown one (a LoRA adapter left unmerged) is refused."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    plan = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ValueError(f"{file.name}: tensor {hf_name} has no place in a phi2 GGUF file")
                shape = tuple(f.get_slice(hf_name).get_shape())
                plan[gguf_name] = (file, hf_name, shape, "float16" if dtype == "f16" and len(shape) == 2 else "float32")
    if "output.weight" not in plan:
        raise ValueError(f"{folder} has no lm_head: tied input/output embeddings are not supported by this export")
    return plan


def _read(file: Path, name: str) -> np.ndarray:
    """One tensor as float32 numpy, bf16 included (numpy has no bf16: read through torch)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name).float().numpy()
