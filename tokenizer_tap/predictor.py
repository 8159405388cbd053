"""The interactive API: encode an image once, then answer many region prompts cheaply.

`set_image` runs the heavy encoder and caches its features by image content (bounded LRU), so a second click on
the same image - or coming back to an earlier image - costs only the prompt decoder, the concept lookup and the
caption. Likewise the grid of point prompts that `segment_everything` and `find` read is decoded once per image
(`dense.DenseGrid`, bounded in bytes), so a second query on an image costs no decoder pass.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .build import DEFAULT_CONCEPTS, TINY_TOKENIZER, build_tap, checkpoint_folder
from .cache import BoundedCache
from .config import get_config
from .dense import SUPPORT, DenseGrid, PointMasks, dedupe, grid_prompts, instances
from .errors import CheckpointError, PromptError, WeightsNotFoundError
from .hub import checkpoint_path, concepts_path, tokenizer_path
from .image_io import MAX_PIXELS, ImageSource, load_image
from .modeling import TAP, route
from .prompts import Prompt
from .region import Region
from .text_tokenizer import TextTokenizer
from .transforms import ResizeInfo, preprocess, upscale_masks
from .vocabulary import match_query


@dataclass
class Candidates:
    """All masks the decoder proposes for one prompt (original size), their predicted IoUs, and the one `predict`
    routes to (mask 0 for a box, the best of the others for points)."""

    masks: np.ndarray  # (M, H, W) bool
    iou: np.ndarray  # (M,) float32
    chosen: int


@dataclass
class _Image:
    key: str
    info: ResizeInfo
    features: torch.Tensor  # (1, C, h, w) neck output: what the region decoder reads
    trunk: torch.Tensor  # (1, width, h, w) encoder output before the neck: what a chat projector reads


def _outputs(out: dict[str, torch.Tensor], j: int, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt `j`'s outputs for mask index (or indices) `masks` of one decoder batch."""
    return {"iou": out["iou_pred"][j, masks], "index": masks, "mask_logits": out["mask_pred"][j, masks],
            "sem_tokens": out["sem_tokens"][j, masks, 0], "sem_embeds": out["sem_embeds"][j, masks]}


