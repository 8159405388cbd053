"""Typed errors with plain messages: everything a user can cause raises one of these, never a torch traceback."""

from __future__ import annotations


class TapError(Exception):
    """Base class of all TAP-Chat tokenizer errors."""


class ImageError(TapError, ValueError):
    """The image could not be read or is unusable (corrupt, not an image, empty, too large)."""


class PromptError(TapError, ValueError):
    """A visual prompt is invalid (outside the image, degenerate box, nothing to segment)."""


class CheckpointError(TapError, ValueError):
    """A weights file is unsafe, unreadable or does not match the model."""


class WeightsNotFoundError(TapError, FileNotFoundError):
    """A weights or tokenizer file is not available locally and could not be downloaded."""


class UnknownConceptError(PromptError):
    """A query names nothing in the concept vocabulary; `closest` holds the nearest names, for a "did you mean"."""

    def __init__(self, message: str, closest: list[str]) -> None:
        super().__init__(message)
        self.closest = closest
