"""Initialise TAP's image encoder from MAE weights (the paper's recipe: MAE encoder, everything else from scratch).

`facebook/vit-mae-base|large|huge` (or a local copy saved with `save_pretrained`) are plain global-attention ViTs of
the same width, depth and heads as tap_vit_b|l|h. What carries over, key by key:

- patch embedding: the same 16x16 conv. MAE reads RGB, TAP reads BGR with the same ImageNet mean/std (in BGR
  order), so the conv's input channels are flipped and the features of an image stay the same;
- position embeddings: MAE's fixed sin-cos table of its 14x14 grid (+ a cls row, dropped), resized bicubically
  to TAP's grid;
- each block: layer norms, query/key/value concatenated into the fused qkv (channel layout (which, head, dim)),
  output projection, MLP; and the final norm.

TAP's relative-position tables, cross-window convs and neck have no MAE counterpart and keep their init. MAE's cls
token and its decoder are unused. The layer norms' eps differs (HF MAE configs say 1e-12, TAP uses 1e-5): a
negligible change for unit-scale activations, noted in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tokenizer_tap.errors import CheckpointError, WeightsNotFoundError
from tokenizer_tap.modeling.image_encoder import ImageEncoder

#: Our parameters with no MAE counterpart: they stay at their init (anything else left unmapped is a bug).
_NO_COUNTERPART = (".attn.rel_pos_embed.", "cross_conv.", "neck.")
#: MAE parameters that have no TAP counterpart by design.
_NOT_USED = ("embeddings.cls_token", "decoder.")


@dataclass
class MaeReport:
    """What `init_from_mae` did: our key <- MAE key(s), our keys left at init, MAE keys unused, notes."""

    source: str
    mapped: dict[str, list[str]] = field(default_factory=dict)
    left_at_init: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def groups(keys: list[str], patterns: tuple[str, ...]) -> str:
            counts: dict[str, int] = {}
            for k in keys:
                g = next((p.strip(".") for p in patterns if p in f".{k}"), k)
                counts[g] = counts.get(g, 0) + 1
            return ", ".join(f"{g} ({n})" for g, n in counts.items()) or "none"

        lines = [f"MAE init from {self.source}: {len(self.mapped)} tensors mapped",
                 f"  left at init (no MAE counterpart): {groups(self.left_at_init, _NO_COUNTERPART)}",
                 f"  MAE tensors unused: {groups(self.unused, _NOT_USED)}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _config(source: str) -> Any:
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"MAE weights {source!r}: not a local folder and not available from the hub "
                                   f"(e.g. facebook/vit-mae-base): {exc}") from None
    if getattr(config, "model_type", None) != "vit_mae":
        raise CheckpointError(f"{source}: a {getattr(config, 'model_type', '?')!r} model, not an MAE ViT (vit_mae)")
    return config


def _weights(source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MAE encoder state (transformers' current key names) and the checkpoint keys it did not load (decoder)."""
    from transformers import ViTMAEModel, logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its table of decoder keys "not used" is what our report says more briefly
    try:
        model, info = ViTMAEModel.from_pretrained(source, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise CheckpointError(f"{source}: the MAE checkpoint lacks encoder weights {missing[:5]} "
                              f"({len(missing)} in all); they would be random")
    return model.state_dict(), sorted(info.get("unexpected_keys", []))


def _check_size(encoder: ImageEncoder, config: Any, source: str) -> None:
    block = encoder.blocks[0]
    ours = (encoder.patch_embed.proj.out_channels, len(encoder.blocks), block.attn.num_heads,
            block.mlp.fc1.out_features, encoder.patch_embed.proj.kernel_size[0])
    theirs = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
              config.patch_size)
    if ours != theirs:
        raise ValueError(
            f"MAE {source} is width/depth/heads/MLP/patch {'/'.join(map(str, theirs))} but the TAP encoder is "
            f"{'/'.join(map(str, ours))}: use the MAE of the same size (facebook/vit-mae-base for tap_vit_b "
            "768/12/12, -large for tap_vit_l 1024/24/16, -huge for tap_vit_h 1280/32/16)")
    if config.num_channels != 3 or config.hidden_act != "gelu":
        raise ValueError(f"MAE {source}: needs 3 input channels and exact GELU "
                         f"(has {config.num_channels}, {config.hidden_act!r})")


