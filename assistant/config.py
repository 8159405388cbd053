"""`ChatConfig`: everything needed to rebuild a chat model, stored as `config.json` in a checkpoint folder.

A folder never needs absolute paths: the TAP model and the LLM are named (preset / hub id) or, for a TAP trained by
this project, given as a folder relative to the checkpoint (the demo bundle's `../tap`); every tensor file is
addressed relative to the folder, so a folder written on a training machine loads anywhere unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .llm import DEFAULT_LLM, LoraSettings
from .projector import ProjectorConfig

FORMAT = "tapchat-checkpoint"
VERSION = 1
MODES = ("grounded", "tapchat")


@dataclass(frozen=True)
class ChatConfig:
    """Which models a chat checkpoint combines and how prompts are built.

    mode: `grounded` (Phi-2 reads TAP's region lines only; zero-shot with public weights) or `tapchat`
    (visual tokens through the projector, LoRA-tuned Phi-2, and the same region lines).
    """

    mode: str = "grounded"
    tap_model: str = "tap_vit_l"
    llm: str = DEFAULT_LLM
    projector: ProjectorConfig | None = None
    lora: LoraSettings | None = None
    template: str = "bunny"
    max_context: int = 2048  # Phi-2's positions: visual tokens + prompt + answer must fit
    scene_regions: int | None = None  # top-K segment-everything regions when a turn has none; None: mode default
    find_grounding: bool | None = None  # find every instance of the concepts a question names; None: mode default

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose grounded or tapchat")
        if self.mode == "tapchat" and self.projector is None:
            raise ValueError("tapchat mode needs a projector configuration")
        if self.template != "bunny":
            raise ValueError(f"unknown template {self.template!r}; only bunny is supported")
        if self.max_context < 64:
            raise ValueError("max_context must be at least 64 tokens")

    @property
    def num_scene_regions(self) -> int:
        """Scene context is on by default where it is the only visual information (grounded mode)."""
        if self.scene_regions is not None:
            return self.scene_regions
        return 5 if self.mode == "grounded" else 0

    @property
    def finds(self) -> bool:
        """Whether questions are find-grounded by default: in grounded mode (Phi-2 reads region lines zero-shot),
        and for a tapchat model whose config says it was trained on find-grounded turns."""
        return self.find_grounding if self.find_grounding is not None else self.mode == "grounded"

    def tap_location(self, folder: str | Path) -> str:
        """`tap_model`, or the folder it names relative to the checkpoint `folder` when there is one."""
        beside = Path(folder) / self.tap_model
        return str(beside) if not Path(self.tap_model).is_absolute() and beside.is_dir() else self.tap_model

    def with_(self, **changes) -> ChatConfig:
        """A copy with `changes` applied (the config is frozen); the copy is validated again."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """What `config.json` holds: the fields plus the format name and version, LoRA as plain JSON."""
        data = asdict(self)
        data["lora"] = self.lora.to_dict() if self.lora else None
        return {"format": FORMAT, "version": VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> ChatConfig:
        """Parse `config.json` content; other formats, newer versions and unknown keys are refused, not guessed at."""
        data = dict(data)
        if data.pop("format", FORMAT) != FORMAT:
            raise ValueError("not a TAP-Chat checkpoint config (format field)")
        version = data.pop("version", VERSION)
        if version > VERSION:
            raise ValueError(f"checkpoint format version {version} is newer than this code ({VERSION}); upgrade")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        if data.get("projector") is not None:
            data["projector"] = ProjectorConfig(**data["projector"])
        if data.get("lora") is not None:
            data["lora"] = LoraSettings.from_dict(data["lora"])
        return cls(**data)

    def save(self, folder: str | Path) -> None:
        """Write `config.json` into the checkpoint `folder`, which must already exist."""
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ChatConfig:
        """Read `folder/config.json`: FileNotFoundError when it is absent, ValueError when it is malformed."""
        path = Path(folder, "config.json")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} is not a TAP-Chat checkpoint folder (no config.json)") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path} is not a valid TAP-Chat config: {exc}") from None
