"""Finding weight files: an explicit path, or the Hugging Face hub through its local cache.

Offline or missing files raise `WeightsNotFoundError` with one message per file that says where to put it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from .config import CONCEPT_FILES, HUB_REPO, TAPConfig
from .errors import WeightsNotFoundError

#: The caption tokenizer is the LLaMA-1/2 SentencePiece model; these public repos republish it byte for byte.
TOKENIZER_MD5 = "eeec4125e9c7560836b4873b6f8e3025"
TOKENIZER_REPOS = ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "hf-internal-testing/llama-tokenizer")


#: A checkout keeps the demo bundle here (`make demo-models`, models/demo/README.md): a TAP and a small chat model
#: trained on synthetic scenes, run where the public weights are absent.
CHECKOUT_DEMO_MODELS = Path(__file__).resolve().parents[1] / "models" / "demo"
#: An installed copy carries it as package data under this name (pyproject.toml maps models/demo onto it).
PACKAGED_DEMO_MODELS = "demo_models"


def default_demo_models() -> Path:
    """The bundle this copy of the code ships with: installed, the package data (`pip install .` puts models/demo
    there, so a wheel runs the demo models too); in a checkout, models/demo."""
    packaged = Path(str(resources.files(__package__) / PACKAGED_DEMO_MODELS))
    return packaged if packaged.is_dir() else CHECKOUT_DEMO_MODELS


def demo_models_folder(folder: str | Path | None = None) -> Path:
    """Where to look for the demo bundle: `folder` (`--demo-models`), else $TAPCHAT_DEMO_MODELS, else the bundle
    shipped with the code."""
    return Path(folder or os.environ.get("TAPCHAT_DEMO_MODELS") or default_demo_models()).expanduser()


def demo_models(folder: str | Path | None = None) -> Path | None:
    """The demo bundle (`tap/` + `chat/`) at `demo_models_folder(folder)`, or None where there is none (not built,
    removed, or a path that holds none)."""
    found = demo_models_folder(folder)
    complete = all((found / part / "config.json").is_file() for part in ("tap", "chat"))
    return found if complete else None


def require_demo_models(folder: str | Path | None = None) -> Path:
    """The demo bundle, or the error `--demo` gives where there is none."""
    found = demo_models(folder)
    if found is None:
        raise WeightsNotFoundError(f"no demo models at {demo_models_folder(folder)} "
                                   "(`make demo-models` builds them)")
    return found


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (checked once per process).

    Without this, an offline machine spends ~20 s of retries per missing file before saying it is missing. With a
    proxy configured we cannot tell from here, so we let the hub client try.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_file(repo: str, filename: str, what: str, flag: str) -> Path:
    """Local path of `repo/filename`, from the HF cache or downloaded into it."""
    try:
        from huggingface_hub import hf_hub_download
        try:  # a cached copy needs no network round trip
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        except Exception:
            if not hub_reachable():
                raise ConnectionError("huggingface.co cannot be reached from this machine") from None
            return Path(hf_hub_download(repo, filename))
    except Exception as exc:  # offline, no network, gated, not found: all mean "not available here"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsNotFoundError(
            f"{what} not available: {repo}/{filename} is not in the local Hugging Face cache and could not be "
            f"downloaded ({reason[:200]}).\n  Fix: download https://huggingface.co/{repo}/resolve/main/{filename} "
            f"and pass it with {flag} PATH, or run `huggingface-cli download {repo} {filename}` on a machine "
            "with network access to fill the cache. Offline, set HF_HUB_OFFLINE=1 to skip download attempts.") from None


def checkpoint_path(config: TAPConfig, path: str | Path | None = None) -> Path:
    if path is not None:
        return _existing(path, "checkpoint", "--checkpoint")
    if not config.hub_file:
        raise WeightsNotFoundError(f"{config.name} has no released weights; pass --checkpoint PATH "
                                   "(or use tap_vit_b / tap_vit_l / tap_vit_h)")
    return hub_file(HUB_REPO, config.hub_file, f"{config.name} checkpoint", "--checkpoint")


def concepts_path(name_or_path: str | Path) -> Path:
    """A vocabulary name (`merged_2560`, `lvis_1203`, `coco_80`) from the hub, or a local file."""
    if str(name_or_path) in CONCEPT_FILES:
        return hub_file(HUB_REPO, CONCEPT_FILES[str(name_or_path)], f"concept vocabulary {name_or_path}",
                        "--concepts")
    return _existing(name_or_path, "concept vocabulary", "--concepts")


def tokenizer_path(path: str | Path | None = None) -> Path:
    """The LLaMA `tokenizer.model`: an explicit path, or a hub copy verified by md5."""
    if path is not None:
        return _existing(path, "text tokenizer", "--tokenizer")
    errors = []
    for repo in TOKENIZER_REPOS:
        try:
            found = hub_file(repo, "tokenizer.model", "text tokenizer", "--tokenizer")
        except WeightsNotFoundError as exc:
            errors.append(str(exc))
            continue
        if hashlib.md5(found.read_bytes()).hexdigest() == TOKENIZER_MD5:
            return found
        errors.append(f"{repo}/tokenizer.model has the wrong md5 (expected {TOKENIZER_MD5})")
    raise WeightsNotFoundError(errors[0] if errors else "text tokenizer not available")


def _existing(path: str | Path, what: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsNotFoundError(f"{what} not found at {p}; check the path given to {flag}")
    return p
