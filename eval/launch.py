"""`eval run` under `accelerate launch` / `torchrun` (RANK, WORLD_SIZE set): each rank answers a contiguous piece of
the questions not yet in the answers file into its own part file, written fresh for the run; then the ranks
all-gather a status over torch.distributed (gloo, finite timeout) and rank 0 appends this run's parts, in rank
order, to the answers file. No shared-filesystem markers: a part left by an earlier run is never merged, and a rank
that fails or hangs makes every rank exit non-zero naming it instead of the others waiting forever."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .answers import answered_ids
from .answers import merge as merge_files
from .questions import Question, shard

DEFAULT_TIMEOUT_S = 3600.0  # how long a rank waits for the others; pieces are even, so a finished rank waits little


@dataclass
class RankStatus:
    """What each rank reports once its piece is done (or failed): gathered by every rank."""

    rank: int
    answered: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # question id -> why it has no answer (images of this piece)
    error: str = ""  # why the rank failed; "" when it answered its whole piece
    fresh: bool = True  # its part was emptied by this run, so it holds only this run's answers (merged even if failed)

    @classmethod
    def failed(cls, launch: Launch, exc: BaseException) -> RankStatus:
        why = str(exc.code) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        return cls(launch.rank, error=why, fresh=launch.started)


@dataclass
class Launch:
    """One rank of a launched run; a context manager holding the gloo process group."""

    rank: int
    world: int
    final: Path  # the answers file every rank's part is merged into
    timeout_s: float = DEFAULT_TIMEOUT_S
    already: int = 0  # questions of the run already in `final` when it started
    started: bool = False  # this rank's part was emptied for this run

    @classmethod
    def from_env(cls, final: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> Launch | None:
        """The launched rank, or None for a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ["RANK"]), world, final, timeout_s) if world > 1 else None

    @property
    def part(self) -> Path:
        return self.part_of(self.rank)

    def part_of(self, rank: int) -> Path:
        return self.final.with_name(f"{self.final.stem}.shard-{rank}-of-{self.world}.jsonl")

    def __enter__(self) -> Launch:
        try:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world,
                                    timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:  # a rank that never started: the rendezvous store times out
            sys.exit(f"rank {self.rank} of {self.world}: the ranks did not all start within {self.timeout_s:g} s "
                     f"({exc})")
        return self

    def __exit__(self, *exc: object) -> None:
        dist.destroy_process_group()

    def piece(self, questions: Sequence[Question]) -> list[Question]:
        """This rank's contiguous piece of the questions not yet answered (so a resumed run stays balanced); its
        part file is emptied first, so only answers of this run can reach the merge."""
        done = answered_ids(self.final)
        self.already = sum(q.id in done for q in questions)
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.part.write_text("")
        self.started = True
        return shard([q for q in questions if q.id not in done], self.world, self.rank)

    def settle(self, status: RankStatus) -> list[RankStatus]:
        """Every rank's status, once rank 0 merged this run's parts (what a failed rank answered too, so a rerun
        resumes); exits non-zero on every rank when one failed, or did not report within the timeout (hung, died)."""
        statuses: list[Any] = [None] * self.world  # filled by the gather
        self.collective(dist.all_gather_object, statuses, status)
        merged = [self.merge([self.part_of(s.rank) for s in statuses if s.fresh]) if self.rank == 0 else ""]
        self.collective(dist.broadcast_object_list, merged, src=0)  # no rank leaves before the merge is done
        errors = [f"rank {s.rank} of {self.world} failed: {s.error}" for s in statuses if s.error]
        if merged[0]:
            errors.append(merged[0])
        if errors:
            sys.exit("; ".join(errors) + f"\nthe answers so far are in {self.final}; run the same command again to "
                     "answer the rest")
        return statuses

    def collective(self, op: Callable[..., object], *args: object, **kwargs: object) -> None:
        """A collective that gives up after the timeout with a plain message (a rank hung, or died without a word)."""
        try:
            op(*args, **kwargs)
        except RuntimeError as exc:
            sys.exit(f"rank {self.rank} of {self.world}: not every rank reported within {self.timeout_s:g} s; one "
                     f"hung or died ({str(exc).splitlines()[0]})")

    def merge(self, parts: list[Path]) -> str:
        """Rank 0: the answers file, then this run's parts in rank order, swapped in whole (never half-written);
        returns why that failed, or ""."""
        merging = self.final.with_name(self.final.name + ".merging")
        try:
            for part in parts:
                answered_ids(part)  # cuts a line torn by a failure off
            n = merge_files(([self.final] if self.final.exists() else []) + parts, merging)
            os.replace(merging, self.final)
            for part in parts:
                part.unlink()
        except (OSError, ValueError) as exc:  # ValueError: a line that is not JSON
            return f"rank 0 could not merge the answers into {self.final}: {exc}"
        print(f"{n} answers merged in order -> {self.final}", flush=True)  # before a failed rank's exit stops us
        return ""
