"""tokenizer_tap: the TAP promptable visual tokenizer (mask, concept and caption per region), in pure PyTorch.

The whole of the paper's architecture figure: image encoder, prompt encoder, image decoder (mask, IoU and semantic
tokens), concept projector and text decoder live in `modeling/`, one module per box; the rest turns images and
clicks into the model's inputs and its outputs into regions.
"""

from .build import build_tap
from .config import PRESETS, TAPConfig, get_config
from .errors import CheckpointError, ImageError, PromptError, TapError, UnknownConceptError, WeightsNotFoundError
from .image_io import load_image
from .predictor import TapPredictor
from .prompts import Prompt
from .region import Region

__all__ = ["build_tap", "TAPConfig", "PRESETS", "get_config", "TapPredictor", "Region", "Prompt", "load_image",
           "TapError", "ImageError", "PromptError", "UnknownConceptError", "CheckpointError", "WeightsNotFoundError"]
