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
from .transforms import preprocess, upscale_masks


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

    model = TAP(TAPConfig.from_dict({**cfg["model"], "name": fixture.name}))
    load_weights(model, fixture / cfg["checkpoint"])
    model = model.to(resolve_dtype(cfg.get("dtype", "float32"), torch.device("cpu"))).eval()
    model.concept_projector.reset_weights(*load_concepts(fixture / cfg["concepts"]))
    tok = TextTokenizer((fixture / cfg["tokenizer"]).resolve())
    max_new = int(cfg.get("max_new_tokens", model.config.max_text_len - 1))

    checks: list[Check] = []

    def compare(name: str, ours: np.ndarray, prefix: str = "") -> None:
        if name not in ref.files:
            return
        rule, atol = _rule(tol, name, prefix)
        expected = ref[name]
        if rule == "exact":
            same = ours.shape == expected.shape and np.array_equal(ours, expected)
            err = 0.0 if same else float(np.size(expected) if ours.shape != expected.shape
                                         else np.count_nonzero(ours != expected))
            checks.append(Check(name, "exact", err, same))
        elif rule == "atol":
            err = float(np.abs(ours.astype(np.float64) - expected).max()) if ours.shape == expected.shape \
                else float("inf")
            checks.append(Check(name, f"atol={atol:g}", err, err <= atol))

    rgb = load_image(fixture / cfg["image"])
    batch, info = preprocess(rgb, model.config.image_size)
    batch = batch[None]
    compare("img_batch_uint8", batch)
    with torch.inference_mode():
        taps: dict[str, torch.Tensor] = {}
        features = model.get_features(torch.from_numpy(batch), taps)
        compare("input", taps["input"].float().contiguous().numpy())
        compare("image_embedding", features.float().contiguous().numpy())
        sem_tokens, names = [], []
        for ps in prompt_sets["prompt_sets"]:
            p = ps["name"] + "_"
            rows = np.asarray(ps["points"], dtype=np.float32)[None]
            rows[..., :2] *= info.scale32
            out = model.get_outputs(features, torch.from_numpy(rows))
            idx = route(out["iou_pred"], torch.from_numpy(rows[:, 0, 2]))
            ar = torch.arange(rows.shape[0])
            for key, ref_key in [("sparse_embeds", "sparse_embeds"), ("iou_pred", "iou_pred"),
                                 ("mask_pred", "mask_logits"), ("sem_tokens", "sem_tokens"),
                                 ("sem_embeds", "sem_embeds")]:
                compare(p + ref_key, out[key].float().numpy(), p)
            compare(p + "mask_index", idx.numpy(), p)
            masks = upscale_masks(out["mask_pred"][ar, idx], info).numpy()
            if p + "masks" in ref.files:
                diff = int(np.count_nonzero(masks != ref[p + "masks"])) if masks.shape == ref[p + "masks"].shape \
                    else masks.size
                allowed = int(ref[p + "masks_near_zero"][0]) if p + "masks_near_zero" in ref.files else 0
                checks.append(Check(p + "masks", f"pixels <= {allowed}", diff, diff <= allowed))
            probs = model.concept_projector.probs(out["sem_embeds"][ar, idx])
            top = probs.max(dim=-1)
            compare(p + "concept_probs", probs.numpy(), p)
            compare(p + "concept_prob", top.values.numpy(), p)
            compare(p + "concept_index", top.indices.numpy(), p)
            compare(p + "concept_name", np.array([model.concept_projector.names[i] for i in top.indices]), p)
            sem = out["sem_tokens"][ar, idx]
            buf = model.text_decoder.generate(sem, tok.bos_id, tok.eos_id, tok.pad_id, max_new).numpy()
            _check_tokens(checks, p + "caption_tokens", buf, ref, tok.eos_id)
            compare(p + "caption", np.array(tok.detokenize(buf)), p)
            sem_tokens.append(sem)
            names.append(ps["name"])
        batch_spec = prompt_sets.get("batch")
        if batch_spec:
            bp = batch_spec["name"] + "_"
            sem = torch.cat([sem_tokens[names.index(n)] for n in batch_spec["of"]])
            buf = model.text_decoder.generate(sem, tok.bos_id, tok.eos_id, tok.pad_id, max_new).numpy()
            _check_tokens(checks, bp + "caption_tokens", buf, ref, tok.eos_id)
            compare(bp + "caption", np.array(tok.detokenize(buf)))
        if "teacher_tokens" in ref.files and sem_tokens:
            teacher = torch.from_numpy(ref["teacher_tokens"])
            compare("teacher_prefix", model.text_decoder.encoder(sem_tokens[0]).float().numpy())
            compare("teacher_logits", model.text_decoder(sem_tokens[0], teacher).numpy())
        if "teacher_text" in ref.files:
            ids = [tok.bos_id] + tok.encode(str(ref["teacher_text"]))
            same = ids == ref["teacher_tokens"][0].tolist()
            checks.append(Check("tokenizer(teacher_text)", "exact", 0.0 if same else 1.0, same))
    return checks


def _check_tokens(checks: list[Check], name: str, ours: np.ndarray, ref: np.lib.npyio.NpzFile, eos: int) -> None:
    if name in ref.files:
        bad = _tokens_until_eos(ours, ref[name], eos)
        checks.append(Check(name, "tokens until EOS", bad, bad == 0))
