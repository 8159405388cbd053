"""The training loop both trainers share (chat stages and TAP pre-training): deterministic data order, gradient
accumulation to the global batch, AdamW + warm-up/cosine, periodic checkpoints that resume exactly, metrics.

One process or many (`accelerate launch` / `torchrun`: DDP through accelerate, each rank taking its share of every
global batch; or DeepSpeed ZeRO-2/3 through accelerate, where the engine owns the sharded optimizer and the
checkpoints hold its shards). Resuming restores trainable weights, optimizer, schedule, RNG and the position in the
data order, so a killed run continues on the same loss curve as an uninterrupted one.

A subclass builds its model and items, calls `setup`, and provides `collate`, `counts`, `loss_terms` and `export`.
Every loss term is a sum over the global batch divided by that term's global count (tokens, prompts, ...), so one
process and eight take the same steps.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType, PartialState
from torch import nn
from tqdm import tqdm

log = logging.getLogger("tapchat.finetune")


@dataclass
class LoopStats:
    steps: int
    final_loss: float
    seconds: float
    samples: int
    counts: dict[str, float] = field(default_factory=dict)  # summed global counts per loss term (tokens, prompts)

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)

    def per_s(self, name: str) -> float:
        return self.counts.get(name, 0.0) / max(self.seconds, 1e-9)


def cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class TrainLoop(abc.ABC):
    """Shared machinery. `config` needs output_dir, seed, micro_batch, global_batch, save_every, keep_checkpoints,
    log_every, report_to, max_steps, precision and optim (betas, weight_decay, warmup_ratio, max_grad_norm)."""

    #: Weight of each loss term in the total (subclasses override).
    weights: dict[str, float] = {}

    def __init__(self, config: Any, kwargs_handlers: list | None = None) -> None:
        self.config = config
        cuda = torch.cuda.is_available()
        precision = {"bf16": "bf16", "fp16": "fp16"}.get(config.precision, "no") if cuda else "no"
        deepspeed_cpu = not cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        if deepspeed_cpu:
            PartialState(backend="gloo")  # accelerate names no backend for DeepSpeed on CPU (tests, tiny runs)
        # cpu=True is what makes accelerate form a gloo process group for DDP on CPUs (else each rank runs alone)
        self.acc = Accelerator(mixed_precision=precision, cpu=not cuda and not deepspeed_cpu,
                               kwargs_handlers=kwargs_handlers)
        self.deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        self.out = Path(config.output_dir)
        torch.manual_seed(config.seed)
        self.step = 0

    def setup(self, model: nn.Module, groups: list[dict], num_items: int, epochs: float | None = None,
              steps: int | None = None) -> None:
        """Plan the schedule over `num_items` (a length in `epochs`, or a number of optimizer `steps`), build AdamW
        and the schedule, and hand everything to accelerate."""
        config = self.config
        self.num_items = num_items
        world = self.acc.num_processes
        self.accum = max(1, config.global_batch // (config.micro_batch * world))
        self.micro_per_epoch = math.ceil(num_items / (config.micro_batch * world))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.accum)  # a short last window still steps
        total = steps if steps is not None else math.ceil(self.steps_per_epoch * (epochs or 1.0))
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.trainable = [p for g in groups for p in g["params"]]
        o = config.optim
        self.optimizer = torch.optim.AdamW(groups, betas=o.betas, weight_decay=o.weight_decay)
        warmup = round(o.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(self.total_steps, warmup))
        if self.deepspeed:
            self._configure_deepspeed()
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)

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

    # ------------------------------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def collate(self, items: list[Any], epoch: int = 0, micro: int = 0) -> Any | None:
        """This rank's items of one micro-batch -> what the model's forward takes (None: nothing usable)."""

    @abc.abstractmethod
    def counts(self, batch: Any) -> dict[str, float]:
        """What each loss term of `batch` is averaged over (tokens, prompts), before the forward pass."""

    @abc.abstractmethod
    def loss_terms(self, output: Any) -> dict[str, torch.Tensor]:
        """The model's output -> summed loss per term (same names as `counts`)."""

    def batch_size(self, batch: Any) -> int:
        return len(batch)

    @abc.abstractmethod
    def export(self) -> None:
        """Write the trained model where its consumers load it."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter tensors a checkpoint must keep (e.g. BatchNorm statistics); none by default."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027 - optional hook, no-op here
        """Restore what `extra_state` saved (nothing by default)."""

    # ------------------------------------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def micro_batches(self, epoch: int) -> Iterator[tuple[int, list[int]]]:
        """This rank's item indices of each micro-batch of the epoch, in a fixed order (the same on resume)."""
        order = self.epoch_order(epoch)
        size, world, rank = self.config.micro_batch, self.acc.num_processes, self.acc.process_index
        for m in range(self.micro_per_epoch):
            chunk = order[m * size * world:(m + 1) * size * world]
            yield m, chunk[rank::world]

    # -------------------------------------------------------------------------------------------- training
    def run(self, items: list[Any], resume: bool = False, banner: str = "") -> LoopStats:
        config, acc = self.config, self.acc
        start_epoch, start_micro = 0, 0
        if resume and (ckpt := self.latest_checkpoint()) is not None:
            start_epoch, start_micro = self.load_checkpoint(ckpt)
            acc.print(f"resumed from {ckpt} at step {self.step}")
        if banner:
            acc.print(banner)
        acc.print(f"processes: {acc.num_processes} ({acc.distributed_type.value}); each step: {self.accum} "
                  f"micro-batches of {config.micro_batch} per process")
        writer = self._writers()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process, dynamic_ncols=True,
                   mininterval=0 if sys.stderr.isatty() else 10, desc="train")
        window: list[Any] = []
        t0, seen, totals, last_loss = time.monotonic(), 0, {}, float("nan")
        epoch = start_epoch
        while self.step < self.total_steps:
            for m, idx in self.micro_batches(epoch):
                if epoch == start_epoch and m < start_micro:
                    continue
                batch = self.collate([items[i] for i in idx], epoch, m)
                if batch is not None:
                    window.append(batch)
                if (m + 1) % self.accum and m + 1 != self.micro_per_epoch:
                    continue
                last_loss, terms, counts, samples = self._optimizer_step(window)
                seen += samples
                for k, v in counts.items():
                    totals[k] = totals.get(k, 0.0) + v
                window = []
                self.step += 1
                elapsed = time.monotonic() - t0
                lr = self.scheduler.get_last_lr()[0]
                if acc.is_main_process:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{seen / elapsed:.1f}")
                    metrics = {"loss": last_loss, "lr": lr, "samples_per_s": seen / elapsed, "epoch": epoch}
                    metrics.update({f"{k}_per_s": v / elapsed for k, v in totals.items()})
                    if len(terms) > 1:
                        metrics.update({f"loss_{k}": v for k, v in terms.items()})
                    self._log(writer, metrics)
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
        return LoopStats(self.step, last_loss, elapsed, seen, totals)

    def _optimizer_step(self, window: list[Any]) -> tuple[float, dict[str, float], dict[str, float], int]:
        """Accumulate the window's gradients, clip, step. Each term is its sum over the global batch divided by its
        global count (DDP and DeepSpeed average gradients over ranks, hence `* world`).

        Returns the total loss, the mean of each term, the global counts and the number of samples."""
        acc = self.acc
        names = sorted({k for b in window for k in self.counts(b)} | set(self.weights))
        local = [sum(self.counts(b).get(k, 0.0) for b in window) for k in names]
        counts = dict(zip(names, acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device),
                                            "sum").tolist()))
        world = acc.num_processes
        sums = dict.fromkeys(names, 0.0)
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            if self.deepspeed:  # the engine accumulates, clips and steps at the boundary we mark
                with acc.autocast():
                    terms = self.loss_terms(self.model(batch))
                    loss = self._weighted(terms, counts, world)
                self.model.set_gradient_accumulation_boundary(last)
                self.model.backward(loss, scale_wrt_gas=False)
                if last:
                    self.model.step()
            else:
                with acc.no_sync(self.model) if not last else contextlib.nullcontext(), acc.autocast():
                    terms = self.loss_terms(self.model(batch))
                    loss = self._weighted(terms, counts, world)
                    acc.backward(loss)
            for k, v in terms.items():
                sums[k] += float(v.detach())
        if not self.deepspeed:
            if self.config.optim.max_grad_norm > 0 and self.trainable:
                acc.clip_grad_norm_(self.trainable, self.config.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stats = acc.reduce(torch.tensor([sums[k] for k in names] + [sum(self.batch_size(b) for b in window)],
                                        dtype=torch.float64, device=acc.device), "sum").tolist()
        means = {k: s / max(1.0, counts[k]) for k, s in zip(names, stats)}
        total = sum(self.weights.get(k, 1.0) * v for k, v in means.items())
        return total, means, counts, int(stats[-1])

    def _weighted(self, terms: dict[str, torch.Tensor], counts: dict[str, float], world: int) -> torch.Tensor:
        return sum(self.weights.get(k, 1.0) * v * (world / max(1.0, counts[k])) for k, v in terms.items())

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
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                     "extra": {k: v.detach().cpu() for k, v in self.extra_state().items()}}
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
        self.load_extra_state(state.get("extra", {}))
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

    def gathered(self, model: nn.Module):
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
