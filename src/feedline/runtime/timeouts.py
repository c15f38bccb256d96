"""A map's time limit per call (``timeout=``): each call that takes longer fails its element.

In a worker process the call is stopped: an interval timer raises ``CallTimeout`` inside it
(Python code and sleeps end there; native code that never returns to the interpreter is
ended by the parent, which kills the worker). On a thread nothing can stop a call: it runs to
its end, then fails its element all the same, so the output does not depend on where the
stage ran, and a warning says the thread was held that long.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("feedline")

_STOPS_CALLS = False  # set in worker processes, whose main thread runs the calls


class CallTimeout(TimeoutError):
    """A call of a map's function went past the map's ``timeout``."""


def _raise_timeout(signum: int, frame: Any) -> None:
    raise CallTimeout("interrupted")


def stop_calls_in_this_process() -> None:
    """This process runs calls on its main thread and owns SIGALRM (a worker process)."""
    global _STOPS_CALLS
    _STOPS_CALLS = True
    signal.signal(signal.SIGALRM, _raise_timeout)


def call_within(seconds: float, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, failing with ``CallTimeout`` if it takes more than ``seconds``."""
    if _STOPS_CALLS and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return call(*args)
        except CallTimeout:
            raise CallTimeout(f"the call took longer than timeout={seconds:g} s") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    started = time.perf_counter()
    result = call(*args)
    took = time.perf_counter() - started
    if took > seconds:
        logger.warning(
            "a call took %.3g s, over timeout=%g s: a thread cannot stop it, only fail its "
            "element afterwards (executor='process' stops such calls)",
            took,
            seconds,
        )
        raise CallTimeout(f"the call took {took:.3g} s, longer than timeout={seconds:g} s")
    return result
