"""Weight-only int8 / int4 for the LLM on CPU, on PyTorch's own kernels (`--quantization int8|int4`).

Why: decoding a token reads every weight once, so on CPU its time is bytes of weight read; int8 halves them and
int4 quarters them against bf16. The aten kernels want bf16 activations (with fp32 ones they are 4-10x slower than a
bf16 matmul), so a layer casts its input to bf16 and its output back to the caller's dtype; the rest of the model
(embeddings, norms, attention, LoRA) runs in the dtype the caller asked for.

- int8: one symmetric scale per output channel, `aten._weight_int8pack_mm`.
- int4: one scale and zero per `group_size` inputs (asymmetric), `aten._weight_int4pack_mm_for_cpu`. A layer whose
  shape the kernel cannot take (outputs not a multiple of 64, inputs of no group size >= 32) is int8 instead.
- lm_head: int8 in both modes (`QuantScheme.head`; BENCHMARKS.md, "Weight-only int8 / int4 on CPU", has the
  measurements behind every choice here).
- The kernels' time grows with every row while a matmul's hardly does: above `DEQUANT_ROWS` rows (prefills) a
  layer dequantises its weight to bf16 for the call and runs a matmul instead.

A saved folder (`save_quantized`) holds portable tensors (int8 codes, or two int4 codes per uint8, and bf16 scales
and zeros); the kernel's CPU-specific int4 layout is built when it is loaded (`load_quantized`), which never
quantises again.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

#: The linear layers of a Phi decoder block that are quantised (LoRA's targets too).
TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
KINDS = ("int8", "int4")
#: int4 group sizes the kernel takes, largest first: a layer uses the scheme's size or the largest one below it
#: that divides its inputs.
GROUP_SIZES = (256, 128, 64, 32)
#: Rows (batch x positions) above which a layer dequantises its weight (into a reused buffer, `scratch`) and runs
#: a bf16 matmul instead of the kernel, by bits. The kernels' time grows with every row, a matmul's far slower, so
#: they win at decode batch sizes and lose on prefills; the crossovers measured on one AMD EPYC core (BENCHMARKS.md)
#: lie near 24 rows for int8 and 80-160 for int4.
DEQUANT_ROWS = {8: 24, 4: 128}
METHOD = "tapchat-weight-only"
#: The tensors of a saved folder. Not model.safetensors: transformers would load the folder as a plain model,
#: initialising the weights it does not find there at random (with a warning); without the file it refuses.
WEIGHTS = "quantized.safetensors"


@dataclass(frozen=True)
class QuantScheme:
    """What `quantize_llm` does: `kind` for the decoder blocks' linear layers, `head` for lm_head (`none` keeps it
    as it is), `group_size` inputs per int4 scale and zero."""

    kind: str = "int8"
    group_size: int = 64  # measured: 32 halves int4's error again for 5-15% more time per token; 128 gains no speed
    head: str = "int8"  # int4 doubles the error there to save ~5% of a token's time

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.head not in (*KINDS, "none"):
            raise ValueError(f"weight-only quantization is int8 or int4 (lm_head also none), not {self}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}")

    def kind_for(self, name: str) -> str | None:
        """The kind for the linear layer at module path `name` (a peft wrapper's `base_layer` counts as the layer it
        wraps; LoRA's own lora_A/lora_B never match), None to leave it."""
        parts = name.split(".")
        owner = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
        if owner in TARGETS:
            return self.kind
        return self.head if owner == "lm_head" and self.head != "none" else None

    def to_dict(self) -> dict:
        """The marker a saved folder's config.json holds as `quantization_config`."""
        return {"quant_method": METHOD, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> QuantScheme:
        """Inverse of `to_dict`."""
        return cls(**{k: v for k, v in data.items() if k != "quant_method"})


@dataclass(frozen=True)
class Int4Layout:
    """How the CPU kernel lays out int4 codes (it depends on the CPU's vector width and is not public, so
    `int4_layout` finds it by packing a probe): `block` output rows side by side for each input, each byte holding
    rows b and b + block/2 (`halves`) or rows 2b and 2b + 1."""

    block: int
    halves: bool

    def planes(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of `t` (blocks, block, ...) holding the rows of the low and of the high nibbles."""
        if self.halves:
            return t[:, :self.block // 2], t[:, self.block // 2:]
        return t[:, 0::2], t[:, 1::2]

    def expand(self, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) bf16 matrix code * scale + offset of kernel-packed codes (out, in/2), written to `out` if
        given; `scales` and `offsets` are (out, groups). The bytes are put in row order first (a uint8 copy, a
        quarter of the bf16 result): a matmul with an (in, out) weight instead is markedly slower."""
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        blocks, groups = out_features // self.block, scales.shape[1]
        codes = packed.view(blocks, in_features, self.block // 2).transpose(1, 2).contiguous()
        shape = (blocks, self.block, groups, in_features // groups)
        result = torch.empty(shape, dtype=torch.bfloat16) if out is None else out.view(shape)
        scale_planes = self.planes(scales.view(blocks, self.block, groups, 1))
        for nibbles, target, scale in zip((codes & 15, codes >> 4), self.planes(result), scale_planes, strict=True):
            torch.mul(nibbles.view(blocks, self.block // 2, groups, -1), scale, out=target)
        return result.add_(offsets.view(blocks, self.block, groups, 1)).view(out_features, in_features)

    def codes(self, packed: torch.Tensor) -> torch.Tensor:
        """(out, in) codes 0..15 of kernel-packed codes."""
        ones = torch.ones(packed.shape[0], 1, dtype=torch.bfloat16)
        return self.expand(packed, ones, torch.zeros_like(ones)).to(torch.uint8)


@functools.cache
def int4_layout() -> Int4Layout:
    """The layout this machine's kernel packs into: 64-row blocks in halves (AVX-512), 32 in halves (AVX2) or 32 in
    pairs (no vector unit), told apart by packing a probe; another one is refused rather than misread."""
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 8)
    for layout in (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(32, False)):
        if torch.equal(layout.codes(packed), probe.to(torch.uint8)):
            return layout
    raise RuntimeError("this PyTorch packs int4 weights in a layout this code does not know: use int8")


class WeightOnlyLinear(nn.Module):
    """A linear layer with int8 or int4 weights and bf16 scales; bias (if any) in the model's dtype.

    In memory an int4 layer holds only the kernel's operands: `qweight` in the kernel's packed layout and
    `scales_and_zeros` (groups, out, 2). Its state dict is portable all the same: `qweight` (out, in/2) with the
    even input in the low nibble, `scales` and `zeros` (out, groups); the hooks convert both ways. An int8 layer's
    `qweight` (out, in) and `scales` (out,) are both.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int = 0,
                 bias: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (4, 8) or (bits == 4 and int4_group(in_features, out_features, group_size) != group_size):
            raise ValueError(f"no int{bits} layer {in_features}->{out_features} with group size {group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        else:
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                                 dtype=torch.bfloat16, device=device))
            self.register_state_dict_post_hook(_portable)
            self.register_load_state_dict_pre_hook(_kernel_ready)
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def of(cls, linear: nn.Linear, kind: str, group_size: int) -> WeightOnlyLinear:
        """`linear` quantised: int4 where the kernel takes its shape (else int8), its bias kept."""
        out_features, in_features = linear.weight.shape
        group = int4_group(in_features, out_features, group_size) if kind == "int4" else None
        layer = cls(in_features, out_features, bits=4 if group else 8, group_size=group or 0,
                    bias=linear.bias is not None, device=linear.weight.device)
        weight = linear.weight.detach().float()
        if group:
            layer.qweight, layer.scales_and_zeros = kernel_operands(*quantize_int4(weight, group))
        else:
            layer.qweight, layer.scales = quantize_int8(weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 in, the kernel (or, for many rows, a matmul with the dequantised weight), the caller's dtype out."""
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] > DEQUANT_ROWS[self.bits]:  # autograd would keep the weight: no shared scratch then
            shape = (self.out_features, self.in_features)
            out = F.linear(rows, self.dequantized(None if torch.is_grad_enabled() else scratch(shape)))
        elif self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size,
                                                             self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # a new tensor: added to in place
        return out if self.bias is None else out.add_(self.bias)

    def dequantized(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) bf16 weight the codes stand for, written to `out` if given."""
        if self.bits == 8:
            out = torch.empty(self.qweight.shape, dtype=torch.bfloat16) if out is None else out
            return out.copy_(self.qweight).mul_(self.scales[:, None])
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # small: (out, groups)
        return int4_layout().expand(self.qweight, scales.to(torch.bfloat16), (zeros - 8 * scales).to(torch.bfloat16),
                                    out)

    def _apply(self, fn, recurse: bool = True):
        """`model.to(dtype)` casts the rest of the model (and the bias); codes and scales keep the dtypes the
        kernels need."""
        kept = {name: buf.dtype for name, buf in self._buffers.items() if buf is not None and name != "bias"}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


_scratch = threading.local()


def scratch(shape: tuple[int, ...]) -> torch.Tensor:
    """A bf16 tensor of `shape` in this thread's reusable buffer (kept at the largest size asked for: one layer's
    weight). Dequantising into a fresh 50 MB tensor for every layer of a prefill costs ten times the dequantising
    itself, in page faults (BENCHMARKS.md)."""
    size = math.prod(shape)
    if getattr(_scratch, "buffer", None) is None or _scratch.buffer.numel() < size:
        _scratch.buffer = torch.empty(size, dtype=torch.bfloat16)
    return _scratch.buffer[:size].view(shape)


def _portable(module: WeightOnlyLinear, state: dict, prefix: str, _metadata) -> None:
    """State-dict post-hook of an int4 layer: the kernel's operands become the portable tensors."""
    packed, scales_and_zeros = state.pop(prefix + "qweight"), state.pop(prefix + "scales_and_zeros")
    codes = int4_layout().codes(packed)
    state[prefix + "qweight"] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    state[prefix + "scales"], state[prefix + "zeros"] = scales_and_zeros.permute(2, 1, 0).contiguous()


def _kernel_ready(module: WeightOnlyLinear, state: dict, prefix: str, *_args) -> None:
    """Load-state-dict pre-hook of an int4 layer: portable tensors become the kernel's operands."""
    if prefix + "zeros" in state:
        state[prefix + "qweight"], state[prefix + "scales_and_zeros"] = kernel_operands(
            state.pop(prefix + "qweight"), state.pop(prefix + "scales"), state.pop(prefix + "zeros"))


def kernel_operands(qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable int4 tensors -> the kernel's packed codes and (groups, out, 2) scales and zeros."""
    codes = torch.stack([qweight & 15, qweight >> 4], -1).view(qweight.shape[0], -1).int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    return packed, torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()


def int4_group(in_features: int, out_features: int, group_size: int) -> int | None:
    """The group size an int4 layer of this shape uses: `group_size`, or the largest smaller one that divides
    `in_features`; None where the kernel's layout cannot take it whole (outputs must be a multiple of 64)."""
    if out_features % 64:
        return None
    return next((g for g in GROUP_SIZES if g <= group_size and in_features % g == 0), None)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 codes and one bf16 scale per output channel (symmetric)."""
    scales = (weight.abs().amax(1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    codes = (weight / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> portable int4: codes 0..15 two per uint8 (even input in the low nibble), bf16
    scales and zeros per group, in the kernel's convention weight = (code - 8) * scale + zero."""
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-10).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    codes = ((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).round().clamp(0, 15)
    codes = codes.to(torch.uint8).view(out_features, in_features // 2, 2)
    return codes[..., 0] | (codes[..., 1] << 4), scales, zeros


def quantize_llm(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Replace the LLM's linear layers in place as `scheme` says (inside peft wrappers, their `base_layer`: LoRA
    keeps its precision) and mark the model with the scheme; returns `model`. CPU only."""
    if (done := scheme_of(model)) is not None:
        raise ValueError(f"the model is {done.kind} already: quantise the unquantised checkpoint instead")
    for name, module in list(model.named_modules()):
        kind = scheme.kind_for(name) if isinstance(module, nn.Linear) else None
        if kind is None:
            continue
        if module.weight.device.type != "cpu":
            raise ValueError("int8 and int4 run on PyTorch's CPU kernels: load the model on the CPU")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, WeightOnlyLinear.of(module, kind, scheme.group_size))
    _base(model).weight_only_scheme = scheme
    return model


def scheme_of(model: nn.Module) -> QuantScheme | None:
    """The scheme `quantize_llm` or `load_quantized` gave `model` (a peft wrapper is looked through), or None."""
    return getattr(_base(model), "weight_only_scheme", None)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_quantized(model: nn.Module, folder: str | Path) -> None:
    """config.json (with the scheme as `quantization_config`) and `WEIGHTS` of portable tensors."""
    scheme = scheme_of(model)
    if scheme is None or model is not _base(model):
        raise ValueError("save_quantized takes a quantized LLM without adapters (merge LoRA before quantising)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.quantization_config = scheme.to_dict()
    config.save_pretrained(str(folder))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})


def stored_scheme(name: str | Path) -> QuantScheme | None:
    """The scheme of a folder `save_quantized` wrote, None for anything else (a plain folder, a hub id)."""
    config = Path(str(name)).expanduser() / "config.json"
    if not config.is_file():
        return None
    marker = json.loads(config.read_text()).get("quantization_config") or {}
    return QuantScheme.from_dict(marker) if marker.get("quant_method") == METHOD else None


def load_quantized(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A folder `save_quantized` wrote, as it was saved: the skeleton is built on the meta device, each quantized
    layer's kind and group size read off its tensors, the tensors assigned (not copied) and the int4 ones packed
    for the kernel; the rest is cast to `dtype`. Nothing is quantised here."""
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    scheme = QuantScheme.from_dict(config.quantization_config)
    del config.quantization_config
    state = load_file(str(folder / WEIGHTS))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, module in list(model.named_modules()):
        if f"{name}.qweight" not in state:
            continue
        out_features, in_features = module.weight.shape
        scales = state[f"{name}.scales"]
        group = in_features // scales.shape[1] if f"{name}.zeros" in state else 0
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, WeightOnlyLinear(
            in_features, out_features, bits=4 if group else 8, group_size=group, bias=f"{name}.bias" in state,
            device="meta"))
    model.load_state_dict(state, assign=True)
    model.to(dtype)
    # non-persistent buffers are not saved: computed again from the config, in fp32 as transformers keeps them
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.weight_only_scheme = scheme
    return model.eval()
