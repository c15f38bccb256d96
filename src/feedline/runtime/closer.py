"""Closing what the garbage collector finds on feedline's own threads, on a thread of its own.

A finalizer (``__del__``, ``weakref.finalize``) runs on whichever thread drops the last
reference or triggers a collection, at any point of that thread's code and with whatever
locks it holds. Closing a pass takes locks (the tuner's stop event, stages' conditions, a
pool's lock) and joins threads: on a thread that already holds one of them, it waits for
itself forever. (A tuner thread that collected its own pass did, in the test suite: the pass
and the next one found in that collection were left running.) So a finalizer on one of
feedline's threads only queues the work (``SimpleQueue.put`` is safe there, unlike any lock)
and this thread runs it; on the user's threads, which hold none of feedline's locks between
calls, it runs at once.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable

THREAD_PREFIX = "feedline-"  # every thread feedline starts is named so
THREAD_NAME = THREAD_PREFIX + "closer"

logger = logging.getLogger("feedline")

_pending: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()


def ensure_started() -> None:
    """Start the closer thread if it is not running. Called where a pass opens, never from a
    finalizer: starting a thread takes locks too."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name=THREAD_NAME, daemon=True)
            _thread.start()


def on_own_thread() -> bool:
    """Whether the calling thread is one of feedline's (a worker, the tuner, the closer)."""
    return threading.current_thread().name.startswith(THREAD_PREFIX)


def from_finalizer(work: Callable[[], object]) -> None:
    """Run ``work`` from a finalizer: at once on the user's threads (a dropped iterator's
    files and workers are gone when its loop is), queued on feedline's own."""
    if on_own_thread():
        defer(work)
    else:
        work()


def defer(work: Callable[[], object]) -> None:
    """Run ``work`` on the closer thread; safe to call from a finalizer. Inline when there is
    no closer to run it (interpreter shutdown, a forked child, before any pass opened)."""
    thread = _thread
    if thread is None or not thread.is_alive() or sys.is_finalizing():
        work()
        return
    _pending.put(work)


def drain(timeout: float) -> bool:
    """Wait until the work queued before this call has run; False if ``timeout`` passed."""
    ensure_started()
    done = threading.Event()
    _pending.put(done.set)
    return done.wait(timeout)


def _run() -> None:
    while True:
        work = _pending.get()
        try:
            work()
        except Exception:  # one failed close must not stop the others
            logger.exception("closing a dropped feedline iterator failed")
        del work  # its references go now, not when the next work arrives
