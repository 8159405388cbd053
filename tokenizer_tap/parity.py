"""Compare this implementation with the official one on a parity fixture directory.

A fixture (see ../shared/reference/tap-parity/A/README.md) holds a checkpoint in the official format, an image,
prompt sets in original pixels, the official outputs (`expected.npz`) and the tolerances. Everything is read from
the fixture's files, so any fixture of that layout can be checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .build import resolve_dtype
from .checkpoint import load_concepts, load_weights
from .config import TAPConfig
from .image_io import load_image
from .modeling import TAP, route
from .text_tokenizer import TextTokenizer
from .transforms import ResizeInfo, preprocess, upscale_masks


@dataclass
class Check:
    name: str
    rule: str  # "exact", "atol=...", "tokens until EOS", "pixels <= N"
    error: float  # max abs error, or count of mismatches
    passed: bool

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<28} {self.rule:<22} {self.error:.3g}"


def _rule(tolerances: dict, name: str, prefix: str) -> tuple[str, float | None]:
    generic = name.replace(prefix, "pN_", 1) if prefix else name
    for key in (name, generic):
        if key in tolerances.get("exact", []):
            return "exact", None
        if key in tolerances.get("atol", {}):
            return "atol", float(tolerances["atol"][key])
    return "", None


def _tokens_until_eos(ours: np.ndarray, ref: np.ndarray, eos: int) -> int:
    """Number of rows whose buffers differ up to and including their first EOS (reference row decides)."""
    bad = 0
    for a, b in zip(ours, ref):
        hits = np.nonzero(b == eos)[0]
        end = hits[0] + 1 if hits.size else len(b)
        bad += int(len(a) < end or not np.array_equal(a[:end], b[:end]))
    return bad


def run_parity(fixture: str | Path, threads: int | None = 2) -> list[Check]:
    """Run the fixture's pipeline on our implementation and compare every checked array."""
    fixture = Path(fixture)
    cfg = json.loads((fixture / "config.json").read_text())
    tol = json.loads((fixture / cfg["tolerances"]).read_text())
    prompt_sets = json.loads((fixture / cfg["prompts"]).read_text())
    ref = np.load(fixture / cfg["expected"])
    previous_threads = torch.get_num_threads()
    if threads:  # the reference ran on 2 threads, which fixes the order of fp32 summations
        torch.set_num_threads(threads)
    try:
        return _run(fixture, cfg, tol, prompt_sets, ref)
    finally:
        torch.set_num_threads(previous_threads)


def _run(fixture: Path, cfg: dict, tol: dict, prompt_sets: dict, ref: np.lib.npyio.NpzFile) -> list[Check]:
    model, tok = _load_fixture_model(fixture, cfg)
    max_new = int(cfg.get("max_new_tokens", model.config.max_text_len - 1))
    check = _Checker(ref, tol)
    rgb = load_image(fixture / cfg["image"])
    batch, info = preprocess(rgb, model.config.image_size)
    batch = batch[None]
    check.compare("img_batch_uint8", batch)
    with torch.inference_mode():
        taps: dict[str, torch.Tensor] = {}
        features = model.get_features(torch.from_numpy(batch), taps)
        check.compare("input", taps["input"].float().contiguous().numpy())
        check.compare("image_embedding", features.float().contiguous().numpy())
        sets = prompt_sets["prompt_sets"]
        sem_tokens = [_check_prompt_set(check, model, tok, features, info, ps, max_new) for ps in sets]
        batch_spec = prompt_sets.get("batch")
        if batch_spec:
            names = [ps["name"] for ps in sets]
            sem = torch.cat([sem_tokens[names.index(n)] for n in batch_spec["of"]])
            _check_caption(check, model, tok, sem, batch_spec["name"] + "_", max_new, per_prompt=False)
        _check_teacher(check, model, tok, sem_tokens)
    return check.checks


def _load_fixture_model(fixture: Path, cfg: dict) -> tuple[TAP, TextTokenizer]:
    """The fixture's checkpoint, dtype and concepts in our model, and its text tokenizer."""
    model = TAP(TAPConfig.from_dict({**cfg["model"], "name": fixture.name}))
    load_weights(model, fixture / cfg["checkpoint"])
    model = model.to(resolve_dtype(cfg.get("dtype", "float32"), torch.device("cpu"))).eval()
    model.concept_projector.reset_weights(*load_concepts(fixture / cfg["concepts"]))
    return model, TextTokenizer((fixture / cfg["tokenizer"]).resolve())


