"""The training loop: deterministic data order, gradient accumulation to the global batch, AdamW + warm-up/cosine,
periodic checkpoints that resume exactly, and the assistant checkpoint folder at the end.

One process or many (`accelerate launch` / `torchrun`: DDP through accelerate, each rank taking its share of every
global batch; or DeepSpeed ZeRO-2/3 through accelerate, where the engine owns the sharded optimizer and the
checkpoints hold its shards). Resuming restores trainable weights, optimizer, schedule, RNG and the position in the
data order, so a killed run continues on the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType, PartialState
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
        deepspeed_cpu = not cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        if deepspeed_cpu:
            PartialState(backend="gloo")  # accelerate names no backend for DeepSpeed on CPU (tests, tiny runs)
        # cpu=True is what makes accelerate form a gloo process group for DDP on CPUs (else each rank runs alone)
        self.acc = Accelerator(mixed_precision=precision, cpu=not cuda and not deepspeed_cpu)
        self.deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        self.out = Path(config.output_dir)
        torch.manual_seed(config.seed)
        dtype = torch.float32  # master weights; autocast gives bf16/fp16 compute on GPUs
        chat, tap = build_chat(config, self.acc.device, dtype)
        set_trainable(chat, config)
        cache = 1 << 20 if config.cache_frozen_features else 0
        vision = VisionTower(tap, config.trainable.encoder_blocks, cache_size=cache)
        if config.gradient_checkpointing and hasattr(chat.llm, "gradient_checkpointing_enable"):
            chat.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = TrainModel(chat, vision, uniform=self.acc.num_processes > 1).train()
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
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.accum)  # a short last window still steps
        total = math.ceil(self.steps_per_epoch * config.epochs)
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        groups = parameter_groups(self.model, config)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=config.optim.betas, weight_decay=config.optim.weight_decay)
        warmup = round(config.optim.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(self.total_steps, warmup))
        if self.deepspeed:
            self._configure_deepspeed()
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.step, self.skipped_images = 0, []
        self.image_size = tap.config.image_size

    def _configure_deepspeed(self) -> None:
        """Batch sizes and clipping come from our config, so the global batch means the same as under DDP."""
        ds = self.acc.state.deepspeed_plugin.deepspeed_config
        if "scheduler" in ds or "optimizer" in ds:
            raise ValueError("the DeepSpeed config must not define an optimizer or scheduler: the trainer's AdamW and "
                             "warm-up/cosine schedule (optim.* in the training config) are used")
        ds["train_micro_batch_size_per_gpu"] = self.config.micro_batch
        ds["gradient_accumulation_steps"] = self.accum
        ds["train_batch_size"] = self.config.micro_batch * self.accum * self.acc.num_processes
        ds["gradient_clipping"] = self.config.optim.max_grad_norm

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
        acc.print(f"processes: {acc.num_processes} ({acc.distributed_type.value}); each step: {self.accum} "
                  f"micro-batches of {config.micro_batch} per process")
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
                last_loss, tokens, samples = self._optimizer_step(window)
                seen_samples += samples
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

    def _optimizer_step(self, window: list[Batch]) -> tuple[float, int, int]:
        """Accumulate the window's gradients, clip, step. The loss is the mean over every trained token of the global
        batch, whatever the number of ranks (DDP and DeepSpeed average gradients over ranks, hence `* world`), so one
        process and eight take the same steps.

        Returns the global batch's mean loss, trained tokens and samples."""
        acc = self.acc
        local = sum(sum(1 for t in s.labels if t != IGNORE) for b in window for s in b.samples)
        tokens = int(acc.reduce(torch.tensor(local, device=acc.device), "sum").item())
        scale = acc.num_processes / max(1, tokens)
        loss_sum = 0.0
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            if self.deepspeed:  # the engine accumulates, clips and steps at the boundary we mark
                with acc.autocast():
                    loss, _ = self.model(batch)
                self.model.set_gradient_accumulation_boundary(last)
                self.model.backward(loss * scale, scale_wrt_gas=False)
                if last:
                    self.model.step()
            else:
                with acc.no_sync(self.model) if not last else contextlib.nullcontext(), acc.autocast():
                    loss, _ = self.model(batch)
                    acc.backward(loss * scale)
            loss_sum += float(loss.detach())
        if not self.deepspeed:
            if self.config.optim.max_grad_norm > 0 and self.trainable:
                acc.clip_grad_norm_(self.trainable, self.config.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stats = acc.reduce(torch.tensor([loss_sum, sum(len(b.samples) for b in window)], dtype=torch.float64,
                                        device=acc.device), "sum").tolist()
        return stats[0] / max(1, tokens), tokens, int(stats[1])

    # ----------------------------------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        found = sorted(p.parent for p in (self.out / "checkpoints").glob("step-*/progress.json"))
        return found[-1] if found else None

    def save_checkpoint(self, epoch: int, micro: int) -> Path:
        """Trainable weights, optimizer, schedule, RNG and data position; the oldest beyond `keep` are removed.

        Under DeepSpeed every rank writes its own optimizer shard through the engine (frozen weights left out)."""
        acc = self.acc
        folder = self.out / "checkpoints" / f"step-{self.step:07d}"
        if self.deepspeed:
            self.model.save_checkpoint(str(folder), tag="engine", exclude_frozen_parameters=True)
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            state = {"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            if not self.deepspeed:
                model = acc.unwrap_model(self.model)
                torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                           folder / "trainable.pt")
                state["optimizer"] = self.optimizer.state_dict()
            torch.save(state, folder / "state.pt")
            partial = folder / "progress.json.tmp"  # written last and renamed: its presence marks a whole checkpoint
            partial.write_text(json.dumps({"step": self.step, "epoch": epoch, "micro": micro}))
            os.replace(partial, folder / "progress.json")
            for old in sorted((self.out / "checkpoints").glob("step-*"))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return folder

    def load_checkpoint(self, folder: Path) -> tuple[int, int]:
        if self.deepspeed:
            self.model.load_checkpoint(str(folder), tag="engine", load_module_strict=False)
        else:
            model = self.acc.unwrap_model(self.model)
            weights = torch.load(folder / "trainable.pt", map_location=self.acc.device)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        if not self.deepspeed:
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
        model = acc.unwrap_model(self.model)
        with self._gathered(model):
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

    def _gathered(self, model: TrainModel):
        """ZeRO-3 keeps each weight in shards across ranks; saving needs the full tensors on every rank for a while."""
        if not (self.deepspeed and self.acc.state.deepspeed_plugin.zero_stage == 3):
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)

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

