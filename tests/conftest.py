"""Shared fixtures: every test checks that feedline left no thread running."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

THREAD_PREFIX = "feedline-"


def feedline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fails the test if a feedline thread is still alive shortly after it ends.

    Iterators dropped without close() are collected by the garbage collector, so give it a
    moment (and a collection) before calling it a leak.
    """
    yield
    import gc

    deadline = time.monotonic() + 3.0
    while feedline_threads() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.02)
    leaked = feedline_threads()
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
