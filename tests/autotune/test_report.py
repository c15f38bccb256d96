"""What users see of AUTOTUNE: decisions logged and recorded, and the report's bottleneck and
advice, read by the same signs the tuner acts on."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.runtime.tunable import THREADS
from tests.autotune.helpers import D, consume_for, latency, with_autotune


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
