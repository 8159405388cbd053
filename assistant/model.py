"""`ChatModel`: Phi-2 (+LoRA) with TAP visual tokens spliced in at the `<image>` placeholder.

Prompts are token-id lists in which `IMAGE_TOKEN` (-200, as in Bunny/LLaVA) marks where an image's projected
tokens go; `embed` expands it into `inputs_embeds`, so the LLM itself never sees a special image id.

Which TAP features feed the projector: the encoder trunk after its last stage (last block -> LayerNorm -> last
cross-window bottleneck), width 768/1024/1280, rather than the 256-d neck that follows. The neck is a narrow
projection trained only for TAP's mask/semantic decoder; the trunk keeps the full width the projector can select
from, and the last bottleneck has already mixed information across the 16x16 attention windows.

Checkpoint folder (`save_pretrained` / `from_pretrained`), every path relative to the folder:

    config.json              ChatConfig (mode, TAP preset, LLM id, projector, LoRA, template)
    projector.safetensors    the conv projector (tapchat mode)
    encoder.safetensors      tuned TAP image-encoder blocks, if any (keys relative to the image encoder)
    adapter/                 the PEFT LoRA adapter, if any
    llm/                     full LLM weights + tokenizer, when they are not the public ones (merged or tiny), or
                             int8/int4 ones with LoRA merged in (`python -m assistant quantize`; llm/config.json's
                             `quantization_config` says so)
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ChatConfig
from .llm import TINY_LLM, TinyPhi, apply_lora, load_input_embeddings, load_llm, load_tokenizer
from .projector import ConvProjector
from .quantize import QuantScheme, quantize_llm, save_quantized, scheme_of

IMAGE_TOKEN = -200


class ChatModel(nn.Module):
    """The LLM side of TAP-Chat: tokenizer, Phi-2 (optionally LoRA-wrapped) and the projector."""

    def __init__(self, config: ChatConfig, llm: nn.Module, tokenizer, projector: ConvProjector | None) -> None:
        super().__init__()
        if (config.mode == "tapchat") != (projector is not None):
            raise ValueError("a projector is used exactly in tapchat mode")
        self.config, self.llm, self.tokenizer, self.projector = config, llm, tokenizer, projector
        self.eos_id: int = tokenizer.eos_token_id
        self.encoder_state: dict[str, torch.Tensor] = {}  # tuned TAP encoder weights carried by the checkpoint

    # ---------------------------------------------------------------------------------------- construction
    @classmethod
    def create(cls, config: ChatConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantization: str = "none", seed: int = 0, tiny: TinyPhi | None = None,
               tokenizer: str | None = None) -> ChatModel:
        """Fresh model for `config`: base LLM weights, a new projector, new LoRA adapters (if configured).
        `tokenizer` (a tokenizer.json) replaces the bundled one of a tiny LLM trained from scratch."""
        tokenizer = load_tokenizer(tokenizer or config.llm)
        lora = config.lora
        llm = load_llm(config.llm, dtype=dtype, device=device, quantization=quantization, vocab_size=len(tokenizer),
                       seed=seed, tiny=tiny, adapt=(lambda m: apply_lora(m, lora)) if lora is not None else None)
        projector = None
        if config.projector is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                projector = ConvProjector(config.projector)
            projector = projector.to(device=device, dtype=dtype)
        return cls(config, llm, tokenizer, projector).eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", quantization: str = "none",
                        llm: str | None = None) -> ChatModel:
        """Load a checkpoint folder; `llm` overrides where the base LLM comes from (hub id or folder)."""
        folder = Path(folder)
        config = ChatConfig.load(folder)
        base = _base_llm(folder, config, llm)
        tokenizer = load_tokenizer(base)
        adapt = None
        if config.lora is not None:
            if not (folder / "adapter").is_dir():
                raise FileNotFoundError(f"{folder}/adapter is missing but config.json has LoRA settings")
            from peft import PeftModel

            def adapt(m: nn.Module) -> nn.Module:
                return PeftModel.from_pretrained(m, str(folder / "adapter")).eval()
        model = load_llm(base, dtype=dtype, device=device, quantization=quantization, adapt=adapt)
        return cls._assemble(folder, config, model, tokenizer, device, dtype)

    @classmethod
    def for_server(cls, folder: str | Path | None, *, llm: str | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> ChatModel:
        """The client side of a model whose LLM runs on a server (`--llm-server`): tokenizer, projector and, in
        tapchat mode, the token-embedding table (prompts with an image are sent as embeddings); no LLM weights."""
        config = ChatConfig.load(folder) if folder is not None else ChatConfig(mode="grounded",
                                                                               **({"llm": llm} if llm else {}))
        base = _base_llm(Path(folder), config, llm) if folder is not None else config.llm
        if base == TINY_LLM and folder is None:
            raise ValueError("the tiny random LLM cannot run on a server: serve a checkpoint folder's llm/")
        table = (load_input_embeddings(base, dtype=dtype, device=device) if config.mode == "tapchat" else
                 nn.Embedding(1, 1, device=device, dtype=dtype))  # grounded mode sends text: no table needed
        stand_in = ServedLLM(table)
        return cls._assemble(Path(folder) if folder is not None else None, config, stand_in, load_tokenizer(base),
                             device, dtype)

    @classmethod
    def _assemble(cls, folder: Path | None, config: ChatConfig, llm: nn.Module, tokenizer, device, dtype) -> ChatModel:
        """The model around a loaded LLM: the checkpoint's projector and tuned encoder weights, if any."""
        projector = None
        if config.projector is not None:
            projector = ConvProjector(config.projector)
            projector.load_state_dict(_load(folder / "projector.safetensors"))
            projector = projector.to(device=device, dtype=dtype)
        chat = cls(config, llm, tokenizer, projector).eval()
        if folder is not None and (folder / "encoder.safetensors").is_file():
            chat.encoder_state = _load(folder / "encoder.safetensors")
        return chat

    def save_pretrained(self, folder: str | Path, *, include_llm: bool | None = None) -> None:
        """Write the checkpoint folder. The base LLM is copied only when it is not a public hub model."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        if self.projector is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                      str(folder / "projector.safetensors"))
        if self.encoder_state:
            save_file({k: v.cpu().contiguous() for k, v in self.encoder_state.items()},
                      str(folder / "encoder.safetensors"))
        if self.config.lora is not None:
            self.llm.save_pretrained(str(folder / "adapter"))
        if include_llm if include_llm is not None else self.config.llm == TINY_LLM:
            _save_llm(self.base_llm(), self.tokenizer, folder / "llm")

    def base_llm(self) -> nn.Module:
        """The LLM without adapters (LoRA layers stripped, not merged), e.g. to store a tiny base model."""
        if self.config.lora is None:
            return self.llm
        base = self.llm.get_base_model()
        if scheme_of(base) is not None:
            raise ValueError("the base of an int8/int4 model under LoRA is not stored: save the checkpoint "
                             "unquantised, or write a quantized folder with `python -m assistant quantize`")
        if getattr(base, "is_quantized", False):  # QLoRA on a base that must be stored (tiny): store it unquantised
            base = copy.deepcopy(base)
            base.dequantize()
        state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        config = copy.deepcopy(base.config)
        config.quantization_config = None
        plain = type(base)(config).to(dtype=self.dtype)
        plain.load_state_dict(state)
        return plain

    def merged(self) -> ChatModel:
        """A copy-free view with LoRA folded into the base weights (the adapter is consumed)."""
        if self.config.lora is None:
            return self
        base = self.llm.get_base_model()
        if getattr(base, "is_quantized", False) or scheme_of(base) is not None:
            raise ValueError("cannot merge LoRA into a quantized model: load the checkpoint unquantised to merge")
        merged = self.llm.merge_and_unload()
        chat = ChatModel(self.config.with_(lora=None), merged, self.tokenizer, self.projector)
        chat.encoder_state = self.encoder_state
        return chat.eval()

    # ------------------------------------------------------------------------------------------- tokens
    @property
    def device(self) -> torch.device:
        """Where the input embeddings live; token ids and visual tokens are moved here."""
        return self.embedding.weight.device

    @property
    def embedding(self) -> nn.Embedding:
        """The LLM's token-embedding table (all that a server-run LLM's stand-in holds)."""
        return self.llm.get_input_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        """The embeddings' dtype; visual tokens are cast to it before they are spliced in."""
        return self.embedding.weight.dtype

    @property
    def num_visual_tokens(self) -> int:
        """Positions one `<image>` placeholder expands to; 0 in grounded mode, which has no projector."""
        return self.config.projector.num_tokens() if self.projector is not None else 0

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, each `<image>` becoming `IMAGE_TOKEN`; no BOS is added."""
        return tokenize_with_image(self.tokenizer, text)

    @torch.inference_mode()
    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) TAP trunk features -> (B, N, hidden) LLM input embeddings (inference: training calls the
        projector itself; TAP's features are inference tensors, which autograd refuses)."""
        if self.projector is None:
            raise RuntimeError("grounded mode has no visual tokens")
        weight = self.projector.merge.weight
        return self.projector(features.to(device=weight.device, dtype=weight.dtype)).to(self.dtype)

    def embed(self, sequences: list[list[int]], visuals: list[torch.Tensor | None],
              past: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded `inputs_embeds`, `attention_mask` and `position_ids` for a batch.

        `visuals[i]` is the (N, hidden) image tokens for sequence i (None when it has no `IMAGE_TOKEN`). `past` is the
        length of a cached prefix shared by all rows: the mask covers it, then each row's padding (masked), then
        its tokens, whose positions continue right after the prefix.
        """
        rows = [self.embed_sequence(ids, vis) for ids, vis in zip(sequences, visuals, strict=True)]
        length = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[-1]
        embeds = torch.zeros(len(rows), length, hidden, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(rows), past + length, dtype=torch.long, device=self.device)
        mask[:, :past] = 1
        for i, row in enumerate(rows):
            embeds[i, length - row.shape[0]:] = row
            mask[i, past + length - row.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        return embeds, mask, positions

    def embed_sequence(self, ids: list[int], visual: torch.Tensor | None) -> torch.Tensor:
        """(positions, hidden) input embeddings of one sequence, its `IMAGE_TOKEN` replaced by `visual`."""
        text = [i for i in ids if i != IMAGE_TOKEN]
        if not text:
            raise ValueError("empty prompt")
        table = self.embedding(torch.tensor(text, device=self.device))
        if len(text) == len(ids):
            return table
        if len(ids) - len(text) > 1:
            raise ValueError("one image per prompt: found several <image> placeholders")
        if visual is None:
            raise ValueError("the prompt has an <image> placeholder but no image tokens were given")
        k = ids.index(IMAGE_TOKEN)
        return torch.cat([table[:k], visual.to(device=self.device, dtype=self.dtype), table[k:]])

    def prompt_length(self, ids: list[int]) -> int:
        """Positions `ids` occupies once the image placeholder is expanded."""
        return len(ids) + ids.count(IMAGE_TOKEN) * (self.num_visual_tokens - 1)

    def forward_embeds(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Last-position logits (B, vocab) of a prefill or decode step; `cache` is extended in place."""
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()


class ServedLLM(nn.Module):
    """Stands in for an LLM that runs on a server: holds only its token-embedding table."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    def get_input_embeddings(self) -> nn.Embedding:
        """The embedding table: prompts with an image are sent to the server as embeddings."""
        return self.table

    def forward(self, *args, **kwargs):
        """Always raises: decoding must go through the server lane (`remote.ServerLLM`), not this stand-in."""
        raise RuntimeError("this LLM runs on a server (--llm-server); it cannot run here")


def tokenize_with_image(tokenizer, text: str) -> list[int]:
    """Token ids with one `IMAGE_TOKEN` per `<image>` (chunks are tokenized separately, as Bunny does)."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return ids


def merge_checkpoint(src: str | Path, dst: str | Path, scheme: QuantScheme | None = None) -> Path:
    """`merge` command: fold LoRA into Phi-2 and write a standalone folder (needs no adapter and no base download).

    With `scheme` (the `quantize` command) the merged LLM is then quantised (weight-only int8/int4, from bf16
    weights) and llm/ holds its codes: the folder loads quantized, and never quantises again. The projector and
    tuned encoder files are copied as they are, in their own precision."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    chat = ChatModel.from_pretrained(src, dtype=torch.bfloat16 if scheme else torch.float32).merged()
    if scheme is not None:
        quantize_llm(chat.llm, scheme)
    chat.save_pretrained(dst, include_llm=True)
    for name in ("encoder.safetensors", "projector.safetensors") if scheme else ("encoder.safetensors",):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def _base_llm(folder: Path, config: ChatConfig, llm: str | None) -> str:
    """Where a checkpoint's base LLM comes from: `llm` if given, its own llm/ folder, else the hub id it names."""
    base = llm or (str(folder / "llm") if (folder / "llm").is_dir() else config.llm)
    if base == TINY_LLM:
        raise ValueError(f"{folder} names the tiny random LLM but has no llm/ folder with its weights")
    return base


def _save_llm(llm: nn.Module, tokenizer, folder: Path) -> None:
    if scheme_of(llm) is not None:
        save_quantized(llm, folder)
    else:
        llm.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the checkpoint folder")
    return load_file(str(path))
