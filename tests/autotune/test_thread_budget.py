"""One budget of worker threads per pass, shared by its stages; budgets that cannot be kept
are said. Pipelines here are checked for the threads they ran and the elements they made,
never for how fast they ran."""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.autotune import windows as windows_module
from feedline.runtime.machine import default_thread_budget
from feedline.runtime.tunable import Knob, ThreadBudget, Tunable
from tests.autotune.helpers import (
    SyntheticStage,
    consume_until,
    read_ahead_history,
    synthetic_tuner,
    with_autotune,
)
from tests.conftest import feedline_threads
from tests.helpers import take

D = fl.Dataset
WORKER = re.compile(r"-\d+$")  # a stage's worker: feedline-<stage>-<index>


def sleepy(x: Any) -> Any:
    time.sleep(0.002)
    return x


class PeakThreads:
    """The most feedline threads, and of them stage workers, alive at once while running."""

    def __init__(self) -> None:
        self.total = 0
        self.workers = 0
        self._stop = threading.Event()
        # Not a feedline thread: it must not count itself.
        self._thread = threading.Thread(target=self._run, name="test-peak-threads", daemon=True)

    def sample(self) -> None:
        names = [t.name for t in feedline_threads()]
        self.total = max(self.total, len(names))
        self.workers = max(self.workers, sum(1 for n in names if WORKER.search(n)))

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.sample()


@contextmanager
def peak_threads() -> Iterator[PeakThreads]:
    peak = PeakThreads()
    peak._thread.start()
    try:
        yield peak
    finally:
        peak._stop.set()
        peak._thread.join()


def drain(ds: fl.Dataset) -> list[int]:
    with ds.iterator() as it:
        return [int(x) for x in it]


@pytest.mark.timeout(120)
def test_a_chain_of_tuned_waiting_maps_stays_within_the_thread_budget() -> None:
    # Each map alone would start 2 cores / ~1% CPU share = hundreds of threads.
    n = 30_000
    ds = D.range(n)
    for i in range(3):
        ds = ds.map(sleepy, num_parallel_calls=fl.AUTOTUNE, name=f"wait{i}")
    with peak_threads() as peak:
        out = drain(ds)
    assert out == list(range(n))
    assert peak.workers <= default_thread_budget()
    assert peak.total <= default_thread_budget() + 1  # and the tuner's own thread
    assert peak.workers >= 3, "each waiting map runs on worker threads"


@pytest.mark.timeout(120)
def test_an_interleave_of_tuned_waiting_maps_stays_within_the_thread_budget() -> None:
    # The maps are made by the interleave as it opens each dataset, each on its own thread.
    slots, per_slot = 8, 1500

    def open_slot(i: Any) -> fl.Dataset:
        start = int(i) * per_slot
        return D.range(start, start + per_slot).map(sleepy, num_parallel_calls=fl.AUTOTUNE)

    ds = D.range(slots).interleave(open_slot, cycle_length=slots, num_parallel_calls=fl.AUTOTUNE)
    with peak_threads() as peak:
        out = drain(ds)
    # Round robin over the slots, one element of each in turn.
    assert out == [i * per_slot + k for k in range(per_slot) for i in range(slots)]
    assert peak.workers <= default_thread_budget()
    assert peak.total <= default_thread_budget() + 1
    assert peak.workers > slots, "the slots' maps run on worker threads too"


