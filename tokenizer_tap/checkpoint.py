"""Reading weights safely: official `.pkl` through a restricted unpickler, `.safetensors`, and torch files.

The official checkpoints are plain pickles of an OrderedDict of numpy arrays. A plain `pickle.load` would run any
code a crafted file asks for, so only the handful of globals such a file needs are admitted.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError

# (module, name) pairs an official checkpoint or concept file may reference. numpy 2 renamed numpy.core.
_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load: the pickle asks for {module}.{name}, which no TAP weights file needs "
                "(a crafted file could run code through it)") from None


def safe_unpickle(path: str | Path) -> object:
    """Unpickle a file admitting only OrderedDict / numpy array globals."""
    data = Path(path).read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or corrupt pickles raise many different types
        raise CheckpointError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.pkl` (official), `.safetensors`, or a torch file (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable weights-only torch file ({exc})") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
    else:
        obj = safe_unpickle(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of names to arrays, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, (np.ndarray, torch.Tensor)):
            raise CheckpointError(f"{path}: entry {key!r} is not a named array")
        out[key] = torch.as_tensor(value)
    return out


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys; silent when all match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or misshaped):
        return

    def section(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        return f"  {title} ({len(items)}):\n    {shown}" if items else ""

    report = "\n".join(s for s in (section("missing", missing), section("unexpected", unexpected),
                                   section("wrong shape", misshaped)) if s)
    hint = ""
    if misshaped and any("image_encoder" in m for m in misshaped):
        hint = "\n  hint: the checkpoint is probably for another model size (--model tap_vit_b/l/h)"
    raise CheckpointError(f"checkpoint does not match the model ({len(state)} keys in file, "
                          f"{len(expected)} in model):\n{report}{hint}")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Strictly load `path` into `model`, keeping each parameter's dtype (values are cast on copy)."""
    state = read_state_dict(path)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)


def load_concepts(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read an official concept file: a pickled `[W (sem_dim, K) float32, names]`."""
    obj = safe_unpickle(path)
    if (not isinstance(obj, (list, tuple)) or len(obj) != 2 or not isinstance(obj[0], np.ndarray)
            or not all(isinstance(n, str) for n in obj[1])):
        raise CheckpointError(f"{path}: expected a pickled [matrix, list of names] concept file")
    return obj[0], list(obj[1])


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
