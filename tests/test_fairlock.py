"""The engine's lock: re-entrant, released only by its owner, handed to waiters in arrival order."""

from __future__ import annotations

import threading
import time

import pytest

from assistant.fairlock import FairRLock


def test_reentrant_and_owned() -> None:
    lock = FairRLock()
    with lock, lock:  # the same thread may take it again
        pass
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


def test_a_waiter_gets_the_lock_before_its_holder_takes_it_back() -> None:
    """The starvation a plain lock allows: a loop that releases and re-takes it at once (a decode loop) must still
    let a thread that was waiting go first."""
    lock, order, stop = FairRLock(), [], threading.Event()

    def decoder() -> None:
        while not stop.is_set():
            with lock:
                order.append("step")
                time.sleep(0.02)

    worker = threading.Thread(target=decoder)
    worker.start()
    time.sleep(0.05)
    asked = order.count("step")
    with lock:  # queued behind the current step only
        waited = order.count("step") - asked
    stop.set()
    worker.join()
    assert waited <= 2, f"the waiter watched {waited} steps go first"