def _stacked(parts: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-prompt outputs (prompt index -> outputs) as tensors in prompt order."""
    return {k: torch.stack([parts[i][k] for i in range(len(parts))]) for k in parts[0]}


class TapPredictor:
    """Promptable region tokenizer over one current image.

    Example:
        predictor = TapPredictor.from_pretrained("tap_vit_l")
        predictor.set_image("photo.jpg")
        region, = predictor.predict([Prompt.point(120, 340)])
        print(region.describe())
    """

    def __init__(self, model: TAP, tokenizer: TextTokenizer, cache_size: int = 8,
                 max_pixels: int = MAX_PIXELS, decoder_batch: int = 16, grid_cache_mb: int = 512) -> None:
        if tokenizer.n_words != model.config.vocab_size:
            raise CheckpointError(f"tokenizer {tokenizer.path} has {tokenizer.n_words} pieces but the model expects "
                                  f"{model.config.vocab_size}: use the tokenizer the checkpoint was trained with")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1 (the current image is cached)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cache_size, self.max_pixels, self.decoder_batch = cache_size, max_pixels, decoder_batch
        self._cache: BoundedCache[str, _Image] = BoundedCache("tap.image_features", cache_size)
        self._image: _Image | None = None
        # Dense-prompt passes by (image key, points per side): ~190 MiB each for full-size models at 16x16 (every
        # point mask is kept for `find`), so the bound is in bytes: two full-size images, or ~27 of the demo model's.
        self._grids: BoundedCache[tuple[str, int], DenseGrid] = BoundedCache(
            "tap.dense_grids", grid_cache_mb << 20, weigh=lambda grid: grid.nbytes, unit="bytes")
        self._lock = threading.RLock()
        self.encoder_calls = 0  # how many times the image encoder ran (cache misses)
        self.grid_calls = 0  # how many times a dense-prompt grid was decoded (cache misses)

    @classmethod
    def from_pretrained(cls, model: str | Path = "tap_vit_l", checkpoint: str | Path | None = None, *,
                        concepts: str | Path | None = DEFAULT_CONCEPTS, tokenizer: str | Path | None = None,
                        device: str = "auto", dtype: str = "auto", **kwargs) -> TapPredictor:
        """Official weights (explicit paths, or the hub cache), or a TAP checkpoint folder given as `model` or
        `checkpoint` (its own tokenizer and concepts are the defaults), on the best available device.

        Every missing file is reported in one `WeightsNotFoundError`, so an offline user fixes them all at once.
        """
        folder = checkpoint_folder(model, checkpoint)
        if folder is not None:
            own = folder / "text_tokenizer.model"
            tap = build_tap(folder, concepts=concepts, device=device, dtype=dtype)
            return cls(tap, TextTokenizer(tokenizer or (own if own.is_file() else tokenizer_path())), **kwargs)
        config = get_config(model)
        resolvers = {"checkpoint": lambda: checkpoint_path(config, checkpoint),
                     "tokenizer": lambda: tokenizer_path(tokenizer)}
        if concepts is not None:
            resolvers["concepts"] = lambda: concepts_path(concepts)
        paths, missing = {}, []
        for name, resolve in resolvers.items():
            try:
                paths[name] = resolve()
            except WeightsNotFoundError as exc:
                missing.append(f"- {exc}")
        if missing:
            raise WeightsNotFoundError(f"{len(missing)} file(s) needed by {config.name} are missing:\n"
                                       + "\n".join(missing))
        tap = build_tap(config, paths["checkpoint"], concepts=paths.get("concepts"), device=device, dtype=dtype)
        return cls(tap, TextTokenizer(paths["tokenizer"]), **kwargs)

    @classmethod
    def random(cls, model: str = "tap_tiny", seed: int = 0, device: str = "auto", dtype: str = "auto",
               tokenizer: str | Path | None = None, **kwargs) -> TapPredictor:
        """Random weights (no download): `tap_tiny` with the bundled tokenizer, or a full size for benchmarks."""
        tap = build_tap(model, random_weights=True, seed=seed, device=device, dtype=dtype)
        tok = TextTokenizer(tokenizer or (TINY_TOKENIZER if tap.config.vocab_size != 32000 else tokenizer_path()))
        return cls(tap, tok, **kwargs)

    # ---------------------------------------------------------------------------------------------- images
    @staticmethod
    def image_key(rgb: np.ndarray) -> str:
        digest = hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16)  # hashes in place, no copy
        digest.update(str(rgb.shape).encode())
        return digest.hexdigest()

    def set_image(self, image: ImageSource) -> str:
        """Make `image` current, encoding it unless its features are cached. Returns its content key."""
        rgb = load_image(image, self.max_pixels)
        key = self.image_key(rgb)
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = self._cache.put(key, self._encode(rgb, key))
            self._image = cached
        return key

    def is_cached(self, key: str) -> bool:
        """Whether the features of image `key` are still in the cache (else `set_image` it again)."""
        return key in self._cache

    def clear_cache(self) -> None:
        """Forget all cached features and dense-prompt passes, e.g. after the weights changed."""
        with self._lock:
            self._cache.clear()
            self._grids.clear()
            self._image = None

    def reset_image(self) -> None:
        with self._lock:
            self._image = None

    def _encode(self, rgb: np.ndarray, key: str) -> _Image:
        batch, info = preprocess(rgb, self.model.config.image_size)
        encoder = self.model.image_encoder
        with torch.inference_mode():
            x = self.model.normalize(torch.from_numpy(batch)[None]).contiguous(memory_format=torch.channels_last)
            trunk = encoder.trunk(x)
            features = encoder.neck(trunk)
        self.encoder_calls += 1
        return _Image(key, info, features, trunk)

    def trunk_features(self, key: str | None = None) -> torch.Tensor:
        """(1, width, h, w) last-stage encoder features of the current (or cached `key`) image."""
        with self._lock:
            return self._current(key).trunk

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the current image."""
        return self.size_of()

    def size_of(self, key: str | None = None) -> tuple[int, int]:
        """(width, height) of the current image, or of the cached image `key`."""
        h, w = self._current(key).info.original_hw
        return w, h

    def _current(self, key: str | None = None) -> _Image:
        """The current image, or the cached image with content key `key` (as returned by `set_image`)."""
        if key is not None:
            cached = self._cache.get(key)
            if cached is None:
                raise RuntimeError(f"image {key} is no longer cached: call set_image(image) again")
            return cached
        if self._image is None:
            raise RuntimeError("no image set: call set_image(image) before predict()")
        return self._image

    # --------------------------------------------------------------------------------------------- prompts
    def predict(self, prompts: Sequence[Prompt], *, image: str | None = None, top_k: int = 3,
                caption: bool = True, max_new_tokens: int | None = None, temperature: float = 0.0) -> list[Region]:
        """Segment, classify and caption each prompt (one Region per prompt, same order).

        Args:
            prompts: a list of `Prompt`s in original image pixels.
            image: content key from `set_image` to use instead of the current image (safe when several
                callers share one predictor).
            top_k: concepts reported per region.

        Prompts of the same length are decoded together; all captions are generated in one batch.
        """
        if isinstance(prompts, Prompt) or not all(isinstance(p, Prompt) for p in prompts):
            raise PromptError("predict() takes a list of Prompt objects, e.g. [Prompt.point(x, y)]")
        if top_k < 1:
            raise PromptError(f"top_k must be at least 1, got {top_k}")
        with self._lock:
            image = self._current(image)
            h, w = image.info.original_hw
            rows = [p.rows(w, h) for p in prompts]
            if not rows:
                return []
            with torch.inference_mode():
                out = self.decode_rows(image, rows)
                return self._regions(image, out, list(range(len(rows))), prompts, top_k, caption,
                                     max_new_tokens, temperature)

    def classify(self, prompts: Sequence[Prompt], *, image: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N,) predicted IoU and (N, K) concept probabilities over the whole vocabulary of each prompt's routed mask,
        without masks or captions: zero-shot classification (box prompts use mask 0, as the official eval)."""
        with self._lock:
            current = self._current(image)
            h, w = current.info.original_hw
            rows = [p.rows(w, h) for p in prompts]
            if not rows:
                return np.zeros(0, np.float32), np.zeros((0, len(self.model.concept_projector.names)), np.float32)
            with torch.inference_mode():
                out = self.decode_rows(current, rows)
                probs = self.model.concept_projector.probs(out["sem_embeds"])
        return out["iou"].float().cpu().numpy(), probs.cpu().numpy()

    def _regions(self, image: _Image, out: dict[str, torch.Tensor], keep: list[int], prompts: Sequence[Prompt],
                 top_k: int, caption: bool, max_new_tokens: int | None = None,
                 temperature: float = 0.0) -> list[Region]:
        """Full-size masks, concepts and captions for the rows `keep` of `decode_rows` output."""
        sel = torch.tensor(keep, device=out["iou"].device)
        masks = upscale_masks(out["mask_logits"][sel], image.info).cpu().numpy()
        concepts = (self.model.concept_projector.decode(out["sem_embeds"][sel], top_k)
                    if self.model.concept_projector.loaded else [[] for _ in keep])
        captions = (self.caption(out["sem_tokens"][sel], max_new_tokens, temperature) if caption
                    else [""] * len(keep))
        sem = out["sem_tokens"][sel].float().cpu().numpy()
        return [Region.from_mask(masks[j], concepts[j], captions[j], iou=float(out["iou"][i]),
                                 mask_index=int(out["index"][i]), sem_token=sem[j], prompt=prompts[i])
                for j, i in enumerate(keep)]

    def decode_rows(self, image: _Image, rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Tensor-level twin of `predict`: original-pixel (K, 3) rows -> routed low-res outputs, in input order.

        Returns iou (N,), index (N,), mask_logits (N, 256, 256), sem_tokens (N, C), sem_embeds (N, D).
        """
        return self._decode_rows(image, rows)[0]

    def _decode_rows(self, image: _Image, rows: list[np.ndarray], every: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """`decode_rows`, and with `every` the same outputs for each prompt's point masks (masks 1..M-1, or the one
        mask of a single-mask decoder) as (N, M', ...): the masks routing passed over, for `find`."""
        parts: dict[int, dict[str, torch.Tensor]] = {}
        others: dict[int, dict[str, torch.Tensor]] = {}
        for chunk, sel, out in self._decode(image, rows):
            masks = torch.arange(out["iou_pred"].shape[1], device=sel.device)
            point = masks[1:] if len(masks) > 1 else masks  # mask 0 answers boxes
            for j, i in enumerate(chunk):
                parts[i] = _outputs(out, j, sel[j])
                if every:
                    others[i] = _outputs(out, j, point)
        return _stacked(parts), _stacked(others) if every else None

    def candidates(self, prompts: Sequence[Prompt], *, image: str | None = None) -> list[Candidates]:
        """Every mask the decoder proposes for each prompt, before routing picks one (SAM's multimask output): for
        ambiguity-aware scores (a click on a window may mean the window or the house) and for alternatives in a UI."""
        with self._lock:
            current = self._current(image)
            h, w = current.info.original_hw
            rows = [p.rows(w, h) for p in prompts]
            found: dict[int, Candidates] = {}
            with torch.inference_mode():
                for chunk, sel, out in self._decode(current, rows):
                    for j, i in enumerate(chunk):
                        found[i] = Candidates(upscale_masks(out["mask_pred"][j], current.info).cpu().numpy(),
                                              out["iou_pred"][j].float().cpu().numpy(), int(sel[j]))
        return [found[i] for i in range(len(rows))]

    def _decode(self, image: _Image, rows: list[np.ndarray]
                ) -> Iterator[tuple[list[int], torch.Tensor, dict[str, torch.Tensor]]]:
        """Decoder outputs for all masks, in batches of prompts of equal length (no padding tokens): yields (row
        indices, the mask each routes to, outputs)."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(len(r), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.decoder_batch):
                chunk = idx[s:s + self.decoder_batch]
                pts = np.stack([rows[i] for i in chunk])
                pts[..., :2] *= image.info.scale32
                out = self.model.get_outputs(image.features, torch.from_numpy(pts))
                yield chunk, route(out["iou_pred"], torch.from_numpy(pts[:, 0, 2])), out

    def caption(self, sem_tokens: torch.Tensor, max_new_tokens: int | None = None,
                temperature: float = 0.0, batch: int = 64) -> list[str]:
        """Captions for (N, C) semantic tokens, generated in batches with a shared KV cache."""
        out: list[str] = []
        tok = self.tokenizer
        sem_tokens = sem_tokens.to(self.model.device, self.model.dtype)
        for s in range(0, sem_tokens.shape[0], batch):
            buf = self.model.text_decoder.generate(sem_tokens[s:s + batch, None], tok.bos_id, tok.eos_id,
                                                   tok.pad_id, max_new_tokens, temperature)
            out += tok.detokenize(buf.cpu().numpy())
        return out

    # ------------------------------------------------------------------------------- segment everything, find
    def dense(self, key: str | None = None, points_per_side: int = 16) -> DenseGrid:
        """The dense-prompt pass over the current (or cached `key`) image: decoded on the first call per image and
        grid size, then read from the cache."""
        if points_per_side < 1:
            raise PromptError("points_per_side must be at least 1")
        with self._lock:
            img = self._current(key)
            grid = self._grids.get((img.key, points_per_side))
            if grid is None:
                h, w = img.info.original_hw
                prompts = grid_prompts(w, h, points_per_side)
                projector = self.model.concept_projector
                with torch.inference_mode():
                    out, every = self._decode_rows(img, [p.rows(w, h) for p in prompts], every=projector.loaded)
                    probs = points = None
                    if every is not None:
                        probs = projector.probs(out["sem_embeds"])
                        points = PointMasks.build(every, projector.probs(every["sem_embeds"].flatten(0, 1)), img.info)
                grid = self._grids.put((img.key, points_per_side),
                                       DenseGrid.build(prompts, out, probs, img.info, points))
                self.grid_calls += 1
            return grid

    def segment_everything(self, image: ImageSource | None = None, *, key: str | None = None,
                           points_per_side: int = 16,
                           iou_threshold: float = 0.7, overlap_threshold: float = 0.7, min_area: float = 0.001,
                           max_regions: int = 24, top_k: int = 3, caption: bool = True) -> list[Region]:
        """Whole-scene regions: a grid of point prompts, kept if confident, deduplicated by mask overlap.

        Args:
            points_per_side: the grid is n x n point prompts over the image.
            iou_threshold: drop masks whose predicted IoU is below this.
            overlap_threshold: a mask overlapping a better one by more than this IoU is a duplicate.
            min_area: drop masks covering less than this fraction of the image.
            max_regions: keep at most this many, best predicted IoU first.

        `image` makes a new image current first; `key` selects a cached image as in `predict`.
        """
        if points_per_side < 1 or top_k < 1:
            raise PromptError("points_per_side and top_k must be at least 1")
        with self._lock:
            if image is not None:
                key = self.set_image(image)
            img = self._current(key)
            grid = self.dense(img.key, points_per_side)
            iou = grid.out["iou"].float()
            ranked = torch.argsort(iou, descending=True)
            order = ranked[((iou >= iou_threshold) & (grid.area >= min_area))[ranked]].tolist()
            keep = dedupe(grid.low, order, overlap_threshold, max_regions)
            if not keep:
                return []
            with torch.inference_mode():
                return self._regions(img, grid.out, keep, grid.prompts, top_k, caption)

    def find(self, query: str, image: ImageSource | None = None, *, key: str | None = None,
             min_score: float = 0.5, max_instances: int = 20, points_per_side: int = 16,
             overlap_threshold: float = 0.5, min_area: float = 0.001, top_k: int = 3,
             caption: bool = True, max_new_tokens: int | None = None) -> list[Region]:
        """Every instance of the concepts `query` names ("cars", "traffic light", "cars and people"), best first.

        Candidates are all the point masks of the grid prompts (not only the routed one: a click on a house's wall
        routes to the wall, the house is among its other masks): a mask is a candidate for concept c when c is its
        most probable concept with probability at least `min_score` (its `score`: `Region.concept_prob`, c first
        in `concepts`). Each weighs score x predicted IoU; candidates overlapping a heavier one are grouped with it
        (`dense.merge`), a group is an instance when its weights add up to `dense.SUPPORT` (0.5 at 16 x 16,
        scaled with the grid's area), and it is shown by the mask its members agree with most. The first
        `max_instances` instances by score are returned (regions of kind "find", in original pixels).

        Measured with `finetune.tap.find_eval` on the demo model (defaults chosen on 100 training scenes, reported
        on held-out scenes 0-99, seed 0): exact counts 0.59 -> 0.67, instance recall 0.53 -> 0.62, precision
        0.69 -> 0.82 against routed masks kept by score alone. Most of what is left is the model's: birds are too
        small for its 64 x 64 masks (no point mask reaches IoU 0.5 on 94 % of them), and it misnames the
        geometric shapes from any prompt.

        Args:
            query: concept names as a user types them: any case, plural or singular, several joined by "and",
                "or" or commas, near spellings (`vocabulary.match_query`).
            min_score: 0.5 - the concept holds at least half the probability mass (so it is also the top one).
                With the support rule, 0.3 and 0.4 counted within 0.02 of it on the training scenes.
            max_instances: 20, a bound on caption work; a 16 x 16 grid seldom separates more objects of a kind.
            points_per_side: 16, the grid `segment_everything` shares; 24 raised exact counts on the training
                scenes from 0.70 to 0.72 for 2.25 times the first query's decoder work, 32 did no better.
            overlap_threshold: 0.5 of the smaller mask: grid points on one object give nested or partial masks
                of it, which plain IoU (segment_everything's measure) would keep as separate instances.
            min_area: drop masks covering less than this fraction of the image (as segment_everything).
            caption, max_new_tokens: caption each kept instance (greedy), at most this many tokens long.

        Raises:
            UnknownConceptError: the query names nothing in the vocabulary; the message lists the closest names.

        The grid and every point mask are decoded once per image and grid size (`dense`), so a second query on
        the same image costs only ranking, grouping, and the kept instances' masks and captions.
        """
        if max_instances < 1 or top_k < 1:
            raise PromptError("max_instances and top_k must be at least 1")
        with self._lock:
            if image is not None:
                key = self.set_image(image)
            img = self._current(key)
            names = self.model.concept_projector.names
            wanted = [names.index(n) for n in match_query(query, names)]
            grid = self.dense(img.key, points_per_side)
            if grid.points is None:  # decoded before this vocabulary was loaded
                raise RuntimeError("the image's grid predates the concept vocabulary: call clear_cache()")
            keep = instances(grid.points, wanted, min_score, overlap_threshold, min_area,
                             SUPPORT * (points_per_side / 16) ** 2)[:max_instances]
            if not keep:
                return []
            sel = torch.tensor(keep, device=grid.points.row.device)
            out = {k: v[sel] for k, v in grid.points.out.items()}
            out["mask_logits"] = out["mask_logits"].to(grid.out["mask_logits"].dtype)
            prompts = [grid.prompts[int(r)] for r in grid.points.row[sel]]
            with torch.inference_mode():
                regions = self._regions(img, out, list(range(len(keep))), prompts, top_k, caption, max_new_tokens)
        for region in regions:
            region.kind = "find"
        return regions
