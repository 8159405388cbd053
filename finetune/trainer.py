"""The chat trainer (caption pre-training and instruction fine-tuning): the shared loop (`finetune.loop`) over
tokenized conversations, averaging the loss over every trained token of the global batch, and the assistant
checkpoint folder at the end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from assistant.model import merge_checkpoint
from tokenizer_tap.errors import ImageError

from .config import TrainConfig
from .data import IGNORE, Encoded, Report, load_records, prepare
from .loop import TrainLoop
from .model import Batch, TrainModel, build_chat, parameter_groups, set_trainable
from .vision import VisionTower, image_key, read_image

log = logging.getLogger("tapchat.finetune")


@dataclass
class Result:
    output_dir: Path
    steps: int
    final_loss: float
    samples_per_s: float
    tokens_per_s: float
    report: Report
    skipped_images: list[str]


class Trainer(TrainLoop):
    weights = {"tokens": 1.0}

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        dtype = torch.float32  # master weights; autocast gives bf16/fp16 compute on GPUs
        chat, tap = build_chat(config, self.acc.device, dtype)
        set_trainable(chat, config)
        cache = 1 << 20 if config.cache_frozen_features else 0
        vision = VisionTower(tap, config.trainable.encoder_blocks, cache_size=cache)
        if config.gradient_checkpointing and hasattr(chat.llm, "gradient_checkpointing_enable"):
            chat.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = TrainModel(chat, vision, uniform=self.acc.num_processes > 1).train()
        tap.eval()  # the frozen TAP keeps its norms as at inference
        raws = load_records(config.data.path)
        self.samples, self.report = prepare(raws, chat.tokenize, chat.eos_id, stage=config.stage,
                                            num_visual=chat.num_visual_tokens, max_length=config.data.max_length,
                                            image_folder=config.data.image_folder)
        if not self.samples:
            raise ValueError(f"no usable samples in {config.data.path}:\n{self.report.summary(config.data.max_length)}")
        self.skipped_images: list[str] = []
        self.image_size = tap.config.image_size
        self.setup(model, parameter_groups(model, config), len(self.samples), epochs=config.epochs)

    def collate(self, samples: list[Encoded], epoch: int = 0, micro: int = 0) -> Batch | None:
        """Read the images; a sample whose image cannot be read is skipped (and remembered by id)."""
        kept, images, keys = [], [], []
        for s in samples:
            if s.image is not None:
                try:
                    path = str(Path(self.config.data.image_folder) / s.image)
                    images.append(read_image(path, self.image_size, blank=self.config.data.blank_images))
                    keys.append(image_key(s.image))
                except ImageError as exc:
                    log.warning("skipping %s: %s", s.id, exc)
                    self.skipped_images.append(s.id)
                    continue
            kept.append(s)
        if not kept:
            return None
        return Batch(kept, torch.stack(images) if images else None, keys)

    def counts(self, batch: Batch) -> dict[str, float]:
        return {"tokens": float(sum(sum(1 for t in s.labels if t != IGNORE) for s in batch.samples))}

    def loss_terms(self, output: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"tokens": output[0]}

    def batch_size(self, batch: Batch) -> int:
        return len(batch.samples)

    def train(self, resume: bool = False) -> Result:
        stats = self.run(self.samples, resume, banner=self.report.summary(self.config.data.max_length))
        return Result(self.out, stats.steps, stats.final_loss, stats.samples_per_s, stats.per_s("tokens"),
                      self.report, self.skipped_images)

    def export(self) -> None:
        """The assistant checkpoint folder (config, projector, adapter, tuned encoder blocks), plus merged if asked."""
        acc = self.acc
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        with self.gathered(model):
            if acc.is_main_process:
                chat = model.chat
                chat.encoder_state = model.vision.trainable_state()
                chat.eval()
                chat.save_pretrained(self.out)
        if not acc.is_main_process:
            return
        (self.out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        if self.config.merged_export and chat.config.lora is not None:
            merge_checkpoint(self.out, self.out / "merged")
