"""The direction of AUTOTUNE's decisions on real pipelines, run against the wall clock.

These tests check where the knobs went, never how fast anything ran. How soon the tuner gets
there depends on the machine and what else runs on it: tests wait for a decision
(``consume_until``, with a generous limit) rather than look after a fixed time; whether a change
pays is judged on synthetic measurements (test_experiments.py), where the test sets what it
gains.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.autotune import windows as windows_module
from feedline.autotune.constants import LONG_WINDOW
from feedline.runtime.machine import idle_cpu_seconds, usable_cores
from feedline.runtime.tunable import PROCESSES, THREADS, StageMetrics
from tests.autotune.helpers import (
    D,
    OtherLoad,
    consume_for,
    consume_until,
    decisions,
    latency,
    stage,
    with_autotune,
)
from tests.helpers import assert_elements_equal


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


# Other processes using more than this many cores make a GIL-bound and a loaded machine look
# alike to the tuner.
BUSY_MACHINE_CORES = 0.25
needs_two_cores = pytest.mark.skipif(usable_cores() < 2, reason="processes need 2 cores to pay")


@needs_two_cores
@pytest.mark.timeout(120)
def test_a_gil_bound_map_moves_to_processes_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cloudpickle")
    # Other processes (other tests, on a shared machine) may keep the cores busy, which
    # rightly stops the move: here the machine's cores count as free. Whether the move is kept
    # depends on what it gains on the machine: synthetic tests judge that.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    ds = D.range(10**6).map(python_work, num_parallel_calls=fl.AUTOTUNE).batch(16)
    with ds.prefetch(fl.AUTOTUNE).iterator() as it:
        moved = consume_until(it, lambda: (THREADS, PROCESSES) in decisions(it, "map", "executor"))
        assert moved, it.stats()["autotune"]["history"]


@needs_two_cores
@pytest.mark.timeout(90)
def test_a_map_that_releases_the_gil_stays_on_threads() -> None:
    others = OtherLoad()
    ds = D.range(10**6).map(numpy_work, num_parallel_calls=fl.AUTOTUNE).batch(16)
    with ds.prefetch(fl.AUTOTUNE).iterator() as it:
        consume_for(it, 4.0)
        # A trial of processes under way is no verdict yet: it settles, then is measured,
        # over LONG_WINDOW each.
        executor = stage(it, "map").knobs["executor"]
        if executor.value == PROCESSES:
            consume_for(it, 2 * LONG_WINDOW + 1.0)
        history = it.stats()["autotune"]["history"]
        kept = executor.value
    if kept == PROCESSES and others.cores() > BUSY_MACHINE_CORES:
        # Cores other processes took look like the GIL from inside, and threads did lose
        # them: whether processes then gain is the machine's to say, not this test's.
        pytest.skip(f"other processes kept {others.cores():.2f} cores busy: {history}")
    assert kept == THREADS, history


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


def test_cpu_the_runs_own_processes_use_counts_as_free() -> None:
    from feedline.autotune.windows import FreeCpu

    free = FreeCpu()
    assert free.read(None, 0.0) is None  # the machine's idle time unknown
    assert free.read(10.0, 0.0) == pytest.approx(10.0)
    # The forkserver starting up took 0.4 s of the 0.5 s the machine was not idle for.
    assert free.read(10.1, 0.4) == pytest.approx(10.5)
    # A worker that ended takes its seconds out of the sum: nothing is taken back.
    assert free.read(10.2, 0.1) == pytest.approx(10.6)
    assert free.read(10.2, 0.3) == pytest.approx(10.8)


@pytest.mark.timeout(60)
def test_cpu_seconds_of_running_processes() -> None:
    from feedline.runtime.machine import cpu_seconds_of

    code = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", code + "input()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while cpu_seconds_of([busy.pid]) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_seconds_of([busy.pid]) >= 0.3
    finally:
        busy.communicate(b"\n", timeout=30)
    assert cpu_seconds_of([busy.pid]) == 0.0  # ended: counts nothing
