"""A demo-models training stage's run folder, which makes `--reuse` possible: `RUNS` gets a line per run of the
stage (when it started, its recipe, the checkpoint step it resumed from, the commit), and `FINISHED` is written when
the stage completes (its recipe, its runs as the bundle reports them, their seconds). Builds running elsewhere write
these files and later builds read them, so their formats stay as they are."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINISHED = "FINISHED.json"  # written into a stage's run folder when it completes (`--reuse`)
RUNS = "RUNS.jsonl"  # a line per run of a stage: when it started, from which checkpoint step, at which commit


def train_stage(name: str, folder: Path, recipe: dict, resume: bool, fit: Callable[[bool], object]) -> dict:
    """Run `fit(resume)` as a recorded run of the stage in `folder` (resuming only where `begin` allows), then write
    its `FINISHED` marker; returns the marker."""
    resume = begin(folder, recipe, resume)
    print(f"demo-models: {name} {'resumed' if resume else 'started'} ({folder})", flush=True)
    fit(resume)
    marker = {"recipe": recipe, "runs": ended(folder)}
    marker["seconds"] = round(sum(r["seconds"] for r in marker["runs"]), 1)
    (folder / FINISHED).write_text(json.dumps(marker, indent=1))
    print(f"demo-models: {name} done in {marker['runs'][-1]['seconds']:.0f} s", flush=True)
    return marker


def finished(marker: Path) -> dict | None:
    """A stage's `FINISHED` marker (recipe, seconds, runs), or None: not finished, or by an older build."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if "runs" in data else None


def commit() -> str:
    """The checkout's commit, `+changes` where tracked code differs from it (the bundle folder aside), or
    `unknown` outside a git checkout (an installed package)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)models")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def read_runs(folder: Path) -> list[dict]:
    """The stage's runs as `begin` recorded them, oldest first."""
    path = folder / RUNS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def newest_checkpoint(folder: Path) -> tuple[int, float] | None:
    """(step, when it was saved) of the stage's newest whole checkpoint (`finetune/loop.py` writes progress.json
    last)."""
    found = sorted((folder / "checkpoints").glob("step-*/progress.json"))
    if not found:
        return None
    return json.loads(found[-1].read_text())["step"], found[-1].stat().st_mtime


def begin(folder: Path, recipe: dict, resume: bool) -> bool:
    """Record a new run of the stage in `folder`; returns whether it resumes. It resumes (when allowed) from the
    newest checkpoint that an earlier run of the same recipe left; otherwise the folder is emptied first."""
    runs, newest = read_runs(folder), newest_checkpoint(folder)
    resume = resume and newest is not None and bool(runs) and runs[-1]["recipe"] == recipe
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    run = {"started": time.time(), "recipe": recipe, "commit": commit(), "from_step": newest[0] if resume else 0,
           "checkpoint_saved": newest[1] if resume else None}
    with (folder / RUNS).open("a") as f:
        f.write(json.dumps(run) + "\n")
    return resume


def ended(folder: Path) -> list[dict]:
    """The stage's runs as its marker keeps them. A stopped run counts until the checkpoint that the next run
    resumed from (its work after that was lost and done again); one that saved none before it stopped counts 0."""
    runs, rows = read_runs(folder), []
    for run, after in zip(runs, [*runs[1:], None]):
        if after is None:
            seconds, to_step = time.time() - run["started"], None
        elif after["checkpoint_saved"] > run["started"]:
            seconds, to_step = after["checkpoint_saved"] - run["started"], after["from_step"]
        else:
            seconds, to_step = 0.0, run["from_step"]
        rows.append({"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run["started"])), "commit": run["commit"],
                     "from_step": run["from_step"], "to_step": to_step, "seconds": round(seconds, 1),
                     "stopped": after is not None})
    return rows
