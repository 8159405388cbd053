"""Reading weights safely: official `.pkl` through a restricted unpickler, `.safetensors`, and torch files.

The official checkpoints are plain pickles of an OrderedDict of numpy arrays. A plain `pickle.load` would run any
code a crafted file asks for, so only the handful of globals such a file needs are admitted.
"""

from __future__ import annotations

import collections
import json
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FOLDER_FORMAT
from .errors import CheckpointError

# Array element types a weights file may hold: bool, signed/unsigned integers and floats. Anything else (objects,
# strings, records, complex) is refused before numpy ever sees it.
_NUMERIC_KINDS = "biuf"


class _DTypeSpec:
    """Inert stand-in for `numpy.dtype(...)` inside a pickle: records the type name and byte order only."""

    def __init__(self, name: object, align: object = False, copy: object = True) -> None:
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def dtype(self) -> np.dtype:
        try:
            dt = np.dtype(self.name) if isinstance(self.name, str) and len(self.name) <= 8 else None
        except TypeError:
            dt = None
        if dt is None or dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise CheckpointError(f"refusing to load: array element type {self.name!r} is not numeric")
        return dt.newbyteorder(self.byteorder) if self.byteorder in "<>" else dt


class _ArraySpec:
    """Inert stand-in for `numpy.core.multiarray._reconstruct(...)`: keeps shape, type and raw bytes.

    Nothing from the file is handed to numpy's own unpickling code (which trusts dtype state and can be made to
    read memory as object pointers); `build` checks everything and copies the bytes into a fresh array.
    """

    def __init__(self, cls: object = None, shape: object = None, typecode: object = None) -> None:
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def build(self) -> np.ndarray:
        state = self.state
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CheckpointError("refusing to load: malformed array record")
        _, shape, spec, fortran, raw = state
        if not isinstance(spec, _DTypeSpec) or not isinstance(raw, (bytes, bytearray)):
            raise CheckpointError("refusing to load: array without numeric raw data")
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"refusing to load: bad array shape {shape!r}")
        dtype = spec.dtype()
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(raw):
            raise CheckpointError(f"refusing to load: array {shape} of {dtype} does not match its data size")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        return array.astype(dtype.newbyteorder("="), copy=True)


class _NotCallable:
    """What `numpy.ndarray` resolves to: only valid as the first argument of `_reconstruct`."""


# (module, name) pairs an official checkpoint or concept file may reference. numpy 2 renamed numpy.core.
_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): _NotCallable,
    ("numpy", "dtype"): _DTypeSpec,
    ("numpy.core.multiarray", "_reconstruct"): _ArraySpec,
    ("numpy._core.multiarray", "_reconstruct"): _ArraySpec,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load: the pickle asks for {module}.{name}, which no TAP weights file needs "
                "(a crafted file could run code through it)") from None


def _materialise(obj: object) -> object:
    """Replace every `_ArraySpec` in dicts / lists / tuples by its checked array."""
    if isinstance(obj, _ArraySpec):
        return obj.build()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    if isinstance(obj, (_DTypeSpec, _NotCallable)) or obj is _NotCallable:
        raise CheckpointError("refusing to load: a numpy type outside an array")
    return obj


def safe_unpickle(path: str | Path) -> object:
    """Unpickle a file of numpy arrays in (ordered) dicts and lists, without running anything it names.

    Only OrderedDict and inert stand-ins for numpy's array reconstruction are admitted; arrays are rebuilt from
    their raw bytes after checking that they are numeric and exactly as large as their data.
    """
    try:
        with open(path, "rb") as f:
            return _materialise(_RestrictedUnpickler(f).load())
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
        if isinstance(value, np.ndarray) and value.dtype.kind not in _NUMERIC_KINDS:
            raise CheckpointError(f"{path}: entry {key!r} holds {value.dtype} values, not numbers")
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
    """Strictly load `path` into `model`, keeping each parameter's dtype (values are cast on copy).

    Integer buffers (the relative-position index tables) are derived from the architecture, so a file whose
    tables differ from the model's is corrupt: it would index out of range or silently scramble attention.
    """
    state = read_state_dict(path)
    check_state_dict(model, state)
    for key, expected in model.state_dict().items():
        if key.endswith("rel_pos_embed.index") and not torch.equal(state[key].to(expected.dtype), expected):
            raise CheckpointError(f"{path}: {key} differs from the relative-position table of this architecture; "
                                  "the file is corrupt")
    model.load_state_dict(state, strict=True)


def load_concepts(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read an official concept file: a pickled `[W (sem_dim, K) float32, names]`."""
    obj = safe_unpickle(path)
    if (not isinstance(obj, (list, tuple)) or len(obj) != 2 or not isinstance(obj[0], np.ndarray)
            or not all(isinstance(n, str) for n in obj[1])):
        raise CheckpointError(f"{path}: expected a pickled [matrix, list of names] concept file")
    return obj[0], list(obj[1])


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def save_pretrained(tap: nn.Module, folder: str | Path, tokenizer: str | Path,
                    concepts: tuple[np.ndarray, list[str]] | None = None) -> Path:
    """Write a TAP checkpoint folder: `config.json` (format tag + TAPConfig), `model.safetensors` (the official key
    names), the caption tokenizer as `text_tokenizer.model`, and the concept vocabulary as `concepts.safetensors`.
    `TapPredictor.from_pretrained(folder)`, `build_tap(folder)` and every `--tap-checkpoint` option load it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().cpu() for k, v in tap.state_dict().items()}, folder / "model.safetensors")
    if Path(tokenizer).resolve() != (folder / "text_tokenizer.model").resolve():
        shutil.copyfile(tokenizer, folder / "text_tokenizer.model")
    if concepts is not None:
        weights, names = concepts
        save_file({"weights": torch.as_tensor(np.asarray(weights, dtype=np.float32)).contiguous()},
                  str(folder / "concepts.safetensors"), metadata={"names": json.dumps([str(n) for n in names])})
    config = {"format": FOLDER_FORMAT, "model": tap.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def load_folder_concepts(folder: str | Path) -> tuple[np.ndarray, list[str]] | None:
    """A folder's concept vocabulary (W (sem_dim, K), names), or None when it has none."""
    path = Path(folder) / "concepts.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor("weights").astype(np.float32), list(json.loads(f.metadata()["names"]))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable concept file ({exc})") from None


def save_official_pkl(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """The official layout: a pickled OrderedDict of numpy arrays, float16 for floating tensors, int64 for integer
    buffers (relative-position indices, BatchNorm counters)."""
    arrays = collections.OrderedDict()
    for key, value in state.items():
        v = value.detach().cpu()
        arrays[key] = (v.to(torch.float16) if v.is_floating_point() else v.to(torch.int64)).numpy()
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=4)
