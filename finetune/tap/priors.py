"""SemanticSA-1B concept priors on disk: one CLIP image embedding V_C per mask, plus the concept text matrix.

Layout of a priors folder (written by `tap-priors`, or by the synthetic world with the same writer):
- `manifest.json`: format tag, embedding width, teacher description, templates;
- `concepts.safetensors`: `weights` (dim, K) float32 = L2-normalised text embeddings x CLIP logit scale (the
  official concept-file convention, so it doubles as the trained model's vocabulary), names in the metadata;
- `shard-<name>.safetensors`: `embeddings` (N, dim) float16, and the N mask keys (`mask_key`) in the metadata.

Targets are not stored: P_target = softmax(normalize(V_C) @ W) is computed during training (`target_log_probs`,
the official `encode_tgt`), so the priors survive a change of vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FORMAT = "tapchat-priors/1"


def mask_key(image_id: object, ann_id: object) -> str:
    """The key of one mask's prior: SA-1B `image.image_id` and annotation `id` (COCO: image and annotation ids)."""
    return f"{image_id}/{ann_id}"


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a shard is either whole or absent: resuming never reads half a file


class PriorsWriter:
    """Writes a priors folder. Shards are independent files, so processes can write different shards at once."""

    def __init__(self, folder: str | Path, dim: int, teacher: str = "", templates: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            old = json.loads(manifest.read_text())
            if old.get("dim") != dim:
                raise ValueError(f"{self.folder} holds priors of width {old.get('dim')}, not {dim}: use another --out")
        else:
            tmp = manifest.with_name(f"manifest.json.{os.getpid()}.tmp")  # ranks may start together
            tmp.write_text(json.dumps({"format": FORMAT, "dim": dim, "teacher": teacher,
                                       "templates": list(templates)}, indent=1))
            os.replace(tmp, manifest)

    def shard_path(self, name: str) -> Path:
        return self.folder / f"shard-{name}.safetensors"

    def has_shard(self, name: str) -> bool:
        """Whether shard `name` is complete (resume skips it)."""
        return self.shard_path(name).is_file()

    def write_shard(self, name: str, keys: Sequence[str], embeddings: torch.Tensor | np.ndarray) -> Path:
        emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
        if emb.ndim != 2 or emb.shape[0] != len(keys) or emb.shape[1] != self.dim:
            raise ValueError(f"shard {name}: need ({len(keys)}, {self.dim}) embeddings, got {tuple(emb.shape)}")
        path = self.shard_path(name)
        _atomic_save({"embeddings": emb.detach().to("cpu", torch.float16)},
                     {"keys": json.dumps(list(keys))}, path)
        return path

    def write_concepts(self, weights: torch.Tensor | np.ndarray, names: Sequence[str]) -> Path:
        """(dim, K) temperature-scaled text embeddings and their K names."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if w.ndim != 2 or w.shape != (self.dim, len(names)):
            raise ValueError(f"concept weights must be ({self.dim}, {len(names)}), got {tuple(w.shape)}")
        path = self.folder / "concepts.safetensors"
        _atomic_save({"weights": w}, {"names": json.dumps([str(n) for n in names])}, path)
        return path


class Priors:
    """Read side: `embeddings(keys)` looks masks up across all shards; `concepts()` gives (W, names)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder}: no manifest.json; is this the output of `tap-priors`?")
        try:
            meta = json.loads(manifest.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"unknown priors format {meta.get('format')!r} (expected {FORMAT})")
            self.dim: int = int(meta["dim"])
            self.teacher: str = str(meta.get("teacher", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{manifest}: not a priors manifest ({exc})") from None
        self._rows: dict[str, tuple[int, int]] = {}
        self._shards: list[torch.Tensor] = []
        for i, path in enumerate(sorted(self.folder.glob("shard-*.safetensors"))):
            keys, embeddings = _read_shard(path, self.dim)
            self._shards.append(embeddings)
            self._rows.update((k, (i, r)) for r, k in enumerate(keys))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def embeddings(self, keys: Iterable[str]) -> torch.Tensor:
        """(N, dim) float32 V_C for `keys`; every key must be present (check with `in`)."""
        rows = [self._rows[k] for k in keys]
        if not rows:
            return torch.zeros(0, self.dim)
        return torch.stack([self._shards[s][r] for s, r in rows]).float()

    def concepts(self) -> tuple[torch.Tensor, list[str]]:
        from safetensors import safe_open
        path = self.folder / "concepts.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no concepts.safetensors (the concept text matrix)")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("weights").float(), json.loads(f.metadata()["names"])


def _read_shard(path: Path, dim: int) -> tuple[list[str], torch.Tensor]:
    """A shard's keys and (N, dim) embeddings; ValueError naming the file when it is cut short or not a shard (a
    copy that stopped half way), since its rows would otherwise be looked up under the wrong keys."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = json.loads((f.metadata() or {})["keys"])
            embeddings = f.get_tensor("embeddings")
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable priors shard ({exc})") from None
    if not isinstance(keys, list) or tuple(embeddings.shape) != (len(keys), dim):
        raise ValueError(f"{path}: {len(keys) if isinstance(keys, list) else 'no'} keys for embeddings of shape "
                         f"{tuple(embeddings.shape)} (expected one {dim}-d row per key)")
    return [str(k) for k in keys], embeddings


def target_log_probs(v_c: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log P_target = log_softmax(normalize(V_C) @ W): the official `encode_tgt` (W carries the temperature)."""
    return torch.log_softmax(F.normalize(v_c.float(), dim=-1) @ weights.float(), dim=-1)
