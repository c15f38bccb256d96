"""Iterators the garbage collector finds on feedline's own threads are closed on the closer
thread, never on the thread that happened to collect them: that thread may hold a lock the
close needs. Dropped by the user's code, they close at once."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import feedline as fl
from feedline.pipeline import DatasetIterator
from feedline.runtime import closer

pytestmark = pytest.mark.timeout(60)


def test_work_deferred_while_holding_the_lock_it_needs_runs_once_the_lock_is_free() -> None:
    lock = threading.Lock()
    ran_on: list[str] = []

    def close_something() -> None:
        with lock:
            ran_on.append(threading.current_thread().name)

    with lock:  # a finalizer running here, inline, would wait for itself forever
        closer.defer(close_something)
        assert ran_on == []
    assert closer.drain(10.0)
    assert ran_on == [closer.THREAD_NAME]


def test_work_that_fails_does_not_stop_the_closer(caplog: pytest.LogCaptureFixture) -> None:
    def fails() -> None:
        raise RuntimeError("a close that failed")

    ran = threading.Event()
    closer.defer(fails)
    closer.defer(ran.set)
    assert closer.drain(10.0)
    assert ran.is_set()
    assert "a close that failed" in caplog.text


@pytest.fixture
def closed_on(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[str]]:
    """The names of the threads the iterator of a given ``id`` was closed on, in turn. Kept
    per iterator: a collection also finds the passes earlier tests left in cycles, and closes
    them too. (An id stays unique while its iterator lives, and a close comes before that
    ends.)"""
    threads: list[tuple[int, str]] = []
    close = DatasetIterator.close

    def recording_close(self: DatasetIterator) -> None:
        threads.append((id(self), threading.current_thread().name))
        close(self)

    monkeypatch.setattr(DatasetIterator, "close", recording_close)
    return lambda iterator_id: [name for key, name in threads if key == iterator_id]


@pytest.mark.parametrize("autotune", [True, False])
def test_a_dropped_iterator_is_closed_on_the_closer_thread(
    closed_on: Callable[[int], list[str]], autotune: bool
) -> None:
    calls: Any = fl.AUTOTUNE if autotune else 2
    ds = fl.Dataset.range(10**6).map(lambda x: x + 1, num_parallel_calls=calls).prefetch(calls)
    it = ds.iterator()
    cycle = [it]
    cycle.append(cycle)  # kept alive by a cycle: found by the collector, not by refcounts
    assert [int(next(it)) for _ in range(5)] == [1, 2, 3, 4, 5]
    it_id = id(it)  # (not the iterator itself: holding it would keep it alive)
    closes_before = len(closed_on(it_id))  # (opening a pass closes the one before, if any)
    del it, cycle

    def collect_elsewhere() -> None:
        gc.collect()

    # Collected on one of feedline's threads, as a tuner's or a worker's collection would.
    collector = threading.Thread(target=collect_elsewhere, name="feedline-test-collector")
    collector.start()
    collector.join(10.0)
    assert closer.drain(10.0)
    assert closed_on(it_id)[closes_before:] == [closer.THREAD_NAME]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(
        t.name.startswith("feedline-map") for t in threading.enumerate()
    ):
        time.sleep(0.02)
    assert not any(t.name.startswith("feedline-map") for t in threading.enumerate())


def test_an_iterator_dropped_by_the_users_code_closes_at_once(
    closed_on: Callable[[int], list[str]],
) -> None:
    it = fl.Dataset.range(10).map(lambda x: x, num_parallel_calls=2).iterator()
    next(it)
    it_id = id(it)  # (not the iterator itself: holding it would keep it alive)
    closes_before = len(closed_on(it_id))  # (opening a pass closes the one before, if any)
    del it
    assert closed_on(it_id)[closes_before:] == [threading.current_thread().name]


def test_an_iterator_closed_by_hand_closes_at_once_on_the_callers_thread(
    closed_on: Callable[[int], list[str]],
) -> None:
    with fl.Dataset.range(10).map(lambda x: x, num_parallel_calls=2).iterator() as it:
        next(it)
        closes_before = len(closed_on(id(it)))  # (opening a pass closes the one before)
    assert closed_on(id(it))[closes_before:] == [threading.current_thread().name]
    assert not any(t.name.startswith("feedline-map") for t in threading.enumerate())
