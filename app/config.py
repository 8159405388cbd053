"""Settings of one app process (everything `python -m app` can be told)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_data_dir() -> Path:
    """`$TAPCHAT_DATA`, else the per-user data directory (XDG on Linux, Application Support on macOS)."""
    if env := os.environ.get("TAPCHAT_DATA"):
        return Path(env)
    home = Path.home()
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", home)) / "tapchat"
    if (home / "Library" / "Application Support").is_dir():
        return home / "Library" / "Application Support" / "tapchat"
    return Path(os.environ.get("XDG_DATA_HOME", home / ".local" / "share")) / "tapchat"


@dataclass
class AppConfig:
    """What the app loads, where it keeps history, and the limits it enforces on user input."""

    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = field(default_factory=default_data_dir)
    db: Path | None = None  # default: data_dir / "history.db"
    auth: list[tuple[str, str]] = field(default_factory=list)  # empty: anonymous owners (per browser)
    tiny: bool = False
    demo: bool = False  # the bundled demo models (also what runs where the public weights are absent)
    demo_models: Path | None = None  # which demo bundle (default: $TAPCHAT_DEMO_MODELS, else the shipped one)
    tap_model: str | None = None
    tap_checkpoint: str | None = None
    llm: str | None = None
    chat_checkpoint: str | None = None
    quantization: str = "none"
    device: str = "auto"
    dtype: str = "auto"
    llm_server: str | None = None  # an OpenAI-compatible vLLM URL: the LLM runs there
    llm_server_model: str | None = None
    share: bool = False
    max_upload_mb: int = 25
    max_pixels: int = 40_000_000  # about 7,300 x 5,500; larger uploads are refused with a message
    everything_grid: int = 12  # segment everything prompts a grid this many points wide (12 x 12 = 144)
    everything_min_iou: float = 0.7  # keep candidates TAP is this confident in (--tiny: 0, random weights)
    answers_at_once: int = 8  # answers streamed at the same time (decoded together); more wait in the queue
    queue_size: int = 64  # waiting requests beyond this are turned away ("too busy"), not piled up

    @property
    def db_path(self) -> Path:
        """`db` when given, else `history.db` in the data directory."""
        return self.db if self.db is not None else self.data_dir / "history.db"

    @property
    def image_dir(self) -> Path:
        """Where the store keeps uploaded images."""
        return self.data_dir / "images"

    @property
    def export_dir(self) -> Path:
        """Where exports are written; `launch` lets Gradio serve files from it (downloads)."""
        return self.data_dir / "exports"
