"""Region captioning for TAP itself, as the official `eval_cap.py`: ground-truth boxes as prompts, greedy captions
from the semantic token, PTB tokenisation, then BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap; SPICE when
its models are installed).

Annotations are COCO-style JSON: `images` (`id`, `file_name`) and `annotations` (`id`, `image_id`, `bbox` as x y w h,
and `caption`, or `captions`/`sentences` for several references). Visual Genome is GRiT's `test.json` (one caption
per region). RefCOCOg is that layout with its referring expressions as references, or the refer toolkit's folder
(`refs(umd).p` + `instances.json`).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .questions import Question
from .spec import RunInputs, ScoreOptions, predictions

if TYPE_CHECKING:
    from tokenizer_tap.predictor import TapPredictor

    from .tap_answerers import RegionCaptioner

LMMS = None  # region captions come as COCO-style JSON or the refer toolkit's folder, not parquet
TAP_ONLY, CHOICES, IMAGES_REQUIRED = True, "", False
submission = None


def _references(ann: dict[str, Any]) -> list[str]:
    refs = ann.get("captions") or ann.get("sentences") or [ann.get("caption", "")]
    if isinstance(refs, str):
        refs = [refs]
    texts = [r.get("raw") or r.get("sent") or "" if isinstance(r, dict) else str(r) for r in refs]
    return [t for t in texts if t.strip()]


def load(path: str | Path) -> tuple[list[Question], dict[str, list[str]], dict[str, str]]:
    """Questions (one per region, the box as prompt), references by region id, and bad records with reasons.
    A folder is read as RefCOCOg in the refer toolkit's layout (`load_refer`, val split)."""
    if Path(path).is_dir():
        return load_refer(path)
    return _regions(json.loads(Path(path).read_text()))


def _regions(data: dict[str, Any]) -> tuple[list[Question], dict[str, list[str]], dict[str, str]]:
    files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    questions, references, bad = [], {}, {}
    for n, ann in enumerate(data.get("annotations", [])):
        rid = str(ann.get("id", n))
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image = files[ann["image_id"]]
        except (KeyError, TypeError, ValueError) as exc:
            bad[rid] = f"no usable bbox/image ({type(exc).__name__}: {exc})"
            continue
        refs = _references(ann)
        if w <= 0 or h <= 0 or not refs:
            bad[rid] = "empty box" if refs else "no reference caption"
            continue
        questions.append(Question(rid, image, "", "region", ann.get("id", n), box=(x, y, x + w, y + h)))
        references[rid] = refs
    return questions, references, bad


class _PlainData(pickle.Unpickler):
    """`refs(umd).p` is a pickle of lists, dicts and strings: refuse anything else (a pickle can run code)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def load_refer(folder: str | Path, split: str = "val") -> tuple[list[Question], dict[str, list[str]], dict[str, str]]:
    """RefCOCOg in the refer toolkit's layout (`refs(umd).p` + `instances.json`): one region per referred object of
    `split`, its referring expressions as the references."""
    folder = Path(folder)
    refs_file = next((folder / n for n in ("refs(umd).p", "refs(google).p") if (folder / n).exists()), None)
    if refs_file is None or not (folder / "instances.json").exists():
        raise FileNotFoundError(f"{folder} needs refs(umd).p and instances.json (RefCOCOg from the refer toolkit)")
    with refs_file.open("rb") as f:
        refs = _PlainData(f).load()
    instances = json.loads((folder / "instances.json").read_text())
    boxes = {a["id"]: a["bbox"] for a in instances["annotations"]}
    data = {"images": instances["images"], "annotations": []}
    for ref in refs:
        if ref.get("split") == split:
            data["annotations"].append({"id": ref["ref_id"], "image_id": ref["image_id"],
                                        "bbox": boxes.get(ref["ann_id"]), "sentences": ref.get("sentences", [])})
    return _regions(data)


METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def score(predictions: dict[str, str], references: dict[str, list[str]], *, meteor: bool = True,
          spice: bool = False) -> dict[str, Any]:
    """pycocoevalcap scores (x100 as papers print them) over the regions that have a prediction.

    METEOR, and the PTB tokeniser, run on Java; without `java` the tokeniser falls back to lower-casing and stripping
    punctuation, METEOR is skipped, and `notes` says so. SPICE is skipped with a note when it cannot run (it
    downloads Stanford CoreNLP models on first use)."""
    from pycocoevalcap.bleu.bleu import Bleu  # pycocoevalcap: only caption scoring needs it
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [i for i in references if i in predictions]
    if not ids:
        raise ValueError("no region has both a prediction and a reference")
    notes = []
    java = shutil.which("java") is not None
    gts = {i: [{"caption": c} for c in references[i]] for i in ids}
    res = {i: [{"caption": predictions[i]}] for i in ids}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    else:
        notes.append("java not found: simple tokenisation instead of PTB, METEOR skipped")
        gts = {i: [_simple_tokens(c["caption"]) for c in v] for i, v in gts.items()}
        res = {i: [_simple_tokens(c["caption"]) for c in v] for i, v in res.items()}
    result: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result.update({f"BLEU-{n + 1}": 100 * float(b) for n, b in enumerate(bleu)})
    if meteor and java:
        from pycocoevalcap.meteor.meteor import Meteor
        result["METEOR"] = 100 * float(Meteor().compute_score(gts, res)[0])
    result["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    result["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    if spice:
        try:
            from pycocoevalcap.spice.spice import Spice
            result["SPICE"] = 100 * float(Spice().compute_score(gts, res)[0])
        except Exception as exc:  # noqa: BLE001 - any failure (no models, no network) means "skip with a note"
            notes.append(f"SPICE skipped: {type(exc).__name__}: {str(exc)[:200]}")
    return {"metrics": result, "scored": len(ids), "regions": len(references),
            "coverage": len(ids) / len(references), "notes": notes}


def _simple_tokens(text: str) -> str:
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())


def tap_answerer(predictor: TapPredictor, annotations: Any, model_id: str, max_new_tokens: int | None = None,
                 **_: Any) -> RegionCaptioner:
    from .tap_answerers import RegionCaptioner  # torch and TAP: scoring captions stays torch-free
    return RegionCaptioner(predictor, max_new_tokens, model_id=model_id)


def load_annotations(path: str | Path) -> dict[str, list[str]]:
    """References by region id."""
    return load(path)[1]


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    if inputs.questions is None:
        raise FileNotFoundError("region captioning: pass --questions (COCO-style region JSON or a refer folder)")
    if inputs.questions.is_dir():
        return load_refer(inputs.questions, inputs.split or "val")
    return load(inputs.questions)


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    return score(predictions(rows), annotations, spice=options.spice)
