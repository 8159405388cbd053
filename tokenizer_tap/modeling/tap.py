"""The composite TAP model: owns pixel normalisation and wires the components together."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TAPConfig
from .concept_projector import ConceptProjector
from .image_decoder import ImageDecoder
from .image_encoder import ImageEncoder
from .prompt_encoder import PromptEncoder
from .text_decoder import TextDecoder

# BGR order, as the official model (and its checkpoints) expect.
PIXEL_MEAN = (103.53, 116.28, 123.675)
PIXEL_STD = (57.375, 57.12, 58.395)


class TAP(nn.Module):
    """Tokenize Anything via Prompting: image + visual prompts -> masks, IoU, semantic tokens, captions.

    Parameter names reproduce the official `ImageTokenizer` state dict key for key.
    """

    def __init__(self, config: TAPConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN))
        self.register_buffer("pixel_rsig", 1.0 / torch.tensor(PIXEL_STD))
        self.image_encoder = ImageEncoder(
            config.encoder_depth, config.encoder_embed_dim, config.encoder_num_heads, config.encoder_mlp_ratio,
            config.patch_size, config.window_size, config.grid_size, config.image_embed_dim, config.cross_indices,
            config.drop_path)
        self.prompt_encoder = PromptEncoder(config.image_embed_dim, config.image_size)
        self.image_decoder = ImageDecoder(config.image_embed_dim, config.decoder_depth, config.decoder_num_heads,
                                          config.decoder_mlp_dim, config.num_mask_tokens, config.sem_embed_dim,
                                          config.decoder_dropout)
        self.concept_projector = ConceptProjector(config.sem_embed_dim)
        self.text_decoder = TextDecoder(config.image_embed_dim, config.text_embed_dim, config.text_num_heads,
                                        config.text_decoder_depth, config.text_mlp_ratio, config.vocab_size,
                                        config.text_seq_len, config.text_dropout)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights were cast to (read from a buffer, so it follows `.to()`)."""
        return self.pixel_mean.dtype

    @property
    def device(self) -> torch.device:
        """The device the weights live on."""
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 BGR batch -> (B, 3, S, S) normalised tensor in the model dtype."""
        x = images.to(device=self.device, dtype=self.dtype)
        return ((x - self.pixel_mean) * self.pixel_rsig).permute(0, 3, 1, 2)

    def init_weights(self) -> None:
        """Initialisation for training from scratch (ViT practice): truncated normal (std 0.02) for linear layers,
        embeddings, positions and relative-position tables; zero biases; unit norms. The default construction keeps
        PyTorch's init (loaded weights replace it anyway)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:  # norm scales
                nn.init.ones_(p)
            elif "conv" in name or "patch_embed" in name:  # convolutions keep their fan-in (kaiming) init
                continue
            else:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():  # a residual bottleneck starts as the identity: its last BatchNorm scale is 0
            if hasattr(m, "norm3") and isinstance(m.norm3, nn.BatchNorm2d):
                nn.init.zeros_(m.norm3.weight)

    def get_features(self, images: torch.Tensor, taps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, S, S, 3) uint8 BGR padded batch -> (B, C, S/16, S/16) image embeddings."""
        x = self.normalize(images)
        if taps is not None:
            taps["input"] = x
        return self.image_encoder(x.contiguous(memory_format=torch.channels_last), taps)

    def get_outputs(self, image_embeds: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode (N, K, 3) prompt rows in the padded input frame over (B, C, h, w) embeddings."""
        sparse = self.prompt_encoder(points.to(self.device))
        grid = image_embeds.shape[-1]
        outputs = self.image_decoder(image_embeds, self.prompt_encoder.image_pe(grid), sparse)
        outputs["sparse_embeds"] = sparse
        return outputs
