"""Load changes on real pipelines: the tuner's decisions after each change, never its speed
(a loaded machine slows everything; the decisions it must reach do not depend on that)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.autotune.helpers import consume_for, consume_until, stage

D = fl.Dataset


class Load:
    """What the map's function reads as it runs: the test changes it between phases."""

    io_seconds = 0.0


def pipeline(load: Load) -> fl.Dataset:
    angles = np.arange(64.0)

    def decode(i: Any) -> Any:
        if load.io_seconds:
            time.sleep(load.io_seconds)
        return np.sin(angles * int(i))

    ds = D.range(10**9).map(decode, num_parallel_calls=fl.AUTOTUNE, executor="thread")
    return ds.batch(32).prefetch(fl.AUTOTUNE)


@pytest.mark.timeout(90)
def test_a_map_that_turns_io_bound_gets_calls_in_flight() -> None:
    load = Load()
    with pipeline(load).iterator() as it:
        consume_for(it, 1.5)  # cheap: inline or a few workers
        load.io_seconds = 0.002
        changed = time.perf_counter() - it.started
        parallelism = stage(it, "map").knobs["parallelism"]
        grew = consume_until(it, lambda: parallelism.value >= 8, seconds=30)
        history = it.stats()["autotune"]["history"]
    assert grew, history
    # However long the machine let it take, it got there in a few steps, not one by one.
    steps = [
        d
        for d in history
        if d["knob"] == "parallelism" and d["new"] > d["old"] and d["time"] >= changed
    ]
    assert len(steps) <= 3, history


@pytest.mark.timeout(90)
def test_a_map_that_turns_cheap_lets_its_workers_go() -> None:
    load = Load()
    load.io_seconds = 0.002
    with pipeline(load).iterator() as it:
        parallelism = stage(it, "map").knobs["parallelism"]
        assert consume_until(it, lambda: parallelism.value >= 8, seconds=30)
        grown = parallelism.value
        load.io_seconds = 0.0
        shrank = consume_until(it, lambda: parallelism.value <= grown // 2, seconds=40)
        history = it.stats()["autotune"]["history"]
    assert shrank, history
