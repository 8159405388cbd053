"""Model configuration: one dataclass for every TAP size, plus the named presets.

The released checkpoints (tap_vit_b/l/h) differ only in the image encoder; everything else is fixed by the
official builder. Field names follow the parity-fixture `config.json` so a fixture can be loaded with
`TAPConfig.from_dict(json["model"])`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TAPConfig:
    """Every dimension of a TAP model. Derived values are properties, checked in `__post_init__`."""

    name: str = "custom"
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 16
    encoder_depth: int = 12
    encoder_embed_dim: int = 768
    encoder_num_heads: int = 12
    encoder_mlp_ratio: float = 4.0
    image_embed_dim: int = 256
    sem_embed_dim: int = 1024
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_mask_tokens: int = 4
    text_embed_dim: int = 512
    text_num_heads: int = 8
    text_decoder_depth: int = 12
    text_mlp_ratio: float = 4.0
    text_seq_len: int = 40
    vocab_size: int = 32000
    # Training-time regularisation (the paper's recipe); no effect in eval mode and no state-dict keys.
    drop_path: float = 0.0  # stochastic depth of the encoder blocks, rising linearly to this rate
    decoder_dropout: float = 0.0  # image decoder (attention outputs and MLPs)
    text_dropout: float = 0.0  # text decoder (residual branches)
    #: Official weights file in the hub repo `BAAI/tokenize-anything`, or "" when none was released.
    hub_file: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"TAPConfig {self.name!r}: {msg}")

        need(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size")
        need(self.grid_size % self.window_size == 0, "the patch grid must split into whole windows")
        need(self.encoder_depth >= 4 and self.encoder_depth % 4 == 0,
             "encoder_depth must be a positive multiple of 4 (one conv block after each quarter)")
        need(self.encoder_embed_dim % self.encoder_num_heads == 0, "encoder_embed_dim % encoder_num_heads != 0")
        need(self.encoder_embed_dim % 2 == 0, "encoder_embed_dim must be even (bottleneck width is C/2)")
        need(self.text_embed_dim % self.text_num_heads == 0, "text_embed_dim % text_num_heads != 0")
        need((self.text_embed_dim // self.text_num_heads) % 2 == 0, "text head_dim must be even for rotary")
        need(self.image_embed_dim % 2 == 0, "image_embed_dim must be even (sin/cos halves)")
        need(self.num_mask_tokens >= 2, "num_mask_tokens must be >= 2 (mask 0 is the box mask)")
        need(self.text_seq_len >= 3, "text_seq_len must leave room for prefix, BOS and one token")
        need(all(0.0 <= p < 1.0 for p in (self.drop_path, self.decoder_dropout, self.text_dropout)),
             "drop_path and dropout rates must be in [0, 1)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def cross_indices(self) -> tuple[int, ...]:
        """Encoder blocks followed by a cross-window conv bottleneck: the last block of each quarter."""
        step = self.encoder_depth // 4
        return tuple(range(step - 1, self.encoder_depth, step))

    @property
    def max_text_len(self) -> int:
        """Token-buffer length of caption generation (BOS + generated tokens); the prefix takes one slot."""
        return self.text_seq_len - 1

    @classmethod
    def from_dict(cls, data: dict) -> TAPConfig:
        """Build from a dict, ignoring unknown keys (fixture configs carry extra fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _release(name: str, depth: int, width: int, heads: int, hub_file: str, notes: str = "") -> TAPConfig:
    return TAPConfig(name=name, encoder_depth=depth, encoder_embed_dim=width, encoder_num_heads=heads,
                     hub_file=hub_file, notes=notes)


PRESETS: dict[str, TAPConfig] = {
    "tap_vit_b": _release("tap_vit_b", 12, 768, 12, "models/tap_vit_b_v1_1.pkl"),
    "tap_vit_l": _release("tap_vit_l", 24, 1024, 16, "models/tap_vit_l_v1_1.pkl"),
    "tap_vit_h": _release("tap_vit_h", 32, 1280, 16, "models/tap_vit_h_v1_1.pkl"),
    # The paper (TAP-v2) describes a ~0.4B-parameter encoder; BAAI never released it. 24 x 1152 with 18 heads of
    # 64 gives ~0.39B encoder parameters. Usable for training from scratch only.
    "tap_vit_xl": _release("tap_vit_xl", 24, 1152, 18, "",
                           notes="sized like the paper's ~0.4B encoder; no public weights exist"),
    # Small random-weight sizes for tests, the demo and CI. Same architecture, fewer and narrower layers.
    "tap_tiny": TAPConfig(name="tap_tiny", encoder_depth=4, encoder_embed_dim=64, encoder_num_heads=1,
                          text_embed_dim=64, text_num_heads=1, text_decoder_depth=2, vocab_size=384,
                          notes="random weights for tests and demos; pairs with the bundled 384-piece tokenizer"),
}

#: Hub repo holding the official checkpoints and concept vocabularies.
HUB_REPO = "BAAI/tokenize-anything"
CONCEPT_FILES = {
    "merged_2560": "concepts/merged_2560.pkl",
    "lvis_1203": "concepts/lvis_1203.pkl",
    "coco_80": "concepts/coco_80.pkl",
}


#: Tag in the `config.json` of a TAP checkpoint folder (see `checkpoint.save_pretrained`).
FOLDER_FORMAT = "tapchat-tap/1"


def folder_config(folder: str | Path) -> TAPConfig | None:
    """The config of a TAP checkpoint folder, or None when `folder` is not one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{path}: not readable JSON") from None
    if not isinstance(data, dict) or data.get("format") != FOLDER_FORMAT or not isinstance(data.get("model"), dict):
        return None
    return TAPConfig.from_dict(data["model"])


def get_config(name_or_config: str | Path | TAPConfig) -> TAPConfig:
    """Resolve a preset name (e.g. `tap_vit_l`), a TAP checkpoint folder, or pass a config through."""
    if isinstance(name_or_config, TAPConfig):
        return name_or_config
    if str(name_or_config) in PRESETS:
        return PRESETS[str(name_or_config)]
    if Path(name_or_config).is_dir():
        config = folder_config(name_or_config)
        if config is None:
            raise ValueError(f"{name_or_config} is not a TAP checkpoint folder (no config.json with format "
                             f"{FOLDER_FORMAT!r}; write one with `python -m tokenizer_tap convert`)")
        return config
    raise ValueError(f"unknown TAP model {name_or_config!r}; choose one of {', '.join(PRESETS)} or a checkpoint folder")
