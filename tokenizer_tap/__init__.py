"""tokenizer_tap: the TAP promptable visual tokenizer (mask, concept and caption per region), in pure PyTorch."""

from .build import build_tap
from .config import PRESETS, TAPConfig, get_config
from .errors import CheckpointError, ImageError, PromptError, TapError, WeightsNotFoundError
from .image_io import load_image
from .predictor import Region, TapPredictor
from .prompts import Prompt

__all__ = ["build_tap", "TAPConfig", "PRESETS", "get_config", "TapPredictor", "Region", "Prompt", "load_image",
           "TapError", "ImageError", "PromptError", "CheckpointError", "WeightsNotFoundError"]
