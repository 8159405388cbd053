"""The demo bundle's README, written from its metrics.json alone (so `--verify` can tell a hand-edited one): every
measured number beside its target and its blind figure, and how each stage was really built (runs, resumes,
commits)."""

from __future__ import annotations

from finetune.demo_eval import ASKED_KINDS, CONCEPTS_NOTE, FIND_TARGETS, IN_PROMPT_KINDS, TARGETS, TOLERANCE


def cell(text: str) -> str:
    """Model output as one Markdown table cell (an untrained model writes anything, pipes and newlines included)."""
    return " ".join(text.replace("|", "\\|").split())


def kinds_line(m: dict) -> str:
    kinds = [k for k in m["answers_by_kind"] if k != "overall"]
    return ", ".join(f"{k} {m['answers_by_kind'][k]:.3f} (blind {m['answers_blind_by_kind'].get(k, 0.0):.3f}"
                     f"{', answer in the prompt' if k in IN_PROMPT_KINDS else ''})" for k in kinds)


def find_section(m: dict) -> list[str]:
    """With and without find grounding, seeing and blind, per kind of question; then `find` itself. Empty for a
    model not trained on find-grounded turns."""
    if "answers_find_by_kind" not in m:
        return []
    plain, plain_blind = m["answers_by_kind"], m["answers_blind_by_kind"]
    found, found_blind = m["answers_find_by_kind"], m["answers_find_blind_by_kind"]
    kinds = [k for k in plain if k != "overall" and k not in IN_PROMPT_KINDS] + ["overall"]
    rows = [f"| {k} | {plain[k]:.3f} | {plain_blind.get(k, 0.0):.3f} | {found.get(k, 0.0):.3f} | "
            f"{found_blind.get(k, 0.0):.3f} | {'>= ' + str(FIND_TARGETS[k]) if k in FIND_TARGETS else ''} |"
            for k in kinds]
    finds = [("exact count per scene and concept", "find_exact_count"), ("instance recall", "find_recall"),
             ("instance precision", "find_precision")]
    return [
        "## With find grounding",
        "",
        "A question that names concepts is answered with every instance TAP's `find` sees in the image: each "
        "instance's region line with its position word, and the count per concept (`found: 2 × car`). Without: the "
        "question alone, as benchmarks ask it. Blind: black images (where `find` finds nothing).",
        "",
        "| kind | without find | blind | with find | blind | target (with find) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"`find` itself, over {m['find_pairs']} held-out scene and object-concept pairs (each scene's object "
        f"concepts and one it lacks; {m['find_instances']} instances, matched one to one at mask IoU 0.5):",
        "",
        "| metric | measured | target |",
        "|---|---|---|",
        *[f"| {name} | {m[key]:.3f} | >= {FIND_TARGETS[key]} |" for name, key in finds],
        "",
    ]


def run_text(run: dict) -> str:
    end = "the end" if run["to_step"] is None else f"step {run['to_step']}"
    how = (f"resumed from its step-{run['from_step']} checkpoint" if run["from_step"] else "from scratch")
    return f"{how} to {end} in {run['seconds']:.0f} s at commit {run['commit']}{' (stopped)' if run['stopped'] else ''}"


def provenance(m: dict) -> list[str]:
    """One line per training stage: its config digest and each run it took (a stopped run resumed exactly from its
    last checkpoint: `finetune/loop.py` restores weights, optimizer, schedule, RNG and data position)."""
    lines = []
    for stage, marker in m["stages"].items():
        runs = marker["runs"]
        said = "; ".join(run_text(r) for r in runs)
        lines.append(f"- `{stage}` (config sha256 {marker['recipe']['config']}): "
                     f"{len(runs)} run{'s' if len(runs) > 1 else ''}, {said}.")
    return lines


def readme(m: dict) -> str:
    """The bundle's README: what it is, how it was made, and every measured number beside its target."""
    r = m["recipe"]
    answers = ", ".join(ASKED_KINDS)
    prompt_kinds = ", ".join(IN_PROMPT_KINDS)
    overall, blind_overall = m["answers_by_kind"]["overall"], m["answers_blind_by_kind"]["overall"]
    in_prompt = sum(m["answers_by_kind"].get(k, 0.0) for k in IN_PROMPT_KINDS) / len(IN_PROMPT_KINDS)
    in_prompt_blind = sum(m["answers_blind_by_kind"].get(k, 0.0) for k in IN_PROMPT_KINDS) / len(IN_PROMPT_KINDS)
    rows = [("point-click mIoU", m["point_miou"], None, TARGETS["point_miou"]),
            ("point-click mIoU, the best of TAP's point masks (oracle)", m["point_miou_oracle"], None, None),
            ("the true masks through the decoder's output grid (ceiling)", m["grid_ceiling"], None, None),
            ("box-prompt mIoU", m["box_miou"], None, None),
            (f"concept top-1 ({CONCEPTS_NOTE})", m["concept_top1"], None, TARGETS["concept_top1"]),
            ("captions naming object and colour", m["caption_named"], None, TARGETS["caption_named"]),
            (f"short answers, exact match ({answers})", m["answers"], m["answers_blind"], TARGETS["answers"]),
            (f"{prompt_kinds} questions (the answer is written in the prompt's region line)", in_prompt,
             in_prompt_blind, None),
            ("short answers, exact match (all kinds)", overall, blind_overall, None)]
    missed = [name for name, value, _, target in rows if target is not None and value < target]
    lines = [
        "# Demo models: TAP + a small chat model trained on synthetic scenes",
        "",
        "Trained by this project's own pipelines (`make demo-models`, finetune/demo.py) on the synthetic scene world "
        "(`python -m finetune tap-world`): made for scenes like the examples, **not on photos**; on those, the scores "
        "below (its region names are good, its answers often wrong). For real images use TAP-L + Phi-2 (README, "
        "\"Models\").",
        "",
        f"World: {r['train_images']} training and {r['eval_images']} held-out scenes at {r['size']} px, seed "
        f"{r['seed']}{' (smoke size: the models learned nothing)' if r['quick'] else ''}. Bundle: "
        f"{m['bundle_mb']:.1f} MB.",
        "",
        "## Held-out scores",
        "",
        "Blind: the same chat model shown black images. `python -m finetune demo-models --verify models/demo` "
        f"re-measures every figure from the bundle's files (agreement within {TOLERANCE}) and checks the files and "
        "this README against metrics.json.",
        "",
        "| metric | measured | blind | target |",
        "|---|---|---|---|",
        *[f"| {name} | {value:.3f} | {'' if blind is None else f'{blind:.3f}'} | "
          f"{'' if target is None else f'>= {target}'} |" for name, value, blind, target in rows],
        "",
        *([f"Below target: {', '.join(missed)}; BENCHMARKS.md (\"demo models\") says what was tried and what "
           "would reach them.", ""] if missed else []),
        f"Short answers by kind (exact match; {sum(m['questions_by_kind'].values())} questions): {kinds_line(m)}.",
        "Point-click mIoU by region kind: " + ", ".join(f"{k} {v:.3f}" for k, v in m["point_miou_by_kind"].items())
        + ". The ceiling is what masks right about every cell of the decoder's low-res output grid (a quarter of a "
        "patch) would score.",
        f"Concepts: {m['labelled']} labelled regions, majority-class top-1 {m['majority']:.3f}; the concept head "
        f"learned from {CONCEPTS_NOTE} distillation.",
        "",
        *find_section(m),
        "## The gallery, as the app answers it",
        "",
        "Held-out scenes (`gallery/`, the app's first examples): a click on the object (a box where it is made of "
        "parts), then \"What colour is <region1>?\", answered greedily by these models.",
        "",
        "| scene | object (colour) | chip | TAP's caption | answer | right |",
        "|---|---|---|---|---|---|",
        *[f"| {g['image']} | {g['concept']} ({g['colour']}) | {cell(g['chip'])} | {cell(g['caption'])} | "
          f"{cell(g['answer'])} | {'yes' if g['named'] and g['right'] else 'no'} |" for g in m.get("gallery", [])],
        "",
        "## How it was built",
        "",
        f"`{m['built']['command']}`, packed at commit {m['built']['commit']}. "
        f"{sum(m['seconds'].values()) / 60:.1f} min of stage time on {m['cores']} CPU cores "
        f"({m['torch_threads']} torch threads): " + ", ".join(f"{k} {v:.0f} s" for k, v in m["seconds"].items())
        + ". Each training stage's runs (a stopped run is resumed by the same command with `--reuse`):",
        "",
        *provenance(m),
        "",
    ]
    return "\n".join(lines)
