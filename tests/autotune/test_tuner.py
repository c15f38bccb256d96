"""The direction of AUTOTUNE's decisions on synthetic stages, and what users see of them.

These tests drive real pipelines and check where the knobs went, never how fast anything ran.
How soon the tuner gets there depends on the machine and what else runs on it: tests wait for
a decision (``consume_until``, with a generous limit) rather than look after a fixed time, and
whether a change pays is judged on synthetic measurements, where the test sets what it gains.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.autotune import tuner as tuner_module
from feedline.autotune.budget import Budget
from feedline.autotune.tuner import RootCounters
from feedline.runtime.context import WorkerMemory
from feedline.runtime.machine import idle_cpu_seconds, usable_cores
from feedline.runtime.tunable import (
    PROCESSES,
    THREADS,
    Knob,
    StageMetrics,
    StartChoice,
    ThreadBudget,
    Tunable,
)
from tests.helpers import assert_elements_equal

D = fl.Dataset


def stage(it: fl.DatasetIterator, prefix: str) -> Any:
    return next(s for s in it._ctx.stages() if s.name.startswith(prefix))


def consume_for(it: fl.DatasetIterator, seconds: float, step: float = 0.0) -> int:
    """Pull from ``it`` for about ``seconds``, sleeping ``step`` after each element."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        next(it)
        n += 1
        if step:
            time.sleep(step)
    return n