@pytest.mark.timeout(120)
def test_a_fixed_parallelism_is_honoured_and_tuned_stages_get_what_is_left() -> None:
    n = 3000
    ds = D.range(n).map(sleepy, num_parallel_calls=24, name="fixed")
    ds = ds.map(sleepy, num_parallel_calls=fl.AUTOTUNE, name="tuned")
    with peak_threads() as peak, with_autotune(ds, max_threads=32).iterator() as it:
        out = [int(x) for x in take(it, n // 2)]
        # Midway: workers end with the data.
        knobs = {s.name: s.knobs["parallelism"].value for s in it._ctx.stages()}
        fixed_workers = [t for t in feedline_threads() if t.name.startswith("feedline-map(fixed)")]
        out += [int(x) for x in it]
    assert out == list(range(n))
    assert knobs["map(fixed)"] == 24
    assert len(fixed_workers) == 24
    assert knobs["map(tuned)"] <= 32 - 24
    assert peak.workers <= 32


@pytest.mark.timeout(60)
@pytest.mark.parametrize("setting", ["max_threads", "max_parallelism"])
def test_a_tuned_waiting_map_with_no_threads_to_have_runs_inline(setting: str) -> None:
    ds = with_autotune(D.range(200).map(sleepy, num_parallel_calls=fl.AUTOTUNE), **{setting: 0})
    with peak_threads() as peak:
        out = drain(ds)
    assert out == list(range(200))
    assert peak.workers == 0


@pytest.mark.timeout(90)
def test_the_history_says_when_the_thread_budget_stops_a_scale_up() -> None:
    # Calls of 10 ms, a consumer that always waits: more workers would help, up to hundreds.
    def fetch(x: Any) -> Any:
        time.sleep(0.01)
        return x

    ds = with_autotune(D.range(10**6).map(fetch, num_parallel_calls=fl.AUTOTUNE), max_threads=8)
    with ds.iterator() as it:

        def budget_said() -> list[dict[str, Any]]:
            history = it.stats()["autotune"]["history"]
            return [d for d in history if "thread budget" in d["reason"]]

        assert consume_until(it, lambda: bool(budget_said())), it.stats()["autotune"]["history"]
        parallelism = it._ctx.stages()[0].knobs["parallelism"].value
        text = it.report(file=open("/dev/null", "w"))  # noqa: SIM115 - closed at exit
    assert all(d["new"] <= 8 for d in budget_said()), budget_said()
    assert parallelism <= 8
    assert "thread budget" in text


def test_the_tuner_takes_a_waiting_stage_to_the_thread_budget_and_says_it_stops_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Synthetic measurements: a waiting stage (1% CPU) its consumer always waits on, with 4
    # workers, where the pass may run 10 threads and another stage holds 2 of them.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    synthetic, fixed = SyntheticStage(), SyntheticStage()
    synthetic.knobs["parallelism"].set(4)
    synthetic.knobs["executor"].tunable = False
    fixed.knobs["parallelism"] = Knob("parallelism", 2, 0, 64, False)
    budget = ThreadBudget(10, lambda: [synthetic, fixed])
    for stage in (synthetic, fixed):
        budget.attach(stage)
    root, tuner, now = synthetic_tuner([synthetic])
    m = synthetic.metrics
    for _ in range(24):
        now += 0.25
        workers = synthetic.knobs["parallelism"].value
        done = 100 * workers * 0.25  # each worker: a call of 10 ms at a time
        root.delivered += int(done)
        root.wait += 0.25 * 0.95
        m.elements += int(done)
        m.worked += int(done)
        m.work_wall += 0.25 * workers
        m.work_cpu += 0.25 * workers * 0.01
        m.consumer_wait += 0.25 * 0.95
        tuner.step(now)
    moves = [(d.old, d.new, d.reason) for d in tuner.history if d.knob == "parallelism"]
    assert moves[0][:2] == (4, 8) and "thread budget allows 8 of 32" in moves[0][2], moves
    stops = [reason for old, new, reason in moves if old == new]
    assert len(stops) == 1 and "no more workers" in stops[0], moves
    assert "10 threads" in stops[0], stops
    assert max(new for _, new, _ in moves) == 8, moves


def test_reading_ahead_with_no_thread_left_is_said_once_and_not_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pass's one thread is taken by a stage the user fixed: the prefetch, which reading
    # ahead would pay for, stays inline, and the tuner says why (and moves on to the rest).
    fixed = SyntheticStage()
    fixed.knobs["parallelism"] = Knob("parallelism", 1, 0, 64, False)
    moves = read_ahead_history(monkeypatch, 1.8, others=[fixed])
    assert len(moves) == 1, moves
    old, new, reason = moves[0]
    assert old == new == 0 and "thread budget allows 0 of 1" in reason, moves


def test_stages_raising_at_once_never_overdraw_the_budget() -> None:
    # Sixteen stages raise at the same moment, from threads of their own (as an interleave's
    # datasets choose): together they get exactly the budget, none of them more than it.
    stages: list[Tunable] = [SyntheticStage() for _ in range(16)]
    for s in stages:
        s.knobs["parallelism"] = Knob("parallelism", 0, 0, 256, True)
    budget = ThreadBudget(100, lambda: stages)
    for s in stages:
        budget.attach(s)
    start = threading.Barrier(len(stages), timeout=30)

    def raise_it(stage: Tunable) -> None:
        start.wait()
        for value in range(1, 40):
            stage.knobs["parallelism"].set(value)

    threads = [threading.Thread(target=raise_it, args=(s,)) for s in stages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(s.knobs["parallelism"].value for s in stages) == 100
    assert budget.in_use() == 100


def test_threads_a_stage_let_go_count_until_they_end() -> None:
    stage = SyntheticStage()
    stage.knobs["parallelism"] = Knob("parallelism", 0, 0, 256, True)
    budget = ThreadBudget(10, lambda: [stage])
    budget.attach(stage)
    release = threading.Event()
    parked = [threading.Thread(target=release.wait, args=(30,), daemon=True) for _ in range(6)]
    other = SyntheticStage()
    other.knobs["parallelism"] = Knob("parallelism", 0, 0, 256, True)
    try:
        for t in parked:
            t.start()
            budget.track(stage, t)
        assert budget.room(other.knobs["parallelism"]) == 4  # six alive at parallelism 0
    finally:
        release.set()
        for t in parked:
            t.join(timeout=10)
    assert budget.room(other.knobs["parallelism"]) == 10


BIG = 2**22  # 4 MiB elements


def big(x: Any) -> Any:
    time.sleep(0.002)
    return np.full(BIG, int(x) % 256, np.uint8)


@pytest.mark.timeout(90)
def test_a_ram_budget_one_worker_cannot_keep_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="feedline")
    # One worker's buffer holds at least two 4 MiB elements (up to 1.5x the byte limit,
    # with one more in flight), and the consumer holds one more.
    ds = D.range(10**6).map(big, num_parallel_calls=fl.AUTOTUNE, name="big")
    with with_autotune(ds, ram_budget=8 * 2**20).iterator() as it:
        assert consume_until(it, lambda: bool(it.stats()["warnings"])), it.stats()
        for _ in range(100):  # the tuner goes on measuring: nothing more is said
            next(it)
        stats = it.stats()
        text = it.report(file=open("/dev/null", "w"))  # noqa: SIM115 - closed at exit
    (warning,) = stats["warnings"]
    assert "map(big)" in warning and "8.0 MiB" in warning and "ram_budget" in warning, warning
    assert re.search(r"may hold 1[2-6]\.0 MiB", warning), warning
    said = [r for r in caplog.records if r.name == "feedline" and "map(big)" in r.message]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, said
    assert f"warning: {warning}" in text


@pytest.mark.timeout(60)
def test_a_ram_budget_that_holds_a_worker_says_nothing() -> None:
    ds = D.range(10**6).map(big, num_parallel_calls=fl.AUTOTUNE, name="big")
    with with_autotune(ds, ram_budget=2**30).iterator() as it:
        # The tuner checks from its first look at the stage, which records its start choice.
        assert consume_until(it, lambda: bool(it.stats()["autotune"]["history"]))
        for _ in range(100):
            next(it)
        assert it.stats()["warnings"] == []


@pytest.mark.timeout(60)
def test_stages_made_after_the_tuner_started_keep_to_the_ram_budget() -> None:
    # Under repeat each epoch makes its stage anew, with the default byte limit.
    budget = 4 * 2**20
    ds = D.range(50).map(sleepy, num_parallel_calls=fl.AUTOTUNE).repeat()
    with with_autotune(ds, ram_budget=budget).iterator() as it:
        first = it._ctx.stages()
        for _ in range(60):
            next(it)

        def remade_capped() -> bool:
            stages = it._ctx.stages()
            return stages != first and all(s.max_buffer_bytes <= budget for s in stages)

        assert consume_until(it, remade_capped), [s.max_buffer_bytes for s in it._ctx.stages()]


def test_the_default_budget_comes_from_a_measured_gil_hand_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from feedline.runtime import machine

    handoff = machine.gil_handoff_seconds()
    assert 0 < handoff < 0.01
    low, high = machine.THREAD_BUDGET_BOUNDS
    assert low <= machine.default_thread_budget() <= high
    monkeypatch.setattr(machine, "gil_handoff_seconds", lambda: 40e-6)  # 2 x 5 ms / 40 us
    assert machine.default_thread_budget() == 250
    monkeypatch.setattr(machine, "gil_handoff_seconds", lambda: 2e-3)  # a very slow machine
    assert machine.default_thread_budget() == low


@pytest.mark.timeout(60)
def test_the_report_shows_the_thread_budget_and_the_peak() -> None:
    ds = with_autotune(D.range(600).map(sleepy, num_parallel_calls=fl.AUTOTUNE), max_threads=40)
    with ds.iterator() as it:
        for _ in it:
            pass
        stats = it.stats()
        text = it.report(file=io.StringIO())
    assert stats["threads"]["budget"] == 40
    assert 1 <= stats["threads"]["peak"] <= 40
    assert f"thread budget 40 (at most {stats['threads']['peak']} alive at once)" in text
