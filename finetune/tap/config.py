"""`TapTrainConfig`: one TAP pre-training run (`python -m finetune tap-train CONFIG [key=value ...]`).

Defaults follow the paper's stage 1 (TAP-v2-Base): AdamW (0.9, 0.999), lr 1e-3, cosine, weight decay 0.1 (none on
norms; biases decayed as in v1.1), dropout 0.1 in the image decoder and 0.4 in the text decoder, scale jitter
[0.5, 2.0], up to 64 prompts per image per sampling stage, L = L_concept + alpha * L_seg + beta * L_cap with beta 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import build, read_yaml

#: The paper's drop-path rate per encoder size (B / L / XL); other sizes take the nearest.
DROP_PATH = {"tap_vit_b": 0.1, "tap_vit_l": 0.2, "tap_vit_h": 0.2, "tap_vit_xl": 0.2}


@dataclass
class TapDataConfig:
    """Where regions come from. Masks: `sa1b` (SA-1B layout: folder or .tar shards) or `coco` (an instances
    file, "my own data"). Captions: `captions` (Visual Genome official or GRiT JSON), mixed in stage 2."""

    sa1b: str = ""
    coco: str = ""
    coco_captions: str = ""  # optional region captions matched to the COCO instances
    image_folder: str = ""  # images of `coco` and `captions`
    priors: str = ""  # the output of `tap-priors`; without it L_concept is off
    captions: str = ""
    caption_ratio: float = 0.5  # fraction of stage-2 images drawn from `captions` (CaptionSA mixes ~4 %)
    max_masks: int = 0  # >0: use at most this many masks per image (in file order)
    scale_jitter: tuple[float, float] = (0.5, 2.0)  # random rescale of the fitted image; (1, 1) turns it off


@dataclass
class TapModelConfig:
    """The network: a preset (tap_tiny ... tap_vit_xl) with optional field overrides (e.g. a small image_size)."""

    preset: str = "tap_vit_b"
    overrides: dict[str, Any] = field(default_factory=dict)  # TAPConfig fields
    drop_path: float | None = None  # None: the paper's rate for the preset (DROP_PATH)
    decoder_dropout: float = 0.1
    text_dropout: float = 0.4
    tokenizer: str = ""  # caption tokenizer; "" = the LLaMA tokenizer (the bundled tiny one for tap_tiny)
    mae: str = ""  # with init=scratch: facebook/vit-mae-* (or a local copy) for the image encoder


@dataclass
class TapTrainableConfig:
    """Which components learn (the paper's VG caption fine-tune freezes the encoder and decoder)."""

    image_encoder: bool = True
    prompt_encoder: bool = True
    image_decoder: bool = True
    text_decoder: bool = True
    # the decoder's IoU head (image_decoder.iou_pred), also with image_decoder off: refitting it alone on a frozen
    # TAP changes which point mask is routed and the scores shown, nothing else (masks, concepts, captions)
    iou_head: bool = True


@dataclass
class TapLossConfig:
    """L = concept * L_concept + alpha * L_seg + beta * L_cap, L_seg = focal * focal + dice * dice + iou * MSE."""

    alpha: float = 1.0
    beta: float = 0.0
    concept: float = 1.0
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    label_smoothing: float = 0.0  # of the caption cross-entropy


@dataclass
class TapSamplerConfig:
    """The paper's two-stage prompt sampler (§3.1)."""

    prompts_per_image: int = 64  # per sampling stage
    box_prob: float = 0.5  # first stage: a box, else a point
    box_noise: float = 0.1  # box corners jittered by up to this fraction of the side (at most 20 px), as SAM
    non_interactive_prob: float = 0.5  # second stage: 1..max_points points from the GT mask instead of the error
    max_points: int = 9
    second_stage: bool = True


@dataclass
class TapOptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.1
    decay_biases: bool = True  # v1.1 decays biases too (avoids fp16 overflow in the QK product); norms never
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0  # 0 disables clipping
    layer_decay: float = 1.0  # <1: layer-wise lr decay for the image encoder (block i gets decay^(depth - i))


@dataclass
class TapTrainConfig:
    stage: int = 1  # 1: masks + concept priors (beta 0); 2: + region captions
    init: str = "scratch"  # scratch | official (the v1.1 weights of the preset) | a TAP checkpoint folder or file
    data: TapDataConfig = field(default_factory=TapDataConfig)
    model: TapModelConfig = field(default_factory=TapModelConfig)
    trainable: TapTrainableConfig = field(default_factory=TapTrainableConfig)
    loss: TapLossConfig = field(default_factory=TapLossConfig)
    sampler: TapSamplerConfig = field(default_factory=TapSamplerConfig)
    optim: TapOptimConfig = field(default_factory=TapOptimConfig)
    output_dir: str = "runs/tap"
    steps: int = 180_000  # length of the schedule in optimizer steps
    max_steps: int = 0  # >0 stops early (and the schedule fits it)
    global_batch: int = 256  # images per optimizer step
    micro_batch: int = 4  # images per forward pass and device
    precision: str = "bf16"  # bf16 | fp16 | fp32 (CPU runs use fp32 whatever this says)
    gradient_checkpointing: bool = True
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    seed: int = 0

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> TapTrainConfig:
        config = build(cls, read_yaml(path, overrides))
        config.validate()
        return config

    def validate(self) -> None:
        d = self.data
        need = [(self.stage in (1, 2), "stage must be 1 or 2"),
                (bool(d.sa1b or d.coco or d.captions), "give data.sa1b, data.coco or data.captions"),
                (not (d.sa1b and d.coco), "give data.sa1b or data.coco, not both"),
                (0.0 <= d.caption_ratio <= 1.0, "data.caption_ratio must be in [0, 1]"),
                (len(d.scale_jitter) == 2 and 0 < d.scale_jitter[0] <= d.scale_jitter[1],
                 "data.scale_jitter must be [low, high] with 0 < low <= high"),
                (self.precision in ("bf16", "fp16", "fp32"), "precision must be bf16, fp16 or fp32"),
                (self.global_batch >= self.micro_batch >= 1, "need global_batch >= micro_batch >= 1"),
                (self.steps > 0, "steps must be positive"),
                (1 <= self.sampler.max_points <= 64, "sampler.max_points must be 1..64"),
                (self.sampler.prompts_per_image >= 1, "sampler.prompts_per_image must be at least 1"),
                (self.init in ("scratch", "official") or Path(self.init).exists(),
                 f"init must be scratch, official or an existing checkpoint, got {self.init!r}")]
        for ok, message in need:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