def _resize_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, C) MAE sin-cos table -> (grid*grid, C) row-major, cls row dropped, bicubic when g != grid."""
    rows = table.reshape(-1, table.shape[-1])[1:]
    g = int(round(rows.shape[0] ** 0.5))
    if g * g != rows.shape[0]:
        raise CheckpointError(f"MAE position table has {rows.shape[0]} patch rows, not a square grid")
    if g == grid:
        return rows
    square = rows.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    square = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return square.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(rows.dtype)


def _plan(depth: int, dim: int, grid: int,
          qkv_bias: bool) -> list[tuple[str, list[str], Callable[..., torch.Tensor]]]:
    """(our key, MAE keys, how to combine them) for every tensor that carries over."""
    def same(t: torch.Tensor) -> torch.Tensor:
        return t

    def cat(*ts: torch.Tensor) -> torch.Tensor:
        return torch.cat(ts, 0)

    plan = [("patch_embed.proj.weight", ["embeddings.patch_embeddings.projection.weight"], lambda w: w.flip(1)),
            ("patch_embed.proj.bias", ["embeddings.patch_embeddings.projection.bias"], same),
            ("pos_embed.weight", ["embeddings.position_embeddings"], lambda t: _resize_positions(t, grid)),
            ("norm.weight", ["layernorm.weight"], same),
            ("norm.bias", ["layernorm.bias"], same)]
    for i in range(depth):
        ours, mae = f"blocks.{i}.", f"layers.{i}."
        qkv = [f"{mae}attention.{p}_proj" for p in "qkv"]
        plan += [(f"{ours}attn.qkv.weight", [f"{k}.weight" for k in qkv], cat),
                 (f"{ours}attn.proj.weight", [f"{mae}attention.o_proj.weight"], same),
                 (f"{ours}attn.proj.bias", [f"{mae}attention.o_proj.bias"], same)]
        if qkv_bias:
            plan.append((f"{ours}attn.qkv.bias", [f"{k}.bias" for k in qkv], cat))
        else:  # a zero bias computes what MAE computes
            plan.append((f"{ours}attn.qkv.bias", [], lambda: torch.zeros(3 * dim)))
        for our_name, mae_name in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                   ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            plan += [(f"{ours}{our_name}.{p}", [f"{mae}{mae_name}.{p}"], same) for p in ("weight", "bias")]
    return plan


def init_from_mae(encoder: ImageEncoder, source: str) -> MaeReport:
    """Copy MAE encoder weights from `source` (hub id or local folder) into `encoder`, in place.

    Raises ValueError when the sizes differ and CheckpointError when a tensor is missing or has the wrong shape;
    nothing is copied unless every mapping checks out."""
    config = _config(source)
    _check_size(encoder, config, source)  # before reading gigabytes of weights
    state, unexpected = _weights(source)
    qkv_bias = getattr(config, "qkv_bias", True)
    ours = encoder.state_dict()
    report = MaeReport(source)
    new: dict[str, torch.Tensor] = {}
    problems = []
    for key, sources, combine in _plan(len(encoder.blocks), ours["norm.weight"].shape[0], encoder.grid, qkv_bias):
        absent = [s for s in sources if s not in state]
        if absent:
            problems.append(f"{key}: MAE has no {', '.join(absent)}")
            continue
        value = combine(*(state[s] for s in sources))
        if value.shape != ours[key].shape:
            problems.append(f"{key}: {tuple(value.shape)} from MAE, {tuple(ours[key].shape)} in TAP")
            continue
        new[key] = value
        report.mapped[key] = sources
    params = dict(encoder.named_parameters())
    report.left_at_init = [k for k in params if k not in new]
    problems += [f"{k}: no MAE counterpart found" for k in report.left_at_init
                 if not any(p in f".{k}" for p in _NO_COUNTERPART)]
    used = {s for sources in report.mapped.values() for s in sources}
    report.unused = sorted(set(state) - used) + unexpected
    problems += [f"MAE {k}: no place in the TAP encoder" for k in report.unused if not k.startswith(_NOT_USED)]
    if problems:
        raise CheckpointError(f"MAE {source} does not map onto the TAP encoder: " + "; ".join(problems[:8])
                              + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    with torch.no_grad():
        for key, value in new.items():
            params[key].copy_(value.to(params[key].dtype))
    if not qkv_bias:
        report.notes.append("MAE has no qkv bias: TAP's fused qkv bias set to zero")
    if config.layer_norm_eps != encoder.norm.eps:
        report.notes.append(f"MAE layer norms use eps {config.layer_norm_eps:g}, TAP's {encoder.norm.eps:g}")
    grid_mae = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    if grid_mae != encoder.grid:
        report.notes.append(f"position table resized bicubically from {grid_mae}x{grid_mae} to "
                            f"{encoder.grid}x{encoder.grid}")
    return report
