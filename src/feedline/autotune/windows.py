"""Measuring: what a stage did between two readings of its ``StageMetrics``.

One computation serves the tuner (a window per tick), the timeline (a window between two
samples) and ``stats()`` (one window from the pass's start to now), so the rate, CPU share and
waits they show are the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

S = TypeVar("S")
W = TypeVar("W", bound="StageWindow[Any]")


@dataclass(frozen=True)
class Reading:
    """A stage's cumulative counters at one instant (see ``StageMetrics``); for an op made
    into several stages (one per epoch under ``repeat``), the sum of theirs."""

    elements: float = 0
    worked: float = 0
    work_wall: float = 0.0
    work_cpu: float = 0.0
    consumer_wait: float = 0.0
    worker_idle: float = 0.0
    input_wall: float = 0.0

    @classmethod
    def of(cls, snapshot: Mapping[str, float]) -> Reading:
        """The counters of one ``StageMetrics.snapshot()``."""
        return cls(*(snapshot[f.name] for f in fields(cls)))

    @classmethod
    def total(cls, snapshots: Iterable[Mapping[str, float]]) -> Reading:
        """The counters of several stages made for one op, added up."""
        sums = [0, 0, 0.0, 0.0, 0.0, 0.0, 0.0]
        for snapshot in snapshots:
            for i, f in enumerate(fields(cls)):
                sums[i] += snapshot[f.name]
        return cls(*sums)


@dataclass(frozen=True)
class StageWindow(Generic[S]):
    """What ``stage`` did between two readings (``between``). ``stage`` is what the reader
    measured: the tuner's stage, the timeline's sample of it."""

    stage: S
    seconds: float
    elements: float  # delivered in the window
    worked: float  # worked on (a full buffer draining delivers with no work)
    work_wall: float  # seconds of the stage's own work, all workers together
    input_wall: float  # seconds spent taking elements from its input
    rate: float  # elements delivered per second
    consumer_wait: float  # fraction of the window its consumer spent waiting for it
    busy: float  # fraction of worker time spent on the stage's own work
    # CPU time / wall time of that work (1: computing; ~0: waiting); None without work.
    cpu_share: float | None
    cores: float  # CPU seconds per second used by the stage's work, all workers together
    idle: float  # fraction of worker time spent blocked on a full buffer
    bytes_per_element: float
    seconds_per_element: float  # wall time of the stage's own work per element
    cpu_per_element: float  # CPU time of it: what would move to a worker process
    mean_ms: float  # seconds_per_element in milliseconds (computed as observers always have)

    @property
    def computing_share(self) -> float:
        """``cpu_share``, with a window that saw no work read as computing: the tuner takes
        nothing it did not see for waiting."""
        return 1.0 if self.cpu_share is None else self.cpu_share

    @classmethod
    def between(
        cls: type[W],
        stage: Any,
        before: Reading,
        now: Reading,
        seconds: float,
        workers: int = 1,
        bytes_per_element: float = 0.0,
        average_if_idle: bool = True,
    ) -> W:
        """The window from ``before`` to ``now``, ``seconds`` long, of a stage running
        ``workers`` workers. A window in which no element was worked on says nothing of the
        cost per element: with ``average_if_idle`` it is the average over all ``now`` covers
        (the tuner, stats()), else 0 (the timeline's time series shows no work). ``stage``
        is of the window's type parameter (a classmethod cannot say so on Python 3.10)."""
        work = now.work_wall - before.work_wall
        cpu = now.work_cpu - before.work_cpu
        # Elements worked on, not delivered: a full buffer draining delivers with no work.
        done = now.worked - before.worked
        if done > 0:
            per_element = work / done
            cpu_per_element = cpu / done
            mean_ms = 1000 * work / done
        elif average_if_idle:
            per_element = now.work_wall / max(1.0, now.worked)
            cpu_per_element = now.work_cpu / max(1.0, now.worked)
            mean_ms = 1000 * now.work_wall / max(1.0, now.worked)
        else:
            per_element = cpu_per_element = mean_ms = 0.0
        return cls(
            stage=stage,
            seconds=seconds,
            elements=now.elements - before.elements,
            worked=done,
            work_wall=work,
            input_wall=now.input_wall - before.input_wall,
            rate=(now.elements - before.elements) / seconds,
            # A wait is booked when it ends, so it can exceed this window: clamp.
            consumer_wait=min(1.0, (now.consumer_wait - before.consumer_wait) / seconds),
            busy=work / (seconds * workers),
            cpu_share=cpu / work if work > 0 else None,
            cores=cpu / seconds,
            # Workers let go during the window idled in it too: clamp.
            idle=min(1.0, (now.worker_idle - before.worker_idle) / (seconds * workers)),
            bytes_per_element=bytes_per_element,
            seconds_per_element=per_element,
            cpu_per_element=cpu_per_element,
            mean_ms=mean_ms,
        )
