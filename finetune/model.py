"""The model being trained: TAP's vision tower + projector + Phi-2 (LoRA), with only the chosen parts learning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from assistant.config import ChatConfig
from assistant.llm import TINY_LLM, LoraSettings, TinyPhi, missing_files
from assistant.model import IMAGE_TOKEN, ChatModel
from assistant.projector import ProjectorConfig
from tokenizer_tap.build import build_tap
from tokenizer_tap.errors import WeightsNotFoundError
from tokenizer_tap.hub import hub_reachable
from tokenizer_tap.modeling.tap import TAP

from .config import TrainConfig
from .data import IGNORE, Encoded
from .vision import VisionTower


@dataclass
class Batch:
    samples: list[Encoded]
    images: torch.Tensor | None  # (n, S, S, 3) uint8 for the samples that have an image, in order
    keys: list[str]  # cache keys of those images


def build_chat(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[ChatModel, TAP]:
    """A new TAP-Chat model from the config, or the `model.init` checkpoint to continue from."""
    m = config.model
    if m.init:
        chat = ChatModel.from_pretrained(m.init, dtype=dtype, device=device, quantization=m.quantization)
        tap_name = chat.config.tap_location(m.init)
    else:  # a TAP checkpoint folder (e.g. from `tap-train`) is recorded as the model, so the result loads with it
        tap_name = m.tap_checkpoint if m.tap_checkpoint and Path(m.tap_checkpoint).is_dir() else m.tap_model
    # tap_tiny has no public weights: it is the seed-0 random model, exactly what the assistant builds for it
    tap = build_tap(tap_name, m.tap_checkpoint or None, concepts=None, device=device, dtype=torch.float32,
                    random_weights=tap_name == "tap_tiny" and not m.tap_checkpoint, seed=0)
    if m.init:
        if chat.encoder_state:
            tap.image_encoder.load_state_dict(chat.encoder_state, strict=False)
        if m.find_grounding is not None:
            chat.config = chat.config.with_(find_grounding=m.find_grounding)
        return chat, tap
    tiny = TinyPhi(**m.tiny_llm) if m.llm == TINY_LLM else None
    hidden = tiny.hidden_size if tiny is not None else _hidden_size(m.llm)
    chat_config = ChatConfig(mode="tapchat", tap_model=tap_name, llm=m.llm,
                             projector=ProjectorConfig(in_dim=tap.config.encoder_embed_dim,
                                                       out_dim=hidden,
                                                       grid=tap.config.grid_size, **m.projector),
                             lora=(LoraSettings(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout)
                                   if config.trainable.llm == "lora" else None),
                             find_grounding=m.find_grounding)
    chat = ChatModel.create(chat_config, dtype=dtype, device=device, quantization=m.quantization, seed=m.seed,
                            tiny=tiny, tokenizer=m.tokenizer or None)
    return chat, tap


def _hidden_size(llm: str) -> int:
    """The LLM's embedding width (the projector's output), from its config in the cache or a folder."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(llm, local_files_only=not hub_reachable()).hidden_size
    except OSError:
        raise WeightsNotFoundError(f"{llm}: config.json not found locally or on the hub; missing: "
                                   f"{', '.join(missing_files(llm)) or 'config.json'}") from None


class TrainModel(nn.Module):
    """forward(batch) -> (summed token loss, number of trained tokens)."""

    def __init__(self, chat: ChatModel, vision: VisionTower, uniform: bool = False) -> None:
        super().__init__()
        self.chat, self.vision = chat, vision
        self.uniform = uniform

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        chat = self.chat
        visual, unused = None, None
        images = batch.images
        if images is None and self.uniform and chat.projector is not None:
            # With several ranks every rank must run the same modules (DDP reduces their gradients, ZeRO-3 gathers
            # their weights in order): a text-only micro-batch passes a blank image through and adds 0 x its features.
            size = self.vision.tap.config.image_size
            images, unused = torch.zeros(1, size, size, 3, dtype=torch.uint8), True
        if images is not None:
            trunk = self.vision(images.to(chat.device), None if unused else batch.keys)
            visual = chat.projector(trunk.to(next(chat.projector.parameters()).dtype))
        rows, labels, v = [], [], 0
        for s in batch.samples:
            vis = None
            lab = s.labels
            if IMAGE_TOKEN in s.ids:
                vis = visual[v]
                v += 1
                k = s.ids.index(IMAGE_TOKEN)
                lab = lab[:k] + [IGNORE] * vis.shape[0] + lab[k + 1:]
            rows.append(chat.embed_sequence(s.ids, vis))
            labels.append(lab)
        length = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype, device=chat.device)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=chat.device)
        target = torch.full((len(rows), length), IGNORE, dtype=torch.long, device=chat.device)
        for i, (row, lab) in enumerate(zip(rows, labels)):  # right padding: positions run 0..n-1 per row
            embeds[i, :row.shape[0]] = row
            mask[i, :row.shape[0]] = 1  # from lengths, so trained EOS tokens (pad == eos) stay attended
            target[i, :len(lab)] = torch.tensor(lab, device=chat.device)
        if unused:  # joined before the LLM, so backward reaches the vision weights in the same order on every rank
            embeds = embeds + 0 * visual.sum()
        positions = torch.arange(length, device=chat.device).expand(len(rows), -1)
        logits = chat.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        shifted = target[:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                                           ignore_index=IGNORE, reduction="sum")
        return loss, (shifted != IGNORE).sum()


def set_trainable(chat: ChatModel, config: TrainConfig) -> None:
    """Freeze the LLM except what `trainable.llm` asks for; the projector per `trainable.projector`."""
    mode = config.trainable.llm
    for name, p in chat.llm.named_parameters():
        p.requires_grad_(mode == "full" or (mode == "lora" and "lora_" in name))
    if chat.projector is not None:
        for p in chat.projector.parameters():
            p.requires_grad_(config.trainable.projector)


def parameter_groups(model: TrainModel, config: TrainConfig) -> list[dict]:
    """AdamW groups: LLM (LoRA or full) at `lr`, projector at `projector_lr`, encoder blocks at `encoder_lr`."""
    o = config.optim
    proj_lr = o.projector_lr if o.projector_lr is not None else o.lr
    enc_lr = o.encoder_lr if o.encoder_lr is not None else proj_lr
    groups = [("llm", [p for p in model.chat.llm.parameters() if p.requires_grad], o.lr),
              ("projector", [p for p in model.chat.projector.parameters() if p.requires_grad], proj_lr),
              ("encoder", [p for p in model.vision.parameters() if p.requires_grad], enc_lr)]
    return [{"name": n, "params": ps, "lr": lr, "weight_decay": o.weight_decay} for n, ps, lr in groups if ps]