class _Checker:
    """The run's checks: each output of ours against the reference array of the same name, by the fixture's rule for
    it (an output the reference does not hold is not checked)."""

    def __init__(self, ref: np.lib.npyio.NpzFile, tolerances: dict) -> None:
        self.ref, self.tolerances = ref, tolerances
        self.checks: list[Check] = []

    def compare(self, name: str, ours: np.ndarray, prefix: str = "") -> None:
        if name not in self.ref.files:
            return
        rule, atol = _rule(self.tolerances, name, prefix)
        expected = self.ref[name]
        if rule == "exact":
            same = ours.shape == expected.shape and np.array_equal(ours, expected)
            err = 0.0 if same else float(np.size(expected) if ours.shape != expected.shape
                                         else np.count_nonzero(ours != expected))
            self.checks.append(Check(name, "exact", err, same))
        elif rule == "atol":
            err = float(np.abs(ours.astype(np.float64) - expected).max()) if ours.shape == expected.shape \
                else float("inf")
            self.checks.append(Check(name, f"atol={atol:g}", err, err <= atol))

    def tokens(self, name: str, ours: np.ndarray, eos: int) -> None:
        if name in self.ref.files:
            bad = _tokens_until_eos(ours, self.ref[name], eos)
            self.checks.append(Check(name, "tokens until EOS", bad, bad == 0))

    def masks(self, name: str, masks: np.ndarray) -> None:
        """Upscaled masks may differ in the pixels whose logits the reference records as near zero."""
        if name not in self.ref.files:
            return
        expected = self.ref[name]
        diff = int(np.count_nonzero(masks != expected)) if masks.shape == expected.shape else masks.size
        allowed = int(self.ref[name + "_near_zero"][0]) if name + "_near_zero" in self.ref.files else 0
        self.checks.append(Check(name, f"pixels <= {allowed}", diff, diff <= allowed))


def _check_prompt_set(check: _Checker, model: TAP, tok: TextTokenizer, features: torch.Tensor, info: ResizeInfo,
                      ps: dict, max_new: int) -> torch.Tensor:
    """One prompt set's decoder outputs, routed mask, concept and caption; returns its routed semantic tokens."""
    p = ps["name"] + "_"
    rows = np.asarray(ps["points"], dtype=np.float32)[None]
    rows[..., :2] *= info.scale32
    out = model.get_outputs(features, torch.from_numpy(rows))
    idx = route(out["iou_pred"], torch.from_numpy(rows[:, 0, 2]))
    ar = torch.arange(rows.shape[0])
    for key, ref_key in [("sparse_embeds", "sparse_embeds"), ("iou_pred", "iou_pred"), ("mask_pred", "mask_logits"),
                         ("sem_tokens", "sem_tokens"), ("sem_embeds", "sem_embeds")]:
        check.compare(p + ref_key, out[key].float().numpy(), p)
    check.compare(p + "mask_index", idx.numpy(), p)
    check.masks(p + "masks", upscale_masks(out["mask_pred"][ar, idx], info).numpy())
    probs = model.concept_projector.probs(out["sem_embeds"][ar, idx])
    top = probs.max(dim=-1)
    check.compare(p + "concept_probs", probs.numpy(), p)
    check.compare(p + "concept_prob", top.values.numpy(), p)
    check.compare(p + "concept_index", top.indices.numpy(), p)
    check.compare(p + "concept_name", np.array([model.concept_projector.names[i] for i in top.indices]), p)
    sem = out["sem_tokens"][ar, idx]
    _check_caption(check, model, tok, sem, p, max_new)
    return sem


def _check_caption(check: _Checker, model: TAP, tok: TextTokenizer, sem: torch.Tensor, p: str, max_new: int,
                   per_prompt: bool = True) -> None:
    """The greedy caption's tokens and text. A prompt set's text is checked by the rule for every set's (`pN_`), a
    batch's by its own name's (`per_prompt=False`)."""
    buf = model.text_decoder.generate(sem, tok.bos_id, tok.eos_id, tok.pad_id, max_new).numpy()
    check.tokens(p + "caption_tokens", buf, tok.eos_id)
    check.compare(p + "caption", np.array(tok.detokenize(buf)), p if per_prompt else "")


def _check_teacher(check: _Checker, model: TAP, tok: TextTokenizer, sem_tokens: list[torch.Tensor]) -> None:
    """The caption decoder teacher-forced on the reference's tokens, and our tokenizer on the reference's text."""
    ref = check.ref
    if "teacher_tokens" in ref.files and sem_tokens:
        teacher = torch.from_numpy(ref["teacher_tokens"])
        check.compare("teacher_prefix", model.text_decoder.encoder(sem_tokens[0]).float().numpy())
        check.compare("teacher_logits", model.text_decoder(sem_tokens[0], teacher).numpy())
    if "teacher_text" in ref.files:
        ids = [tok.bos_id] + tok.encode(str(ref["teacher_text"]))
        same = ids == ref["teacher_tokens"][0].tolist()
        check.checks.append(Check("tokenizer(teacher_text)", "exact", 0.0 if same else 1.0, same))
