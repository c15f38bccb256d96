"""What the autotune tests share: driving a real pipeline until the tuner decides, and
synthetic stages whose metrics a test writes, under a tuner whose clock the test moves on."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.autotune import tuner as tuner_module
from feedline.autotune import windows as windows_module
from feedline.autotune.budget import Budget
from feedline.autotune.tuner import RootCounters
from feedline.runtime.context import WorkerMemory
from feedline.runtime.tunable import PROCESSES, THREADS, Knob, StageMetrics, ThreadBudget, Tunable

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


class OtherLoad:
    """The cores other processes kept busy from its start until ``cores()``: what this
    process sees as its own threads contending is partly them."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._started = (time.monotonic(), self._busy(), self._mine())

    def _busy(self) -> float:
        import psutil

        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def _mine(self) -> float:
        mine = self._me.cpu_times()
        return float(mine.user + mine.system + mine.children_user + mine.children_system)

    def cores(self) -> float:
        started, busy, mine = self._started
        span = max(time.monotonic() - started, 1e-9)
        return max(0.0, (self._busy() - busy) - (self._mine() - mine)) / span


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


def synthetic_tuner(
    stages: list[Tunable],
    cpu: float = 2.0,
    ram: int = 2**30,
    workers: Callable[[], list[WorkerMemory]] = list,
) -> tuple[RootCounters, Any, float]:
    """A tuner on ``stages`` (``cpu`` cores, ``ram`` bytes, worker processes ``workers``):
    its root counters, the tuner, and its clock, which the test moves on."""
    root = RootCounters()
    now = time.perf_counter()
    tuner = tuner_module.Tuner(lambda: stages, root, Budget(cpu=cpu, ram=ram), now, workers)
    return root, tuner, now


def threads_tuner(
    parallelism: int, cpu: float = 2.0
) -> tuple[SyntheticStage, RootCounters, Any, float]:
    """A tuner (``cpu`` cores, 1 GiB) on one synthetic stage of ``parallelism`` threads that
    may not move to processes; its root counters, and the tuner's clock, which the test moves
    on."""
    synthetic = SyntheticStage()
    synthetic.knobs["parallelism"].set(parallelism)
    synthetic.knobs["executor"].tunable = False
    root, tuner, now = synthetic_tuner([synthetic], cpu=cpu)
    return synthetic, root, tuner, now


def read_ahead_history(
    monkeypatch: pytest.MonkeyPatch, speedup: float, others: list[Tunable] | None = None
) -> list[tuple[int, int, str]]:
    """The tuner's decisions on a synthetic prefetch whose consumer works half the time, 5 ms
    an element, and waits the other half for its input pulled inline. On a thread, the two
    overlap: the rate rises by ``speedup`` (the consumer then waits less). ``others``: more
    stages of the pass, which share a thread budget of 1 with it."""
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
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
    root, tuner, now = synthetic_tuner([prefetch])
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