def consume_until(
    it: fl.DatasetIterator, condition: Callable[[], bool], seconds: float = 30.0, step: float = 0.0
) -> bool:
    """Pull from ``it`` (sleeping ``step`` after each element) until ``condition()`` holds, for
    at most ``seconds``; whether it then holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        for _ in range(8):
            next(it)
            if step:
                time.sleep(step)
    return True


def decisions(it: fl.DatasetIterator, stage_prefix: str, knob: str) -> list[tuple[int, int]]:
    """The (old, new) of each change AUTOTUNE made to a knob of a stage so far."""
    return [
        (d["old"], d["new"])
        for d in it.stats()["autotune"]["history"]
        if d["stage"].startswith(stage_prefix) and d["knob"] == knob and d["old"] != d["new"]
    ]


def latency(seconds: float, size: int = 1024) -> Any:
    def fetch(x: Any) -> Any:
        time.sleep(seconds)
        return np.full(size, x % 256, np.uint8)

    return fetch


def with_autotune(ds: fl.Dataset, **settings: Any) -> fl.Dataset:
    options = fl.Options()
    for name, value in settings.items():
        setattr(options.autotune, name, value)
    return ds.with_options(options)


@pytest.mark.timeout(60)
def test_latency_bound_map_gets_parallelism_above_the_core_count() -> None:
    ds = D.range(10**6).map(latency(0.01), num_parallel_calls=fl.AUTOTUNE).batch(8)
    with ds.prefetch(fl.AUTOTUNE).iterator() as it:
        knob = stage(it, "map").knobs["parallelism"]

        def above_the_cores() -> bool:
            raised = any(new > old for old, new in decisions(it, "map", "parallelism"))
            return raised and knob.value > usable_cores()  # and in the history

        assert consume_until(it, above_the_cores), it.stats()["autotune"]["history"]


@pytest.mark.timeout(60)
def test_a_full_ram_budget_stops_growth() -> None:
    megabyte = 2**20
    ds = D.range(10**6).map(latency(0.01, megabyte), num_parallel_calls=fl.AUTOTUNE).batch(2)
    ds = with_autotune(ds, ram_budget=4 * megabyte)
    with ds.iterator() as it:
        consume_for(it, 2.5)
        parallelism = stage(it, "map").knobs["parallelism"].value
    # Unconstrained, the same pipeline goes past the core count (test above); here each
    # extra worker's chunks would not fit in 4 MiB.
    assert parallelism <= 4


@pytest.mark.timeout(60)
def test_a_slow_consumer_leads_to_small_buffers_and_few_workers() -> None:
    ds = D.range(1000).repeat().map(lambda x: x * 2, num_parallel_calls=fl.AUTOTUNE)
    ds = ds.batch(64).prefetch(fl.AUTOTUNE)
    with ds.iterator() as it:
        consume_for(it, 2.5, step=0.01)
        prefetch = stage(it, "prefetch")
        buffer = prefetch.knobs["buffer_size"].value
        mapper = stage(it, "map")
        stall = it.stats()["consumer"]["stall_fraction"]
    assert buffer <= 2
    assert mapper.knobs["parallelism"].value <= usable_cores()
    assert stall < 0.05


@pytest.mark.timeout(90)
def test_a_consumer_that_speeds_up_gets_more_parallelism() -> None:
    ds = D.range(10**6).map(latency(0.005), num_parallel_calls=fl.AUTOTUNE).batch(4)
    with ds.iterator() as it:

        def parallelism() -> int:
            return int(stage(it, "map").knobs["parallelism"].value)

        # A slow training step: few workers suffice, and the tuner sheds what it started with.
        shed = consume_until(
            it,
            lambda: any(new < old for old, new in decisions(it, "map", "parallelism")),
            step=0.05,
        )
        assert shed, it.stats()["autotune"]["history"]
        slow_phase = parallelism()
        # The step got fast: the pipeline is now the bottleneck.
        grew = consume_until(it, lambda: parallelism() > slow_phase)
        assert grew, it.stats()["autotune"]["history"]


@pytest.mark.parametrize("cpu_budget", [1.0, 2.0])
def test_cpu_budget_caps_computing_stages(
    monkeypatch: pytest.MonkeyPatch, cpu_budget: float
) -> None:
    # Synthetic measurements: a live run reads computing threads starved of CPU by other
    # processes as threads that wait. Each worker computes (95% of its time on the CPU) and
    # adds as much rate again, its consumer always waiting: only the budget stops it.
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)
    process_cpu = [0.0]
    monkeypatch.setattr(tuner_module.time, "process_time", lambda: process_cpu[0])
    synthetic, root, tuner, now = threads_tuner(1, cpu=cpu_budget)
    m = synthetic.metrics
    most = 1
    for _ in range(24):
        now += 0.25
        workers = synthetic.knobs["parallelism"].value
        most = max(most, workers)
        done = 250 * workers
        process_cpu[0] += 0.25 * 0.95 * workers
        root.delivered += done
        root.wait += 0.25 * 0.95
        m.elements += done
        m.worked += done
        m.work_wall += 0.25 * workers
        m.work_cpu += 0.25 * workers * 0.95
        m.consumer_wait += 0.25 * 0.95
        tuner.step(now)
    assert most == int(cpu_budget), tuner.history


@pytest.mark.timeout(60)
def test_prefetch_stays_inline_when_the_consumer_has_no_work_of_its_own() -> None:
    # Large batches: the loop's own few microseconds per batch are next to nothing.
    ds = D.range(10**8).map(lambda x: x + 1).batch(4096).prefetch(fl.AUTOTUNE)
    with ds.iterator() as it:
        consume_for(it, 1.5)
        prefetch = stage(it, "prefetch")
        history = it.stats()["autotune"]["history"]
        assert prefetch.knobs["parallelism"].value == 0, history
        assert prefetch.metrics.elements > 0  # it delivered, inline
        threads = [t.name for t in threading.enumerate()]
    assert not any(name.startswith("feedline-prefetch") for name in threads)


@pytest.mark.timeout(60)
def test_prefetch_reads_ahead_when_the_consumer_works_between_batches() -> None:
    def produce(x: Any) -> Any:
        time.sleep(0.002)  # the input's work, overlappable with the consumer's
        return x

    ds = D.range(10**6).map(produce).batch(4).prefetch(fl.AUTOTUNE)
    with ds.iterator() as it:
        # A training step as long as a batch takes. (Whether reading ahead is kept depends on
        # what it gains: see the synthetic test below.)
        tried = consume_until(
            it, lambda: (0, 1) in decisions(it, "prefetch", "parallelism"), step=0.01
        )
        assert tried, it.stats()["autotune"]["history"]


@pytest.mark.timeout(60)
def test_a_read_ahead_thread_goes_inline_once_the_consumer_stops_working() -> None:
    def produce(x: Any) -> Any:
        time.sleep(0.001)
        return x

    ds = D.range(10**6).map(produce).batch(4).prefetch(fl.AUTOTUNE)
    with ds.iterator() as it:
        prefetch = stage(it, "prefetch").knobs["parallelism"]
        reading_ahead = consume_until(it, lambda: prefetch.value == 1, step=0.006)
        assert reading_ahead, it.stats()["autotune"]["history"]
        before = len(decisions(it, "prefetch", "parallelism"))
        # The consumer now takes batches as fast as they come: inline, with no hand-offs
        # (kept, unless a noisy window made it look slower: then it tried).
        inline = consume_until(
            it, lambda: (1, 0) in decisions(it, "prefetch", "parallelism")[before:]
        )
        assert inline, it.stats()["autotune"]["history"]


@pytest.mark.timeout(60)
def test_tuning_never_changes_what_comes_out() -> None:
    def build() -> fl.Dataset:
        return (
            D.range(3000)
            .shuffle(100, seed=5)
            .map(latency(0.0002, 4), num_parallel_calls=fl.AUTOTUNE)
            .random_map(lambda x, rng: x + rng.integers(3), seed=9, num_parallel_calls=fl.AUTOTUNE)
            .batch(7)
            .prefetch(fl.AUTOTUNE)
        )

    tuned = list(build())
    untuned = list(with_autotune(build(), enabled=False))
    assert_elements_equal(tuned, untuned)
    assert all(len(b) == 7 for b in tuned[:-1])


@pytest.mark.timeout(30)
def test_disabled_autotune_keeps_defaults_and_starts_no_tuner() -> None:
    ds = D.range(5000).map(latency(0.001), num_parallel_calls=fl.AUTOTUNE).prefetch(fl.AUTOTUNE)
    with with_autotune(ds, enabled=False).iterator() as it:
        consume_for(it, 1.0)
        assert it.stats()["autotune"]["enabled"] is False
        assert it.stats()["autotune"]["history"] == []
        assert stage(it, "map").knobs["parallelism"].value == usable_cores()
        import threading

        assert not any(t.name == "feedline-autotune" for t in threading.enumerate())


@pytest.mark.timeout(60)
def test_decisions_are_logged_recorded_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="feedline.autotune")
    ds = D.range(10**6).map(latency(0.01), num_parallel_calls=fl.AUTOTUNE, name="fetch").batch(8)
    with ds.prefetch(fl.AUTOTUNE).iterator() as it:
        consume_for(it, 2.0)
        stats = it.stats()
        text = it.report(file=open("/dev/null", "w"))  # noqa: SIM115 - closed at exit
    history = stats["autotune"]["history"]
    assert history, "a latency-bound map must be tuned"
    first = history[0]
    assert {"time", "stage", "knob", "old", "new", "reason"} <= set(first)
    assert any("map(fetch).parallelism" in r.getMessage() for r in caplog.records)
    names = [s["name"] for s in stats["stages"]]
    assert "map(fetch)" in names and any(n.startswith("prefetch") for n in names)
    mapper = next(s for s in stats["stages"] if s["name"] == "map(fetch)")
    assert mapper["elements"] > 0 and mapper["mean_ms"] >= 10 * 0.9
    assert mapper["cpu_share"] < 0.5  # it sleeps: waiting, not computing
    assert stats["bottleneck"]["stage"] == "map(fetch)"
    assert "waits" in stats["bottleneck"]["advice"]
    assert "map(fetch)" in text and "bottleneck: map(fetch)" in text
    assert "AUTOTUNE:" in text


@pytest.mark.timeout(30)
def test_consumer_bound_report_says_so() -> None:
    ds = D.range(100).repeat().batch(10).prefetch(fl.AUTOTUNE)
    with ds.iterator() as it:
        consume_for(it, 0.6, step=0.01)
        bottleneck = it.stats()["bottleneck"]
    assert bottleneck["stage"] == "consumer"
    assert "faster than your training step" in bottleneck["advice"]


def slow_reads() -> Any:
    """A source that reads: 0.5 ms an element."""
    for i in range(10**6):
        time.sleep(0.0005)
        yield i


@pytest.mark.timeout(30)
@pytest.mark.parametrize("parallelism", [0, 4])
def test_the_report_blames_a_slow_source_not_the_cheap_map_reading_it(parallelism: int) -> None:
    source = D.from_generator(slow_reads, output_signature=fl.TensorSpec((), np.int64))
    ds = source.map(lambda x: x * 2, num_parallel_calls=parallelism or None).batch(8)
    with with_autotune(ds, enabled=False).iterator() as it:
        consume_for(it, 0.8)
        bottleneck = it.stats()["bottleneck"]
    assert bottleneck["stage"].startswith("map"), bottleneck
    assert "the input of map" in bottleneck["advice"], bottleneck


@pytest.mark.timeout(30)
def test_a_cheap_map_waiting_on_a_costly_one_passes_the_blame_to_it() -> None:
    def costly(x: Any) -> Any:
        time.sleep(0.002)
        return x

    ds = D.range(10**6).map(costly, num_parallel_calls=2, name="costly")
    ds = ds.map(lambda x: x + 1, num_parallel_calls=2, name="cheap").batch(8)
    with with_autotune(ds, enabled=False).iterator() as it:
        consume_for(it, 0.8)
        bottleneck = it.stats()["bottleneck"]
    assert bottleneck["stage"] == "map(costly)", bottleneck
    assert "the input of" not in bottleneck["advice"], bottleneck


@pytest.mark.timeout(60)
def test_tuned_values_carry_over_to_the_next_epoch() -> None:
    # An epoch long enough to tune in: 256 calls of 10 ms in flight make 25k elements/s.
    epoch = 40_000
    ds = D.range(epoch).map(latency(0.01), num_parallel_calls=fl.AUTOTUNE).repeat(3).batch(8)
    with ds.iterator() as it:
        consume_for(it, 0.8)
        tuned = stage(it, "map").knobs["parallelism"].value
        assert it._counters.delivered * 8 < epoch
        while it._counters.delivered * 8 < epoch + 400:  # into a later epoch: its stage is new
            next(it)
        assert stage(it, "map").knobs["parallelism"].value >= min(tuned, 8)


@pytest.mark.timeout(30)
def test_tuner_costs_little_on_a_stable_pipeline() -> None:
    ds = D.range(100).repeat().map(lambda x: x, num_parallel_calls=fl.AUTOTUNE).batch(10)
    with ds.prefetch(fl.AUTOTUNE).iterator() as it:
        started = time.perf_counter()
        consume_for(it, 2.0, step=0.005)
        elapsed = time.perf_counter() - started
        cost = it.stats()["autotune"]["tuner_cpu_s"]
    assert cost < 0.02 * elapsed  # under 2% of one core


def python_work(x: Any) -> Any:
    """About a millisecond of pure Python: holds the GIL throughout."""
    total = 0
    for i in range(20_000):
        total += i * i % 7
    return np.int64(total + int(x))


IMAGE = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def numpy_work(x: Any) -> Any:
    """A few milliseconds of image arithmetic in numpy: releases the GIL for most of it."""
    out = IMAGE.astype(np.float32)
    for _ in range(4):
        out *= np.float32(1 / 255)
        out -= np.float32(0.5)
        out /= np.float32(0.25)
        out = out[:, ::-1].copy()
    return out[:2, :2, 0] + np.float32(x)


def tuned_executor(fn: Any, seconds: float) -> tuple[int, list[dict[str, Any]]]:
    """Where AUTOTUNE runs ``fn`` after ``seconds`` of a fast consumer, and its decisions."""
    ds = D.range(10**6).map(fn, num_parallel_calls=fl.AUTOTUNE).batch(16)
    with ds.prefetch(fl.AUTOTUNE).iterator() as it:
        consume_for(it, seconds)
        executor = stage(it, "map").knobs["executor"].value
        history = it.stats()["autotune"]["history"]
    return executor, history


needs_two_cores = pytest.mark.skipif(usable_cores() < 2, reason="processes need 2 cores to pay")


@needs_two_cores
@pytest.mark.timeout(120)
def test_a_gil_bound_map_moves_to_processes_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cloudpickle")
    # Other processes (other tests, on a shared machine) may keep the cores busy, which
    # rightly stops the move: here the machine's cores count as free. Whether the move is kept
    # depends on what it gains on the machine: synthetic tests judge that.
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)
    ds = D.range(10**6).map(python_work, num_parallel_calls=fl.AUTOTUNE).batch(16)
    with ds.prefetch(fl.AUTOTUNE).iterator() as it:
        moved = consume_until(it, lambda: (THREADS, PROCESSES) in decisions(it, "map", "executor"))
        assert moved, it.stats()["autotune"]["history"]


@needs_two_cores
@pytest.mark.timeout(90)
def test_a_map_that_releases_the_gil_stays_on_threads() -> None:
    executor, history = tuned_executor(numpy_work, 4.0)
    assert executor == THREADS, history


def test_a_wait_in_progress_counts_in_the_window_it_happens_in() -> None:
    metrics = StageMetrics()
    started = metrics.start_wait()
    time.sleep(0.05)
    assert metrics.snapshot()["consumer_wait"] >= 0.05  # still waiting, already counted
    waited = metrics.end_wait(started)
    assert metrics.snapshot()["consumer_wait"] == pytest.approx(waited)


@needs_two_cores
@pytest.mark.timeout(90)
def test_a_gil_bound_map_stays_on_threads_while_other_processes_take_the_cores() -> None:
    # Other processes keeping every core busy look like the GIL from inside (the process gets
    # about one core); processes could not get more cores either.
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(int(usable_cores()) + 1)
    ]
    try:
        time.sleep(0.3)
        executor, history = tuned_executor(python_work, 4.0)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert executor == THREADS, history


def test_idle_cpu_time_is_read_and_grows() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("read from /proc/stat")
    first = idle_cpu_seconds()
    time.sleep(0.2)
    second = idle_cpu_seconds()
    assert first is not None and second is not None
    assert second >= first


class SyntheticStage(Tunable):
    """A stage whose metrics a test writes: it delivers at a fixed rate whatever its knobs."""

    name = "map(synthetic)"
    max_buffer_bytes = 2**20
    solo_cpu_share = None
    has_own_work = True
    chunk_size = 1

    def __init__(self) -> None:
        self.key = object()
        self.metrics = StageMetrics()
        self.knobs = {
            "parallelism": Knob("parallelism", 2, 0, 64, True),
            "buffer_size": Knob("buffer_size", 1, 1, 1, False),
            "executor": Knob("executor", THREADS, THREADS, PROCESSES, True),
        }

    def projected_bytes(
        self, parallelism: int | None = None, buffer_size: int | None = None
    ) -> float:
        return 0.0


def threads_tuner(
    parallelism: int, cpu: float = 2.0
) -> tuple[SyntheticStage, RootCounters, Any, float]:
    """A tuner (``cpu`` cores, 1 GiB) on one synthetic stage of ``parallelism`` threads that
    may not move to processes; its root counters, and the tuner's clock, which the test moves
    on."""
    synthetic = SyntheticStage()
    synthetic.knobs["parallelism"].set(parallelism)
    synthetic.knobs["executor"].tunable = False
    root = RootCounters()
    now = time.perf_counter()
    tuner = tuner_module.Tuner(lambda: [synthetic], root, Budget(cpu=cpu, ram=2**30), now)
    return synthetic, root, tuner, now


def read_ahead_history(
    monkeypatch: pytest.MonkeyPatch, speedup: float, others: list[Tunable] | None = None
) -> list[tuple[int, int, str]]:
    """The tuner's decisions on a synthetic prefetch whose consumer works half the time, 5 ms
    an element, and waits the other half for its input pulled inline. On a thread, the two
    overlap: the rate rises by ``speedup`` (the consumer then waits less). ``others``: more
    stages of the pass, which share a thread budget of 1 with it."""
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)
    prefetch = SyntheticStage()
    prefetch.name = "prefetch"
    prefetch.has_own_work = False
    prefetch.knobs = {
        "parallelism": Knob("parallelism", 0, 0, 1, True),
        "buffer_size": Knob("buffer_size", 2, 1, 64, True),
    }
    if others is not None:
        budget = ThreadBudget(1, lambda: [prefetch, *others])
        for s in (prefetch, *others):
            budget.attach(s)
    root = RootCounters()
    now = time.perf_counter()
    tuner = tuner_module.Tuner(lambda: [prefetch], root, Budget(cpu=2.0, ram=2**30), now)
    m = prefetch.metrics
    for _ in range(24):
        now += 0.25
        ahead = prefetch.knobs["parallelism"].value == 1
        rate = 100 * (speedup if ahead else 1.0)
        waits = 1 - rate * 0.005  # the consumer's own 5 ms per element, the rest waiting
        done = int(rate * 0.25)
        root.delivered += done
        root.wait += 0.25 * waits
        m.elements += done
        m.worked += done
        m.work_wall += done * 0.0025
        m.work_cpu += done * 0.0025
        m.consumer_wait += 0.25 * waits
        tuner.step(now)
    return [(d.old, d.new, d.reason) for d in tuner.history if d.knob == "parallelism"]


@pytest.mark.parametrize("speedup", [1.8, 1.0])
def test_reading_ahead_is_kept_when_it_overlaps_the_consumer_and_taken_back_when_not(
    monkeypatch: pytest.MonkeyPatch, speedup: float
) -> None:
    moves = [(old, new) for old, new, _ in read_ahead_history(monkeypatch, speedup)]
    assert moves == ([(0, 1)] if speedup > 1 else [(0, 1), (1, 0)]), moves


def test_an_inline_stage_buffer_does_not_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    # Just sent inline, a stage's window still holds the idle time of the thread it let go
    # and its consumer's waits: neither calls for a buffer nobody fills.
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)
    synthetic = SyntheticStage()
    synthetic.knobs["parallelism"] = Knob("parallelism", 0, 0, 64, False)
    synthetic.knobs["buffer_size"] = Knob("buffer_size", 2, 1, 64, True)
    synthetic.knobs["executor"].tunable = False
    root = RootCounters()
    now = time.perf_counter()
    tuner = tuner_module.Tuner(lambda: [synthetic], root, Budget(cpu=2.0, ram=2**30), now)
    for _ in range(20):
        now += 0.25
        root.delivered += 250
        root.wait += 0.01
        synthetic.metrics.elements += 250
        synthetic.metrics.work_wall += 0.05
        synthetic.metrics.work_cpu += 0.05
        synthetic.metrics.consumer_wait += 0.01
        synthetic.metrics.worker_idle += 0.1
        tuner.step(now)
    assert not [d for d in tuner.history if d.knob == "buffer_size"], tuner.history


@pytest.mark.parametrize("consumer_waits", [0.008, 0.03])  # between NO_STALL and STALL; above
def test_idle_workers_their_consumer_never_waits_on_are_shed(
    monkeypatch: pytest.MonkeyPatch, consumer_waits: float
) -> None:
    # A waiting map started with many workers for a consumer that sleeps between batches: the
    # consumer's waits (the GIL at each wake-up, a core on a loaded machine) are not on this
    # stage. Its buffer starts full, so the first windows deliver with no work done at all:
    # that must not read as work too cheap for a thread.
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)
    synthetic, root, tuner, now = threads_tuner(64)
    m = synthetic.metrics
    m.worked, m.work_wall, m.work_cpu = 64, 64 * 0.005, 64 * 0.00005  # the buffer's fill
    for step in range(24):
        now += 0.25
        workers = synthetic.knobs["parallelism"].value
        root.delivered += 5
        root.wait += 0.25 * consumer_waits
        m.elements += 20
        if step >= 4:  # the buffer has drained: each element delivered is one worked on
            m.worked += 20
            m.work_wall += 20 * 0.005
            m.work_cpu += 20 * 0.00005
        m.worker_idle += 0.25 * workers - 20 * 0.005
        tuner.step(now)
    shed = [d for d in tuner.history if d.knob == "parallelism"]
    assert shed and all(d.new < d.old for d in shed), tuner.history
    assert all(d.new > 0 for d in shed), tuner.history  # never inline: the work is not cheap
    assert synthetic.knobs["parallelism"].value <= 8, tuner.history


def test_two_stages_at_the_same_rate_grow_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two waiting stages (10 ms per call) in a row, each with 4 workers: the pipeline runs at
    # their common rate, 400 elements/s. More workers for either alone gain nothing, so each
    # tried alone would be taken back; the second's reader waiting on the first says to try
    # the first with it.
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)
    first, second = SyntheticStage(), SyntheticStage()
    first.name, second.name = "map(read)", "map(fetch)"
    for stage_ in (first, second):
        stage_.knobs["parallelism"].set(4)
        stage_.knobs["executor"].tunable = False
    root = RootCounters()
    now = time.perf_counter()
    tuner = tuner_module.Tuner(lambda: [first, second], root, Budget(cpu=2.0, ram=2**30), now)
    for _ in range(40):
        now += 0.25
        workers = [s.knobs["parallelism"].value for s in (first, second)]
        done = 0.25 * 100 * min(workers)  # elements each stage (and the consumer) gets through
        root.delivered += done
        root.wait += 0.25 * 0.95  # the training step is fast: it waits on the pipeline
        for stage_, own, reader_waits in (
            (first, workers[0], 0.25 * max(0.0, 1 - workers[0] / workers[1])),
            (second, workers[1], 0.25 * 0.95),
        ):
            m = stage_.metrics
            m.elements += done
            m.worked += done
            m.work_wall += done * 0.01
            m.work_cpu += done * 0.0001
            m.consumer_wait += reader_waits
            m.worker_idle += max(0.0, 0.25 * own - done * 0.01)
        tuner.step(now)
    chained = [d for d in tuner.history if "tried with it" in d.reason]
    assert chained, tuner.history
    assert min(s.knobs["parallelism"].value for s in (first, second)) > 4, tuner.history


def test_a_served_consumer_keeps_a_decrease_whatever_a_stage_rate_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A slow consumer takes a few large batches per window, too few to measure its rate, so
    # a decrease is judged on the stage's own rate, which falls as the buffers after it
    # fill up: that fall is not the decrease's doing while the consumer never waits.
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)
    synthetic, root, tuner, now = threads_tuner(64)
    m = synthetic.metrics
    for step in range(24):
        now += 0.25
        done = 500 if step < 3 else 20  # the buffers downstream fill, then it keeps pace
        root.delivered += 1
        m.elements += done
        m.worked += done
        m.work_wall += done * 0.005
        m.work_cpu += done * 0.00005
        m.worker_idle += max(0.0, 0.25 * synthetic.knobs["parallelism"].value - done * 0.005)
        tuner.step(now)
    changes = [d for d in tuner.history if d.knob == "parallelism"]
    assert changes and all(d.new < d.old for d in changes), tuner.history


def test_a_move_to_processes_that_does_not_pay_is_taken_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moves = gil_bound_decisions(monkeypatch, 2**30, [])
    assert [(old, new) for old, new, _ in moves] == [(THREADS, PROCESSES), (PROCESSES, THREADS)]
    assert "no gain" in moves[1][2]


def test_a_move_to_processes_that_did_not_pay_is_tried_again_ever_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Even when the tuner forgets what did not help (a consumer changing speed makes it), a
    # failed move to processes is retried only after 10 s, then 20 s, then 40 s.
    moves = gil_bound_decisions(monkeypatch, 2**32, [], seconds=60.0, forgetful=True)
    tries = [m for m in moves if m[:2] == (THREADS, PROCESSES)]
    assert 2 <= len(tries) <= 3, moves


def test_a_move_to_processes_that_pays_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    moves = gil_bound_decisions(monkeypatch, 2**32, [], processes_speedup=1.8)
    assert [(old, new) for old, new, _ in moves] == [(THREADS, PROCESSES)], moves


def test_worker_processes_count_in_the_ram_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other worker processes of the run already hold most of the budget: one per core more,
    # each expected to hold as much, would not fit.
    running = [WorkerMemory("map(other)", 2, 2 * 300 * 2**20)]
    assert gil_bound_decisions(monkeypatch, 2**30, running) == []
    assert gil_bound_decisions(monkeypatch, 2**32, running)[0][:2] == (THREADS, PROCESSES)
    # Before any worker runs, one is expected to hold as much as this process (100 MiB here).
    assert gil_bound_decisions(monkeypatch, 150 * 2**20, []) == []
    assert gil_bound_decisions(monkeypatch, 250 * 2**20, [])[0][:2] == (THREADS, PROCESSES)


def test_the_report_names_the_gil_and_says_to_use_processes() -> None:
    # What two threads of pure Python measure (a live run on a machine other processes keep
    # busy gets less CPU, and reads as waiting): 95% of their time on the CPU, one core
    # between them.
    from feedline.observe.stats import find_bottleneck

    work = {
        "name": "map(python_work)",
        "knobs": {"parallelism": 2, "executor": THREADS},
        "own_work": True,
        "elements": 1000,
        "work_wall_s": 2.0,
        "input_wall_s": 0.01,
        "work_cpu_s": 1.9,
        "mean_ms": 2.0,
        "cpu_share": 0.95,
        "solo_cpu_share": None,
        "consumer_wait_fraction": 0.9,
    }
    consumer = {"elements": 1000, "elapsed_s": 2.0, "wait_s": 1.8, "stall_fraction": 0.9}
    stats = {"stages": [work], "consumer": consumer, "autotune": {"gil_free": False}}
    advice = find_bottleneck(stats)["advice"]
    assert "holds the GIL" in advice and "executor='process'" in advice, advice


@pytest.mark.parametrize("process_cores", [1.7, 1.8])
def test_a_thread_per_core_leaving_cores_unused_tries_processes(
    monkeypatch: pytest.MonkeyPatch, process_cores: float
) -> None:
    # Two computing threads (90% of their time on the CPU) while the process uses 1.7 of
    # its 2 cores: they wait on each other (the GIL between native calls), so processes are
    # tried, and taken back when they do not pay. Using 1.8 cores, processes could at best
    # use 11% more: less than a move must gain (PROCESS_GAIN), so threads are left alone.
    moves = gil_bound_decisions(monkeypatch, 2**32, [], process_cores=process_cores, cpu=0.9)
    if process_cores < 2 / (1 + tuner_module.PROCESS_GAIN):
        assert moves[0][:2] == (THREADS, PROCESSES), moves
        assert "with a thread per core" in moves[0][2]
        assert moves[1][:2] == (PROCESSES, THREADS)
    else:
        assert moves == []


@pytest.mark.parametrize("process_cores", [1.0, 1.7])
def test_the_reading_for_a_move_to_processes_gets_them_ready_when_held_by_the_gil(
    monkeypatch: pytest.MonkeyPatch, process_cores: float
) -> None:
    # Held to one core, a move is likely: the forkserver starts while the tuner reads (it
    # took ~0.5 s on its own). Threads using 1.7 cores may gain little: nothing starts.
    readied: list[int] = []
    monkeypatch.setattr(SyntheticStage, "expect_processes", lambda self: readied.append(1))
    # The workers it started with were just chosen: the tuner reads before it moves.
    started = StartChoice(time.perf_counter(), "parallelism", 0, 2, "its first call computes")
    monkeypatch.setattr(SyntheticStage, "start_choice", started)
    moves = gil_bound_decisions(monkeypatch, 2**32, [], process_cores=process_cores, cpu=0.9)
    assert moves[0][:2] == (THREADS, PROCESSES), moves
    assert bool(readied) == (process_cores == 1.0)


def gil_bound_decisions(
    monkeypatch: pytest.MonkeyPatch,
    ram: int,
    workers: list[WorkerMemory],
    process_cores: float | None = None,
    cpu: float = 0.5,
    parallelism: int = 2,
    solo_cpu_share: float | None = None,
    processes: bool = True,
    knob: str = "executor",
    seconds: float = 10.0,
    forgetful: bool = False,
    slow_moments: dict[int, float] | None = None,
    processes_speedup: float = 1.0,
) -> list[tuple[int, int, str]]:
    """The executor decisions on a synthetic stage with the GIL's signature (the consumer
    always waits; the stage computes one core's worth at 1000 elements/s, on threads and on
    processes alike), with a RAM budget of ``ram`` and ``workers`` already running.
    ``process_cores``: the cores the whole process uses (else what this test process uses);
    ``cpu``: the share of the workers' time on the CPU; ``parallelism``: the threads it starts
    with; ``solo_cpu_share``: what its first call, run alone, showed; ``processes``: whether
    it may move to processes; ``forgetful``: the tuner forgets what did not help at every step
    (as when the consumer keeps changing speed); ``slow_moments``: the cores the process uses
    at some steps (of 0.25 s), if not ``process_cores``; ``processes_speedup``: how much faster
    it delivers on processes. Returns the decisions on ``knob`` over ``seconds``."""
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: None)  # cores count as free
    process_cpu = [0.0]
    if process_cores is not None:
        monkeypatch.setattr(tuner_module.time, "process_time", lambda: process_cpu[0])
    # A worker is expected to hold as much as this process, before any runs: a fixed size here
    # (this test process's own depends on what earlier tests imported).
    monkeypatch.setattr(tuner_module, "rss_of", lambda: 100 * 2**20)
    synthetic = SyntheticStage()
    synthetic.knobs["parallelism"].set(parallelism)
    synthetic.solo_cpu_share = solo_cpu_share
    synthetic.knobs["executor"].tunable = processes
    root = RootCounters()
    now = time.perf_counter()  # the tuner's clock; the test moves it on
    tuner = tuner_module.Tuner(
        lambda: [synthetic], root, Budget(cpu=2.0, ram=ram), now, lambda: workers
    )
    for step in range(int(seconds / 0.25)):
        now += 0.25
        cores = (slow_moments or {}).get(step, process_cores)
        process_cpu[0] += 0.25 * (cores or 0.0)
        on_processes = synthetic.knobs["executor"].value == PROCESSES
        delivered = int(250 * (processes_speedup if on_processes else 1.0))
        root.delivered += delivered
        root.wait += 0.25
        m = synthetic.metrics
        m.elements += delivered
        m.work_wall += 0.5
        m.work_cpu += 0.5 * cpu
        m.consumer_wait += 0.25
        tuner.step(now)
        if forgetful:
            tuner.state.saturated.clear()
    return [(d.old, d.new, d.reason) for d in tuner.history if d.knob == knob]


@pytest.mark.parametrize(
    "slow_moments",
    [
        {0: 1.6, 1: 1.6},  # the first half second leaves 0.4 cores, more than processes need
        {1: 1.3},  # one window looks held by the GIL
    ],
)
def test_a_slow_moment_does_not_send_a_thread_per_core_to_processes(
    monkeypatch: pytest.MonkeyPatch, slow_moments: dict[int, float]
) -> None:
    # Threads using 1.85 of 2 cores, but the machine was busy for a moment: read over the
    # knobs' first second (or two windows, for a move with a large gain), they leave too
    # little for processes to pay.
    moves = gil_bound_decisions(
        monkeypatch, 2**32, [], process_cores=1.85, cpu=0.9, slow_moments=slow_moments
    )
    assert moves == []


@pytest.mark.parametrize("cpu", [0.6, 0.05])
def test_many_threads_started_for_a_first_call_that_waited_try_processes_if_they_compute(
    monkeypatch: pytest.MonkeyPatch, cpu: float
) -> None:
    # The first call waited (it opened a connection, say): the map started 64 threads. If
    # they then spend 60% of their time on the CPU although they contend for the GIL, the work
    # computes: processes are tried (and taken back here, where they do not pay). Spending
    # 5% of it there, they wait: threads they stay.
    moves = gil_bound_decisions(
        monkeypatch, 2**32, [], cpu=cpu, parallelism=64, solo_cpu_share=0.01
    )
    if cpu > 0.5:
        assert [(old, new) for old, new, _ in moves] == [(THREADS, PROCESSES), (PROCESSES, THREADS)]
    else:
        assert moves == []


def test_computing_threads_above_the_cores_are_shed_when_processes_are_not_an_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As above, but the function cannot go to processes: the 64 threads only contend for
    # the GIL, and fewer keep the same rate.
    moves = gil_bound_decisions(
        monkeypatch,
        2**32,
        [],
        cpu=0.6,
        parallelism=64,
        solo_cpu_share=0.01,
        processes=False,
        knob="parallelism",
    )
    assert moves and all(new < old for old, new, _ in moves), moves
    assert moves[-1][1] <= 8, moves


def test_waiting_is_told_from_threads_sharing_the_gil() -> None:
    waits = tuner_module.mostly_waits
    # 64 threads that sleep pay their hand-offs: 0.5 cores together, 1% each; alone it waits.
    assert waits(cpu_share=0.01, cores=0.5, solo_cpu_share=0.02)
    # 16 computing threads queue for the GIL: 6% each, about one core together.
    assert not waits(cpu_share=0.06, cores=0.95, solo_cpu_share=0.02)
    assert not waits(cpu_share=0.06, cores=0.5, solo_cpu_share=0.97)
    assert not waits(cpu_share=0.06, cores=0.5, solo_cpu_share=None)
    # Few threads using little CPU wait, whatever was measured alone.
    assert waits(cpu_share=0.05, cores=0.1, solo_cpu_share=None)
    assert not waits(cpu_share=0.9, cores=0.1, solo_cpu_share=0.02)


def waiting_stage_decisions(
    monkeypatch: pytest.MonkeyPatch,
    *,
    busy: float,
    idle: float,
    consumer_waits: float,
    process_cores: float,
    solo_cpu_share: float,
    cpu: float = 0.03,
) -> list[tuple[int, int, str]]:
    """The parallelism decisions on a synthetic stage of 16 threads whose workers spend
    ``busy`` of their time on calls (``cpu`` of it on the CPU) and ``idle`` blocked on a full
    buffer, its consumer waiting ``consumer_waits`` of the time, the process using
    ``process_cores`` and the machine leaving a core idle. It delivers at a fixed rate: every
    change gains nothing."""
    idle_clock = [0.0]
    process_cpu = [0.0]
    monkeypatch.setattr(tuner_module, "idle_cpu_seconds", lambda: idle_clock[0])
    monkeypatch.setattr(tuner_module.time, "process_time", lambda: process_cpu[0])
    synthetic, root, tuner, now = threads_tuner(16)
    synthetic.solo_cpu_share = solo_cpu_share
    m = synthetic.metrics
    for _ in range(8):
        now += 0.25
        idle_clock[0] += 0.25 * 1.0
        process_cpu[0] += 0.25 * process_cores
        workers = synthetic.knobs["parallelism"].value
        root.delivered += 1000
        root.wait += 0.25 * consumer_waits
        m.elements += 1000
        m.worked += 1000
        m.work_wall += 0.25 * workers * busy
        m.work_cpu += 0.25 * workers * busy * cpu
        m.consumer_wait += 0.25 * consumer_waits
        m.worker_idle += 0.25 * workers * idle
        tuner.step(now)
    return [(d.old, d.new, d.reason) for d in tuner.history if d.knob == "parallelism"]


@pytest.mark.parametrize(("process_cores", "grows"), [(0.6, True), (1.0, False)])
def test_threads_that_wait_while_the_gil_is_free_scale_past_what_a_first_call_suggested(
    monkeypatch: pytest.MonkeyPatch, process_cores: float, grows: bool
) -> None:
    # A fetch whose calls mostly compute a little and now and then wait long (a slow read):
    # its first call computed, and 16 threads at 3% each add up to 0.4 cores, as 16 threads
    # queueing for the GIL would. But a process using 0.6 cores leaves the GIL free 40% of
    # the time, on a machine with a core idle: they are not held by it, they wait. Using a
    # core, it may be the GIL: no more threads.
    moves = waiting_stage_decisions(
        monkeypatch,
        busy=0.9,
        idle=0.05,
        consumer_waits=0.9,
        process_cores=process_cores,
        solo_cpu_share=0.97,
    )
    grew = [new for old, new, _ in moves if new > old]
    assert bool(grew) == grows, moves
    if grew:
        assert grew[0] > 16, moves


@pytest.mark.parametrize("consumer_waits", [0.9, 0.2])
def test_workers_held_behind_the_oldest_element_get_more_calls_in_flight(
    monkeypatch: pytest.MonkeyPatch, consumer_waits: float
) -> None:
    # In order, one slow call holds the finished ones behind it: workers are blocked on the
    # full buffer most of the time while the consumer waits for that oldest element. More
    # calls in flight fill the wait, although the workers are not busy. With the consumer
    # waiting less than the workers idle, the two need not overlap: no more workers.
    moves = waiting_stage_decisions(
        monkeypatch,
        busy=0.3,
        idle=0.6,
        consumer_waits=consumer_waits,
        process_cores=0.3,
        solo_cpu_share=0.02,
    )
    grew = [new for old, new, _ in moves if new > old]
    assert bool(grew) == (consumer_waits > 0.5), moves


@pytest.mark.parametrize(("gil_free", "says"), [(True, "waits"), (False, "holds the GIL")])
def test_the_report_reads_threads_with_little_cpu_as_the_tuner_does(
    gil_free: bool, says: str
) -> None:
    # 96 threads of a fetch whose first call computed: 3% of their time on the CPU, 0.7 cores
    # together. The tuner saw the process leave the GIL free (or not): waiting (or the GIL).
    from feedline.observe.stats import find_bottleneck

    fetch = {
        "name": "map(fetch)",
        "knobs": {"parallelism": 96},
        "own_work": True,
        "elements": 10_000,
        "work_wall_s": 23.3,
        "input_wall_s": 0.1,
        "work_cpu_s": 0.7,
        "mean_ms": 2.3,
        "cpu_share": 0.03,
        "solo_cpu_share": 0.97,
        "consumer_wait_fraction": 0.5,
    }
    consumer = {"elements": 10_000, "elapsed_s": 1.0, "wait_s": 0.5, "stall_fraction": 0.5}
    stats = {"stages": [fetch], "consumer": consumer, "autotune": {"gil_free": gil_free}}
    assert says in find_bottleneck(stats)["advice"]
