"""Image-prefix warm-up: a new image's prompt start is computed while the user is still clicking or typing.

In tapchat mode every first question about an image starts with the same positions: the system text, `USER: ` and
the image's 1024 projected tokens (1056 of a short question's ~1077 positions, whose prefill takes about 18 s for
Phi-2 on 2 CPU cores). Grounding lines and the question come after the image (`template.render`), so that start is
shared whatever is then asked.
`Warmup` computes it in a background thread when the image is set, `CHUNK` positions per forward, taking the engine
lock per chunk: a click (segment) or another chat's decode step waits for one chunk, never for the whole prefill.
The result becomes the conversation's `PrefixCache` entry, which the question extends through `decoding.resume`
like any follow-up: it prefills only its own tokens, and its answer is the one computed without warm-up.

A question that arrives mid-warm-up waits for it (`wait`) rather than starting over. An entry is stored only while
it is still wanted: the image is still the conversation's, the conversation was not forgotten (`forget`), and an
entry that already holds the start (a turn answered on this image) is never replaced; `keep` applies the same rule
to an answer that ends after its image was replaced. Errors are logged; the question then computes as usual.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .decoding import CachedPrefix, PrefixCache, sequence_items
from .kvcache import new_cache
from .model import IMAGE_TOKEN, ChatModel
from .template import Turn, render

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("tapchat")
CHUNK = 128  # positions per forward: a click waits for at most one chunk (about 2 s for Phi-2 on 2 cores)


@dataclass(eq=False)
class _Job:
    """One conversation's warm-up of one image."""

    session: Session
    key: str  # the image's content key
    items: list[Hashable]  # the start it computes (`Warmup.start_items`)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)  # stored, skipped or failed
    thread: threading.Thread | None = None


