"""The training loop: deterministic data order, gradient accumulation to the global batch, AdamW + warm-up/cosine,
periodic checkpoints that resume exactly, and the assistant checkpoint folder at the end.

One process or many (`accelerate launch` / `torchrun`: DDP through accelerate, each rank taking its share of every
global batch). Resuming restores trainable weights, optimizer, schedule, RNG and the position in the data order, so
a killed run continues on the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from tqdm import tqdm

from assistant.model import merge_checkpoint
from tokenizer_tap.errors import ImageError

from .config import TrainConfig
from .data import IGNORE, Encoded, Report, load_records, prepare
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


def cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        cuda = torch.cuda.is_available()
        precision = {"bf16": "bf16", "fp16": "fp16"}.get(config.precision, "no") if cuda else "no"
        self.acc = Accelerator(mixed_precision=precision, cpu=not cuda)
        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            raise NotImplementedError("DeepSpeed is not supported yet (sharded optimizer states need their own "
                                      "checkpointing); use DDP: accelerate launch --multi_gpu -m finetune train ...")
        self.out = Path(config.output_dir)
        torch.manual_seed(config.seed)
        dtype = torch.float32  # master weights; autocast gives bf16/fp16 compute on GPUs
        chat, tap = build_chat(config, self.acc.device, dtype)
        set_trainable(chat, config)
        cache = 1 << 20 if config.cache_frozen_features else 0
        vision = VisionTower(tap, config.trainable.encoder_blocks, cache_size=cache)
        if config.gradient_checkpointing and hasattr(chat.llm, "gradient_checkpointing_enable"):
            chat.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = TrainModel(chat, vision).train()
        tap.eval()  # TAP has no dropout; eval keeps its norms as at inference
        tokenizer_fn = chat.tokenize
        raws = load_records(config.data.path)
        self.samples, self.report = prepare(raws, tokenizer_fn, chat.eos_id, stage=config.stage,
                                            num_visual=chat.num_visual_tokens, max_length=config.data.max_length,
                                            image_folder=config.data.image_folder)
        if not self.samples:
            raise ValueError(f"no usable samples in {config.data.path}:\n{self.report.summary(config.data.max_length)}")
        world = self.acc.num_processes
        self.accum = max(1, config.global_batch // (config.micro_batch * world))
        self.micro_per_epoch = math.ceil(len(self.samples) / (config.micro_batch * world))
        self.steps_per_epoch = max(1, self.micro_per_epoch // self.accum)
        total = math.ceil(self.steps_per_epoch * config.epochs)
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        groups = parameter_groups(self.model, config)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=config.optim.betas, weight_decay=config.optim.weight_decay)
        warmup = round(config.optim.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(self.total_steps, warmup))
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.step, self.skipped_images = 0, []
        self.image_size = tap.config.image_size

    # ------------------------------------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return torch.randperm(len(self.samples), generator=g).tolist()

    def micro_batches(self, epoch: int):
        """This rank's micro-batches of the epoch, in a fixed order (the same on resume)."""
        order = self.epoch_order(epoch)
        size, world, rank = self.config.micro_batch, self.acc.num_processes, self.acc.process_index
        for m in range(self.micro_per_epoch):
            chunk = order[m * size * world:(m + 1) * size * world]
            yield m, [self.samples[i] for i in chunk[rank::world]]

    def collate(self, samples: list[Encoded]) -> Batch | None:
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

    # -------------------------------------------------------------------------------------------- training
    def train(self, resume: bool = False) -> Result:
        config, acc = self.config, self.acc
        start_epoch, start_micro = 0, 0
        if resume and (ckpt := self.latest_checkpoint()) is not None:
            start_epoch, start_micro = self.load_checkpoint(ckpt)
            acc.print(f"resumed from {ckpt} at step {self.step}")
        acc.print(self.report.summary(config.data.max_length))
        writer = self._writers()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process, dynamic_ncols=True,
                   mininterval=0 if sys.stderr.isatty() else 10, desc="train")
        window: list[Batch] = []
        t0, seen_samples, seen_tokens, last_loss = time.monotonic(), 0, 0, float("nan")
        epoch = start_epoch
        while self.step < self.total_steps:
            for m, samples in self.micro_batches(epoch):
                if epoch == start_epoch and m < start_micro:
                    continue
                batch = self.collate(samples)
                if batch is not None:
                    window.append(batch)
                if (m + 1) % self.accum and m + 1 != self.micro_per_epoch:
                    continue
                last_loss, tokens = self._optimizer_step(window)
                seen_samples += sum(len(b.samples) for b in window)
                seen_tokens += tokens
                window = []
                self.step += 1
                elapsed = time.monotonic() - t0
                lr = self.scheduler.get_last_lr()[0]
                if acc.is_main_process:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{seen_samples / elapsed:.1f}")
                    self._log(writer, {"loss": last_loss, "lr": lr, "samples_per_s": seen_samples / elapsed,
                                       "tokens_per_s": seen_tokens / elapsed, "epoch": epoch})
                if config.save_every and self.step % config.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint(epoch, m + 1)
                if self.step >= self.total_steps:
                    break
            epoch += 1
        bar.close()
        elapsed = time.monotonic() - t0
        self.export()
        for w in writer.values():
            w.close() if hasattr(w, "close") else w.finish()
        return Result(self.out, self.step, last_loss, seen_samples / elapsed, seen_tokens / elapsed, self.report,
                      self.skipped_images)

    def _optimizer_step(self, window: list[Batch]) -> tuple[float, int]:
        """Accumulate the window's gradients (loss = mean over its trained tokens), clip, step."""
        acc = self.acc
        counts = [sum(sum(1 for t in s.labels if t != IGNORE) for s in b.samples) for b in window]
        total = max(1, sum(counts))
        loss_sum = 0.0
        for i, batch in enumerate(window):
            sync = acc.no_sync(self.model) if i < len(window) - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                loss, _ = self.model(batch)
                acc.backward(loss / total)
            loss_sum += float(loss.detach())
        if self.config.optim.max_grad_norm > 0 and self.trainable:
            acc.clip_grad_norm_(self.trainable, self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / total, total

    # ----------------------------------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.out / "checkpoints").glob("step-*"))
        return found[-1] if found else None

    def save_checkpoint(self, epoch: int, micro: int) -> Path:
        """Trainable weights, optimizer, schedule, RNG and data position; the oldest beyond `keep` are removed."""
        acc = self.acc
        folder = self.out / "checkpoints" / f"step-{self.step:07d}"
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            model = acc.unwrap_model(self.model)
            torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                       folder / "trainable.pt")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       folder / "state.pt")
            (folder / "progress.json").write_text(json.dumps({"step": self.step, "epoch": epoch, "micro": micro}))
            for old in sorted((self.out / "checkpoints").glob("step-*"))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return folder

    def load_checkpoint(self, folder: Path) -> tuple[int, int]:
        model = self.acc.unwrap_model(self.model)
        weights = torch.load(folder / "trainable.pt", map_location=self.acc.device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        progress = json.loads((folder / "progress.json").read_text())
        self.step = progress["step"]
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file() and self.acc.is_main_process:  # steps logged after the checkpoint will be redone
            rows = [r for r in metrics.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
            metrics.write_text("".join(r + "\n" for r in rows))
        epoch, micro = progress["epoch"], progress["micro"]
        if micro >= self.micro_per_epoch:
            epoch, micro = epoch + 1, 0
        return epoch, micro

    def export(self) -> None:
        """The assistant checkpoint folder (config, projector, adapter, tuned encoder blocks), plus merged if asked."""
        acc = self.acc
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.model)
        chat = model.chat
        chat.encoder_state = model.vision.trainable_state()
        chat.eval()
        chat.save_pretrained(self.out)
        (self.out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        if self.config.merged_export and chat.config.lora is not None:
            merge_checkpoint(self.out, self.out / "merged")

    # --------------------------------------------------------------------------------------------- logging
    def _writers(self) -> dict:
        writers: dict = {}
        if not self.acc.is_main_process:
            return writers
        self.out.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.config.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writers["tensorboard"] = SummaryWriter(str(self.out / "logs"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")
        if "wandb" in self.config.report_to:
            try:
                import wandb
                writers["wandb"] = wandb.init(project="tapchat", config=self.config.to_dict(), dir=str(self.out))
            except ImportError:
                log.warning("wandb is not installed; skipping it")
        return writers

    def _log(self, writers: dict, metrics: dict) -> None:
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self.step % max(1, self.config.log_every) and self.step != self.total_steps:
            return
        if "tensorboard" in writers:
            for k, v in metrics.items():
                writers["tensorboard"].add_scalar(f"train/{k}", v, self.step)
        if "wandb" in writers:
            writers["wandb"].log(metrics, step=self.step)

