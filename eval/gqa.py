"""GQA scoring as the official `eval.py` reports it: exact match of the GQA-normalised prediction with `answer` over
balanced questions, with the binary/open split and breakdowns by structural type, semantic type, reasoning steps and
question length; and, where their inputs are given, validity and plausibility (the choices file, `--choices`),
consistency (the questions' `entailed` ids) and distribution (predicted against gold answer counts per group)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .lmms import SHORT, Loaded, read_rows, write_image
from .normalize import normalize_exact_match, normalize_gqa
from .questions import Question, load_bunny, read_json_or_tar
from .spec import RunInputs, ScoreOptions, predictions

BINARY = {"verify", "logical", "choose", "compare"}
COMMON = ["color", "material", "shape"]  # what "... have in common?" questions take, whatever the choices file says
NOT_STEPS = ("exist", "query: name", "choose name")  # operations the official step count leaves out
LMMS = ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev")
GQA_IMAGES = "testdev_balanced_images"  # the lmms-lab config holding the images
TAP_ONLY, CHOICES, IMAGES_REQUIRED = False, "", False
submission = None
Choices = Mapping[str, Mapping[str, list[str]]]


def load_annotations(path: str | Path) -> dict[str, dict[str, Any]]:
    """The official `testdev_balanced_questions.json` (or the .tar.gz holding it)."""
    return json.loads(read_json_or_tar(path, "questions.json"))


def load_choices(path: str | Path) -> Choices:
    """The official `{split}_choices.json` (or a .tar.gz holding it): per question id, the answers that are `valid`
    for its kind of question and those `plausible` for its objects across the scene graphs."""
    choices = json.loads(read_json_or_tar(path, "choices.json"))
    if not isinstance(choices, dict) or not all(isinstance(c, dict) and isinstance(c.get("valid"), list) and
                                                isinstance(c.get("plausible"), list) for c in choices.values()):
        raise ValueError(f'{path}: not a GQA choices file (question id -> {{"valid": [...], "plausible": [...]}})')
    return choices


def score(predictions: dict[str, str], annotations: dict[str, dict[str, Any]], *, partial: bool = False,
          lenient: bool = False, choices: Choices | None = None) -> dict[str, Any]:
    """Accuracy and breakdowns, and the official `measures` whose inputs are there. Like the official script every
    balanced question needs a prediction, unless `partial` (a --limit run), which scores the answered ones and
    reports the coverage. `lenient` is lmms-eval's exact_match (punctuation anywhere ignored) instead of the
    official rule."""
    balanced = {q: a for q, a in annotations.items() if a.get("isBalanced", True)}
    missing = [q for q in balanced if q not in predictions]
    if missing and not partial:
        raise ValueError(f"{len(missing)} of {len(balanced)} balanced questions have no prediction "
                         f"(first: {missing[0]}); score a --limit run with partial=True")
    said, gold = (normalize_exact_match, normalize_exact_match) if lenient else (normalize_gqa, str)
    answered = {q: said(p) for q, p in predictions.items()}
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    hits: dict[str, bool] = {}
    for qid, ann in balanced.items():
        if qid not in answered:
            continue
        ok = hits[qid] = answered[qid] == gold(ann["answer"])
        types = ann.get("types", {})
        structural = types.get("structural", "unknown")
        groups["binary/open"]["binary" if structural in BINARY else "open"].append(ok)
        groups["structural"][structural].append(ok)
        groups["semantic"][types.get("semantic", "unknown")].append(ok)
        groups["steps"][str(steps(ann))].append(ok)
        groups["length"][str(len(ann["question"].split()))].append(ok)
    return {"accuracy": _mean(list(hits.values())), "scored": len(hits), "balanced": len(balanced),
            "coverage": len(hits) / max(1, len(balanced)),
            "breakdowns": {g: {k: {"accuracy": _mean(v), "n": len(v)} for k, v in sorted(d.items(), key=_order)}
                           for g, d in groups.items()},
            **measures(answered, hits, annotations, gold, choices)}


def steps(ann: dict[str, Any]) -> int:
    """Reasoning steps as the official script counts them: the program's operations, less existence checks and
    name queries, which do not lengthen the reasoning."""
    return sum(not any(o in f"{op.get('operation', '')}: {op.get('argument', '')}" for o in NOT_STEPS)
               for op in ann.get("semantic", []))


def measures(answered: dict[str, str], hits: dict[str, bool], annotations: dict[str, dict[str, Any]],
             gold: Callable[[str], str], choices: Choices | None) -> dict[str, Any]:
    """The official measures over the scored balanced questions (`hits`: id -> correct), each where its input is
    given: validity and plausibility (is the answer among the question's valid / plausible ones), consistency
    (accuracy on the questions a correctly answered one entails, averaged over those questions) and distribution
    (`distribution`). Rates are fractions like `accuracy`; a note says when an input was incomplete."""
    out: dict[str, dict[str, Any]] = {}
    notes = []
    if choices is not None:
        lacking = [q for q in hits if q not in choices]
        if lacking:
            raise ValueError(f"the choices file has no entry for {len(lacking)} of {len(hits)} scored questions "
                             f"(first: {lacking[0]}): is it the same split as the annotations?")
        for name, kind in (("validity", "valid"), ("plausibility", "plausible")):
            ok = [answered[q] in {gold(a) for a in accepted(annotations[q], choices[q][kind])} for q in hits]
            out[name] = {"value": _mean(ok), "n": len(ok)}
    if any(annotations[q].get("entailed") for q in hits):
        per_question, asked, known = [], 0, 0
        for q, ok in hits.items():
            entailed = [e for e in annotations[q].get("entailed") or [] if e != q]
            if not ok or not entailed:
                continue
            there = [e for e in entailed if e in annotations and e in answered]
            asked, known = asked + len(entailed), known + len(there)
            if there:
                per_question.append(_mean([answered[e] == gold(annotations[e]["answer"]) for e in there]))
        out["consistency"] = {"value": _mean(per_question), "n": len(per_question)}
        if known < asked:
            notes.append(f"consistency over {known} of the {asked} questions entailed by correct answers: the others "
                         "are not in the annotations or not answered (the official number answers every question of "
                         "the split's all_questions file)")
    histograms: dict[str, tuple[Counter[str], Counter[str]]] = defaultdict(lambda: (Counter(), Counter()))
    for q in hits:
        group = (annotations[q].get("groups") or {}).get("global")
        if group is not None:
            histograms[group][0][gold(annotations[q]["answer"])] += 1
            histograms[group][1][answered[q]] += 1
    if histograms:
        n = sum(sum(gold_counts.values()) for gold_counts, _ in histograms.values())
        out["distribution"] = {"value": distribution(histograms), "n": n, "lower_is_better": True}
    report: dict[str, Any] = {"measures": out} if out else {}
    if notes:
        report["notes"] = notes
    return report


def accepted(ann: dict[str, Any], listed: list[str]) -> list[str]:
    """The valid (or plausible) answers of a question: the choices file's, but the three properties for "what do
    they have in common?" questions, as the official script has it."""
    return COMMON if "Common" in ann.get("types", {}).get("detailed", "") else listed


def distribution(histograms: Mapping[str, tuple[Counter[str], Counter[str]]]) -> float:
    """The official distribution score: per global question group, the chi-square statistic of the predicted answer
    counts against the gold ones, sum over the group's gold answers of (predicted - gold)^2 / gold; the groups'
    mean weighted by their sizes, over 100. An answer no question of the group has adds nothing, as there."""
    weighted = total = 0.0
    for gold, predicted in histograms.values():
        n = sum(gold.values())
        weighted += n * sum((predicted[a] - e) ** 2 / e for a, e in gold.items())
        total += n
    return weighted / total / 100


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _order(item: tuple[str, Any]) -> tuple[int, Any]:
    key = item[0]
    return (0, int(key)) if key.isdigit() else (1, key)


def load_run(inputs: RunInputs) -> tuple[list[Question], Any, dict[str, str]]:
    return load_bunny(inputs, load_annotations)


def report(rows: list[dict[str, Any]], annotations: Any, options: ScoreOptions) -> dict[str, Any]:
    return {**score(predictions(rows), annotations, partial=options.partial, lenient=options.lenient,
                    choices=options.choices),
            "rule": "lmms-eval exact_match" if options.lenient else "official"}


def from_lmms(rows: list[dict], image_dir: Path, source: str | Path, inputs: RunInputs) -> Loaded:
    """Questions from the instructions config, images from the images config (written once)."""
    wanted = {r["imageId"] for r in rows}
    written = {}
    for r in read_rows(source, GQA_IMAGES, "testdev"):
        if r["id"] in wanted:
            written[r["id"]] = write_image(image_dir, f"{r['id']}.jpg", r["image"])
    questions, annotations, bad = [], {}, {}
    for r in rows:
        qid = str(r["id"])
        annotations[qid] = {k: r.get(k) for k in ("answer", "question", "types", "semantic", "isBalanced", "groups",
                                                  "entailed")}
        annotations[qid]["semantic"] = annotations[qid]["semantic"] or []
        annotations[qid]["types"] = annotations[qid]["types"] or {}
        if written.get(r["imageId"]) is None:
            bad[qid] = f"image {r['imageId']} not in {GQA_IMAGES}"
            continue
        questions.append(Question(qid, written[r["imageId"]], r["question"] + SHORT, "default", r["id"]))
    return Loaded(questions, annotations, bad)
