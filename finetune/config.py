"""`TrainConfig`: one training run, read from YAML (see finetune/configs/) with `key=value` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """Where the samples come from: LLaVA/Bunny JSON (array or JSON lines) and the folder image paths are under."""

    path: str = ""
    image_folder: str = ""
    max_length: int = 2048  # positions after the image is expanded (Phi-2's context)
    blank_images: bool = False  # feed black images instead (the image-blind baseline of the learning proof)


@dataclass
class ModelConfig:
    """What is trained: a new model (tap_model + llm + projector) or an existing checkpoint folder (`init`)."""

    init: str = ""  # a TAP-Chat checkpoint folder to continue from (stage 2 starts from stage 1's output)
    tap_model: str = "tap_vit_l"
    tap_checkpoint: str = ""
    llm: str = "microsoft/phi-2"
    tiny_llm: dict[str, int] = field(default_factory=dict)  # TinyPhi fields, with llm: tiny-phi
    tokenizer: str = ""  # with llm: tiny-phi, a tokenizer.json to use instead of the bundled one (world-chat's)
    projector: dict[str, int] = field(default_factory=dict)  # ProjectorConfig fields besides in/out dims
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    quantization: str = "none"  # 4bit: QLoRA (NF4 base, LoRA in 16 bits)
    seed: int = 0
    find_grounding: bool | None = None  # the saved model's `ChatConfig.find_grounding`: set when the data has
    # find-grounded turns, so the app grounds questions as the model learnt them (None: keep the init's)


@dataclass
class TrainableConfig:
    """Which parameters learn; everything else is frozen (paper: last 4 encoder blocks, projector, LoRA)."""

    encoder_blocks: int = 4
    projector: bool = True
    llm: str = "lora"  # lora | full | frozen


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warm-up; separate learning rates per parameter group."""

    lr: float = 2e-4  # LoRA (or the full LLM)
    projector_lr: float | None = None  # None: lr (Bunny's split uses 2e-5)
    encoder_lr: float | None = None  # None: projector_lr
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    stage: str = "sft"  # pretrain (captions, visual tokens only) | sft (chat template, multi-turn)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/tapchat"
    epochs: float = 1.0
    global_batch: int = 128
    micro_batch: int = 8  # per device; gradient accumulation makes up the global batch
    precision: str = "bf16"  # bf16 | fp16 | fp32 (CPU runs use fp32 whatever this says)
    gradient_checkpointing: bool = True
    cache_frozen_features: bool = False  # keep the frozen encoder part's output per image (small datasets)
    save_every: int = 500  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb (when installed)
    merged_export: bool = False  # also write OUTPUT_DIR/merged (LoRA folded into the LLM)
    max_steps: int = 0  # >0 stops early (smoke tests)
    seed: int = 0

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        """A YAML file, then `a.b=value` overrides (values parsed as YAML: numbers, booleans, lists)."""
        config = build(cls, read_yaml(path, overrides))
        # relative paths are relative to the working directory, as in HF scripts
        for obj, attr in [(config.data, "path"), (config.data, "image_folder"), (config.model, "init"),
                          (config.model, "tokenizer"), (config, "output_dir")]:
            if getattr(obj, attr):
                setattr(obj, attr, str(Path(getattr(obj, attr)).expanduser()))
        config.validate()
        return config

    def validate(self) -> None:
        need = [(self.stage in ("pretrain", "sft"), "stage must be pretrain or sft"),
                (self.trainable.llm in ("lora", "full", "frozen"), "trainable.llm must be lora, full or frozen"),
                (self.precision in ("bf16", "fp16", "fp32"), "precision must be bf16, fp16 or fp32"),
                (self.global_batch >= self.micro_batch >= 1, "need global_batch >= micro_batch >= 1"),
                (self.epochs > 0, "epochs must be positive"),
                (self.model.quantization in ("none", "4bit", "8bit"), "model.quantization: none, 4bit or 8bit"),
                (self.model.quantization == "none" or self.trainable.llm != "full",
                 "a quantized base cannot be trained in full; use trainable.llm: lora (QLoRA)"),
                (not self.model.tokenizer or self.model.llm == "tiny-phi",
                 "model.tokenizer is for llm: tiny-phi (a pretrained LLM keeps its own tokenizer)"),
                (bool(self.data.path), "data.path is required")]
        for ok, message in need:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML mapping with `a.b=value` overrides applied (each value parsed as YAML)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError("the config file must hold a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return data


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Nested dataclass from a dict; unknown keys are errors (a typo must not silently fall back to a default)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) in {where.rstrip('.') or 'config'}: {', '.join(unknown)}")
    return cls(**{name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()})


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Coerce a YAML value to a field's type: nested sections, tuples, and numbers YAML read as text (1e-3)."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where + ".")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        if value is None:
            return None
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list")
        return tuple(_convert(typing.get_args(hint)[0], v, where) for v in value)
    if hint in (int, float) and not isinstance(value, bool):
        try:
            return hint(value) if hint is float or isinstance(value, str) else value
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    return value
