"""A re-entrant lock that serves waiters first come, first served.

The engine takes its lock once per decoded token. A plain lock lets the decoding thread take it straight back after
each release, so a click from another user could wait for the whole answer; with turns handed out in arrival order
the click waits for at most one decode step.
"""

from __future__ import annotations

import threading
from collections import deque


class FairRLock:
    """`with lock:` as `threading.RLock`, but a released lock goes to the longest waiting thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[int] = deque()

    def acquire(self) -> bool:
        """Wait until every thread that asked earlier has had its turn (the holder re-enters at once); always True."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            self._queue.append(me)
            while self._owner is not None or self._queue[0] != me:
                self._cond.wait()
            self._queue.popleft()
            self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        """Undo one `acquire`; the last one hands the lock to the longest waiter. Only the holder may release."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a FairRLock not held by this thread")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> FairRLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
