"""Shared fixtures: every test checks that feedline left no thread running."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Iterator

import pytest

from feedline.runtime import closer

THREAD_PREFIX = closer.THREAD_PREFIX
# Running from the start: tests comparing the threads before and after see it in both.
closer.ensure_started()


def feedline_threads() -> list[threading.Thread]:
    """feedline's threads but the closer, which runs for the whole process (it closes what
    the garbage collector finds: see runtime/closer.py)."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(THREAD_PREFIX) and t.name != closer.THREAD_NAME
    ]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fails the test if a feedline thread is still alive shortly after it ends.

    Iterators dropped without close() are collected by the garbage collector, so give it a
    moment (and a collection) before calling it a leak. Only threads this test started count:
    one test's leak fails that test, not every test after it.
    """
    before = set(feedline_threads())
    yield
    import gc

    def started_here() -> list[threading.Thread]:
        return [t for t in feedline_threads() if t not in before]

    deadline = time.monotonic() + 3.0
    # (Only then: a collection with TensorFlow and torch loaded takes ~0.25 s, for every test.)
    while started_here() and time.monotonic() < deadline:
        gc.collect()
        # What a collection on feedline's threads found is closed on the closer thread.
        closer.drain(max(0.0, deadline - time.monotonic()))
        time.sleep(0.02)
    leaked = started_here()
    assert not leaked, f"threads left running:\n{describe(leaked)}"


def describe(threads: list[threading.Thread]) -> str:
    """Each thread's name and where it is stuck, to make a leak diagnosable from CI logs."""
    frames = sys._current_frames()
    parts = []
    for t in threads[:4]:
        frame = frames.get(t.ident or -1)
        stack = "".join(traceback.format_stack(frame)[-4:]) if frame else "(no frame)\n"
        parts.append(f"{t.name}:\n{stack}")
    if len(threads) > 4:
        parts.append(f"... and {len(threads) - 4} more: {[t.name for t in threads[4:]]}")
    return "".join(parts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault-injection suite's figures: how much it compared, restored and killed."""
    from tests.reliability.figures import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
