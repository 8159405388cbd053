"""`tap-train`: TAP region-level pre-training on the shared loop (`finetune.loop`).

Stage 1 trains masks and concepts on SA-1B-layout data (+ priors); stage 2 adds region captions, mixing caption
images (Visual Genome layout) in at `data.caption_ratio`. The result is a TAP checkpoint folder (config, safetensors
with the official key names, caption tokenizer, concept vocabulary) that `TapPredictor.from_pretrained`, the app's
`--tap-checkpoint`, the eval harness and the chat stages load as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from accelerate import DistributedDataParallelKwargs
from torch import nn

from tokenizer_tap.build import TINY_TOKENIZER, build_tap
from tokenizer_tap.checkpoint import save_pretrained
from tokenizer_tap.config import get_config
from tokenizer_tap.hub import tokenizer_path
from tokenizer_tap.modeling.tap import TAP
from tokenizer_tap.text_tokenizer import TextTokenizer

from ..loop import TrainLoop
from .batch import TapBatch, TargetBuilder
from .config import DROP_PATH, TapTrainConfig
from .mae import init_from_mae
from .model import TapTrainModel
from .priors import Priors
from .records import open_coco, open_regions, open_vg_captions
from .samples import BadRecords, RegionDataset

log = logging.getLogger("tapchat.finetune")

#: Norm layers take no weight decay (the paper); their parameters are found by module type.
NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)


@dataclasses.dataclass
class TapResult:
    output_dir: Path
    steps: int
    final_loss: float
    images: int  # images trained on, once per epoch that saw them (bad records left out)
    images_per_s: float
    prompts_per_s: float
    bad: dict


def build_model(config: TapTrainConfig) -> tuple[TAP, Path]:
    """The network to train and its caption tokenizer, per `init` (scratch, official or a checkpoint)."""
    m = config.model
    regularise = {"decoder_dropout": m.decoder_dropout, "text_dropout": m.text_dropout}
    if config.init in ("scratch", "official"):
        base = get_config(m.preset)
        drop_path = m.drop_path if m.drop_path is not None else DROP_PATH.get(m.preset, 0.1)
        tap_config = dataclasses.replace(base, **m.overrides, drop_path=drop_path, **regularise)
        if config.init == "scratch":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                tap = TAP(tap_config)
            tap.init_weights()
            if m.mae:
                log.info("%s", init_from_mae(tap.image_encoder, m.mae).summary())
        else:  # the public v1.1 weights of the preset, from the hub cache
            tap = build_tap(tap_config, None, concepts=None, device="cpu", dtype="float32")
        tokenizer = Path(m.tokenizer) if m.tokenizer else (
            TINY_TOKENIZER if tap_config.vocab_size != 32000 else tokenizer_path())
    else:  # continue from a TAP checkpoint folder (ours) or a weights file of the preset
        folder = Path(config.init) if Path(config.init).is_dir() else None
        base = get_config(folder or m.preset)
        drop_path = m.drop_path if m.drop_path is not None else DROP_PATH.get(base.name, 0.1)
        tap = build_tap(dataclasses.replace(base, drop_path=drop_path, **regularise), folder or config.init,
                        concepts=None, device="cpu", dtype="float32")
        own = folder / "text_tokenizer.model" if folder is not None else None
        tokenizer = Path(m.tokenizer) if m.tokenizer else (own if own is not None and own.is_file() else (
            TINY_TOKENIZER if tap.config.vocab_size != 32000 else tokenizer_path()))
    return tap.float(), tokenizer


def parameter_groups(tap: TAP, config: TapTrainConfig) -> list[dict]:
    """AdamW groups: weight decay on weights (and biases, as v1.1), none on norms; optional layer-wise lr decay."""
    o = config.optim
    norm_params = {id(p) for mod in tap.modules() if isinstance(mod, NORMS) for p in mod.parameters()}
    norm_params |= {id(p) for name, p in tap.named_parameters() if name.endswith("output_conv.1.weight")
                    or name.endswith("output_conv.1.bias")}  # the decoder's channel LayerNorm
    depth = len(tap.image_encoder.blocks)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in tap.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if id(p) in norm_params or (name.endswith(".bias") and not o.decay_biases) else o.weight_decay
        lr = o.lr
        if o.layer_decay < 1.0 and name.startswith("image_encoder."):
            layer = int(name.split(".")[2]) + 1 if name.startswith("image_encoder.blocks.") else (
                0 if name.startswith(("image_encoder.patch_embed", "image_encoder.pos_embed")) else depth)
            lr = o.lr * o.layer_decay ** (depth - layer)
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


class TapTrainer(TrainLoop):
    def __init__(self, config: TapTrainConfig) -> None:
        super().__init__(config, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        if self.deepspeed and self.acc.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError("tap-train runs on DDP or DeepSpeed ZeRO-1/2 (even TAP-XL's weights fit one GPU); ZeRO-3 "
                             "would need every rank to call the same modules, and images differ in their prompts")
        self.tap, tokenizer_file = build_model(config)
        self.tokenizer_file = tokenizer_file
        self.weights = {"seg": config.loss.alpha, "concept": config.loss.concept,
                        "caption": config.loss.beta if config.stage == 2 else 0.0}
        self.priors = Priors(config.data.priors) if config.data.priors else None
        concept_weights, self.concept_names = None, []
        if self.priors is not None:
            if self.priors.dim != self.tap.config.sem_embed_dim:
                raise ValueError(f"the priors are {self.priors.dim}-d but {self.tap.config.name} predicts "
                                 f"{self.tap.config.sem_embed_dim}-d semantic embeddings: set "
                                 f"model.overrides.sem_embed_dim={self.priors.dim} or use matching priors")
            concept_weights, self.concept_names = self.priors.concepts()
        self.notes = [] if self.priors is not None else ["no data.priors: L_concept is off"]
        self._set_trainable()
        tokenizer = TextTokenizer(tokenizer_file)
        if tokenizer.n_words != self.tap.config.vocab_size:
            raise ValueError(f"caption tokenizer {tokenizer_file} has {tokenizer.n_words} pieces, the text decoder "
                             f"{self.tap.config.vocab_size}: give model.tokenizer")
        c = self.tap.config
        self.builder = TargetBuilder(c.image_size, c.grid_size * 4, config.sampler.prompts_per_image,
                                     config.data.scale_jitter, tokenizer, c.max_text_len - 1, self.priors,
                                     c.sem_embed_dim)
        self.bad = BadRecords()
        self.masks, self.captions = self._open_data()
        self.items = self._mix()
        model = TapTrainModel(self.tap, config.loss, config.sampler, concept_weights)
        self.tap.image_encoder.gradient_checkpointing = config.gradient_checkpointing
        self.tap.to(self.acc.device)
        self.setup(model, parameter_groups(self.tap, config), len(self.items), steps=config.steps)

    # -------------------------------------------------------------------------------------------------- data
    def _open_data(self) -> tuple[RegionDataset | None, RegionDataset | None]:
        d = self.config.data
        masks = None
        if d.sa1b:
            masks = open_regions(d.sa1b, bad=self.bad, max_masks=d.max_masks or None)
        elif d.coco:
            masks = open_coco(d.coco, d.image_folder, captions=d.coco_captions or None, bad=self.bad,
                              max_masks=d.max_masks or None)
        captions = None
        if d.captions and self.config.stage == 2:
            captions = open_vg_captions(d.captions, d.image_folder or Path(d.captions).parent, bad=self.bad)
        if masks is None and captions is None:
            raise ValueError("stage 1 needs masks: give data.sa1b or data.coco (captions are used in stage 2)")
        return masks, captions

    def _mix(self) -> list[tuple[int, int]]:
        """(source, index) items: every mask image once, plus caption images at `caption_ratio` of the mixture."""
        items = [(0, i) for i in range(len(self.masks))] if self.masks is not None else []
        if self.captions is not None and len(self.captions):
            ratio = self.config.data.caption_ratio if items else 1.0
            want = len(self.captions) if not items else round(len(items) * ratio / max(1e-9, 1 - ratio))
            if ratio >= 1.0:
                items, want = [], len(self.captions)
            g = torch.Generator().manual_seed(self.config.seed)
            reps = math.ceil(want / len(self.captions))
            pool = torch.cat([torch.randperm(len(self.captions), generator=g) for _ in range(reps)])[:want]
            items += [(1, int(i)) for i in pool]
        if not items:
            raise ValueError("no usable images in the data")
        return items

    def collate(self, items: list[tuple[int, int]], epoch: int = 0, micro: int = 0) -> TapBatch | None:
        out = []
        for source, index in items:
            dataset = self.masks if source == 0 else self.captions
            sample = dataset[index]
            if sample is None:
                continue
            seed = hash((self.config.seed, epoch, source, index)) & 0x7FFFFFFF
            target = self.builder.build(sample, seed, with_captions=self.config.stage == 2)
            if target is not None:
                out.append(target)
        return TapBatch(out) if out else None

    def counts(self, batch: TapBatch) -> dict[str, float]:
        seg = concept = caption = 0.0
        for item in batch.images:
            stages = item.stages.float()
            seg += float(sum(2.0 if self.config.sampler.second_stage else 1.0 for m in item.masks if m is not None))
            if not self.config.sampler.second_stage:
                stages = torch.ones_like(stages)
            concept += float((stages * item.has_prior).sum())
            caption += float((stages * (item.caption_target != -100).sum(1)).sum())
        return {"seg": seg, "concept": concept, "caption": caption}

    def loss_terms(self, output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return output

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tap.state_dict().items() if "running_" in k or "num_batches" in k}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.tap.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    # ------------------------------------------------------------------------------------------------ model
    def _set_trainable(self) -> None:
        t, tap = self.config.trainable, self.tap
        parts = {"image_encoder": t.image_encoder, "prompt_encoder": t.prompt_encoder,
                 "image_decoder": t.image_decoder,
                 "text_decoder": t.text_decoder and self.config.stage == 2 and self.config.loss.beta > 0}
        for name, on in parts.items():
            module = getattr(tap, name)
            module.requires_grad_(on)
            module.train(on)  # a frozen part keeps its BatchNorm statistics and drops no units
        tap.image_decoder.iou_pred.requires_grad_(t.iou_head)
        if not any(p.requires_grad for p in tap.parameters()):
            raise ValueError("nothing to train: every component is frozen (trainable.*)")

    def train(self, resume: bool = False) -> TapResult:
        c = self.config
        banner = [f"TAP pre-training stage {c.stage}: {self.tap.config.name}, init {c.init}, "
                  f"{len(self.items)} images per epoch"
                  + (f" ({sum(1 for s, _ in self.items if s == 1)} caption images)" if self.captions else ""),
                  f"losses: L_seg x {self.weights['seg']}, L_concept x {self.weights['concept'] if self.priors else 0}"
                  f", L_cap x {self.weights['caption']}"] + self.notes
        stats = self.run(self.items, resume, banner="\n".join(banner))
        if self.bad.counts:
            self.acc.print("bad records skipped:\n" + self.bad.summary())
        return TapResult(self.out, stats.steps, stats.final_loss, stats.samples, stats.samples_per_s,
                         stats.per_s("seg"), self.bad.to_dict())

    def export(self) -> None:
        """The TAP checkpoint folder, plus the training config, notes and the bad-record report."""
        acc = self.acc
        acc.wait_for_everyone()
        with self.gathered(acc.unwrap_model(self.model)):
            if not acc.is_main_process:
                return
            tap = self.tap.eval()
            concepts = self.priors.concepts() if self.priors is not None else None
            if concepts is not None:
                tap.concept_projector.reset_weights(concepts[0].numpy(), concepts[1])
            save_pretrained(tap, self.out, self.tokenizer_file,
                            concepts=None if concepts is None else (concepts[0].numpy(), concepts[1]))
        (self.out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        (self.out / "data_report.json").write_text(json.dumps({"bad_records": self.bad.to_dict(),
                                                               "notes": self.notes}, indent=2))
