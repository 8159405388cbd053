"""TAP network components, one module per box of the architecture figure: `image_encoder` (ViT), `prompt_encoder`
(points, boxes), `image_decoder` (masks, IoU, semantic tokens), `concept_projector` (concepts), `text_decoder`
(captions); `tap` wires them together."""

from .concept_projector import ConceptProjector
from .image_decoder import ImageDecoder, route
from .image_encoder import ImageEncoder
from .prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PAD, POSITIVE, PromptEncoder
from .tap import TAP
from .text_decoder import TextDecoder

__all__ = ["TAP", "ConceptProjector", "ImageDecoder", "ImageEncoder", "PromptEncoder", "TextDecoder", "route",
           "NEGATIVE", "POSITIVE", "BOX_TOP_LEFT", "BOX_BOTTOM_RIGHT", "PAD"]