_RUNNING: set[_Job] = set()  # every warm-up thread not yet finished, of every `Warmup`
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Stop warm-ups at exit, each after its current chunk: a daemon thread still inside torch when the interpreter
    finalises aborts the process ("terminate called without an active exception")."""
    with _RUNNING_LOCK:
        jobs = list(_RUNNING)
    for job in jobs:
        job.cancelled.set()
    for job in jobs:
        if job.thread.is_alive():  # one not started yet stops at its first chunk
            job.thread.join()


class Warmup:
    """Background prefills of image prompt starts, at most one per conversation (a newer image replaces it).

    `visual(key)` gives an image's projected tokens and is called with `lock` held (the engine's model lock).
    """

    def __init__(self, chat: ChatModel, lock: Any, kv: PrefixCache, visual: Callable[[str], torch.Tensor]) -> None:
        self.chat, self.lock, self.kv, self.visual = chat, lock, kv, visual
        self._jobs: dict[str, _Job] = {}
        self._mutex = threading.Lock()  # guards `_jobs` and every read-and-replace of a conversation's entry
        self._ids: list[int] | None = None

    def prefix_ids(self) -> list[int]:
        """The token ids every first question about an image starts with, up to and including the image
        placeholder: the first turn as `render` writes it, cut after `<image>` (the prompt's chunks around the
        placeholder are tokenized apart, so what follows cannot change these ids)."""
        if self._ids is None:
            ids = self.chat.tokenize(render([Turn("")]))
            self._ids = ids[:ids.index(IMAGE_TOKEN) + 1]
        return list(self._ids)

    def start_items(self, key: str) -> list[Hashable]:
        """The prompt start of image `key` as `CachedPrefix.items` (what an entry must hold to serve its question)."""
        return sequence_items(self.prefix_ids(), key, self.chat.num_visual_tokens)

    def start(self, session: Session) -> None:
        """Warm the session's current image in a background thread, replacing a warm-up of an earlier image (the
        prompt start is tokenized here, in the caller's thread, as every prompt is)."""
        key = session.image_key
        if key is None:
            return
        job = _Job(session, key, self.start_items(key))
        with self._mutex:
            old = self._jobs.get(session.id)
            if old is not None and old.key == key:
                return  # already under way
            if old is not None:
                old.cancelled.set()
            self._jobs[session.id] = job
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"warmup-{session.id[:8]}", daemon=True)
        with _RUNNING_LOCK:
            _RUNNING.add(job)
        job.thread.start()

    def wait(self, session: Session) -> None:
        """Block until the warm-up of the session's current image is stored or given up (a question then extends
        it); one of another image is cancelled. Call it without the engine lock: the warm-up takes it per chunk."""
        with self._mutex:
            job = self._jobs.get(session.id)
            if job is not None and job.key != session.image_key:
                job.cancelled.set()
                return
        if job is not None:
            job.done.wait()

    def forget(self, conv_id: str) -> None:
        """Stop a deleted conversation's warm-up and drop its entry: once this returns, nothing of it is stored."""
        with self._mutex:
            job = self._jobs.pop(conv_id, None)
            if job is not None:
                job.cancelled.set()
            self.kv.drop(conv_id)

    def drop(self, conv_id: str) -> None:
        """Drop a conversation's entry (after an undo or a failed turn), in step with warm-ups that replace it."""
        with self._mutex:
            self.kv.drop(conv_id)

    def keep(self, session: Session, prefix: CachedPrefix) -> None:
        """Store an answer's KV prefix as the conversation's entry, unless the entry there holds the current image's
        start and the answer's does not (the image was replaced while it was written: the warm entry serves the
        next question, the answer's would not)."""
        with self._mutex:
            if session.image_key is not None:
                start = self.start_items(session.image_key)
                held = self.kv.take(session.id)
                if _holds(held, start) and not _holds(prefix, start):
                    prefix = held
            self.kv.put(session.id, prefix)

    # ------------------------------------------------------------------------------------------- internals
    def _run(self, job: _Job) -> None:
        """The thread: compute and store the start; never raises (a failed warm-up only costs the question time)."""
        try:
            if not self._served(job):
                prefix = self._compute(job)
                if prefix is not None:
                    self._store(job, prefix)
        except Exception:
            log.exception("warming the image prefix failed; the question will compute it")
        finally:
            with self._mutex:
                if self._jobs.get(job.session.id) is job:
                    del self._jobs[job.session.id]
            with _RUNNING_LOCK:
                _RUNNING.discard(job)
            job.done.set()

    def _served(self, job: _Job) -> bool:
        """Whether the conversation's entry already holds the start (the same image set again after a turn)."""
        with self._mutex:
            held = self.kv.take(job.session.id)
            if held.items:
                self.kv.put(job.session.id, held)
            return _holds(held, job.items)

    def _compute(self, job: _Job) -> CachedPrefix | None:
        """The start's KV cache, chunk by chunk with the lock taken per chunk; None once cancelled."""
        chat, ids = self.chat, self.prefix_ids()
        with self.lock, torch.inference_mode():
            if job.cancelled.is_set():
                return None
            embeds = chat.embed_sequence(ids, self.visual(job.key))[None]
        cache, length = new_cache(), embeds.shape[1]
        for begin in range(0, length, CHUNK):
            end = min(begin + CHUNK, length)
            mask = torch.ones(1, end, dtype=torch.long, device=chat.device)
            positions = torch.arange(begin, end, device=chat.device)[None]
            with self.lock, torch.inference_mode():
                if job.cancelled.is_set():
                    return None
                chat.forward_embeds(embeds[:, begin:end], mask, positions, cache)
        return CachedPrefix(cache, list(job.items))

    def _store(self, job: _Job, prefix: CachedPrefix) -> None:
        """Make `prefix` the conversation's entry if the job is still wanted and no entry holds the start already."""
        session = job.session
        with self._mutex:
            if job.cancelled.is_set() or self._jobs.get(session.id) is not job or session.image_key != job.key:
                return
            held = self.kv.take(session.id)
            self.kv.put(session.id, held if _holds(held, prefix.items) else prefix)


def _holds(entry: CachedPrefix, start: list[Hashable]) -> bool:
    """Whether `entry` begins with every position of `start`."""
    return len(entry.items) >= len(start) and entry.common_prefix(start) == len(start)
