"""Measuring: what a stage did between two readings of its ``StageMetrics``.

One computation serves the tuner (a window per tick), the timeline (a window between two
samples) and ``stats()`` (one window from the pass's start to now), so the rate, CPU share and
waits they show are the same numbers. ``TunerReadings`` keeps the tuner's readings from one
window to the next, and says when a window is long enough to judge.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from feedline.autotune.constants import LATENCIES_PER_WINDOW, SETTLE_ELEMENTS
from feedline.runtime.machine import cpu_seconds_of, idle_cpu_seconds
from feedline.runtime.process.spawn import forkserver_pid
from feedline.runtime.tunable import Tunable

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


# Each stage's ``StageMetrics.snapshot()`` at one tick, by the key of the op it runs.
Snapshots = Mapping[object, tuple[Tunable, Mapping[str, float]]]


class TunerReadings:
    """The tuner's readings: each op's counters at the last window's end, and the stage
    running each op (one made anew for the same op, the next epoch under ``repeat``, starts
    its counters from zero: it is measured from its start)."""

    def __init__(self) -> None:
        self._previous: dict[object, Mapping[str, float]] = {}
        self._stage_objects: dict[object, Tunable] = {}
        self._remade: set[object] = set()  # ops whose stage was made anew in this window

    def follow(self, snapshots: Snapshots) -> tuple[list[Tunable], list[Tunable]]:
        """The stages not seen at the last tick, and those of them made anew for an op
        already measured."""
        new: list[Tunable] = []
        remade: list[Tunable] = []
        for key, (stage, _) in snapshots.items():
            known = self._stage_objects.get(key)
            if known is not stage:
                new.append(stage)
                if known is not None:
                    self._previous.pop(key, None)
                    self._remade.add(key)
                    remade.append(stage)
            self._stage_objects[key] = stage
        return new, remade

    def complete(
        self,
        seconds: float,
        root_moved: int,
        snapshots: Snapshots,
        shortest: float,
        longest: float,
        tested: object | None = None,
    ) -> bool:
        """Whether a window ``seconds`` long is long enough to judge: ``longest`` always is;
        else at least ``shortest`` (and a few of the ``tested`` stage's per-element times)
        in which the root or one stage moved a few elements."""
        if seconds >= longest:
            return True
        if tested is not None and tested in snapshots:
            now = snapshots[tested][1]
            before = self._previous.get(tested, {})
            work = now["work_wall"] - before.get("work_wall", 0.0)
            done = now["worked"] - before.get("worked", 0.0)
            if done > 0:
                shortest = max(shortest, LATENCIES_PER_WINDOW * work / done)
        if seconds < shortest:
            return False
        moved = max(
            [root_moved]
            + [
                now["elements"] - self._previous.get(key, {}).get("elements", 0.0)
                for key, (_, now) in snapshots.items()
            ]
        )
        return moved >= SETTLE_ELEMENTS

    def windows(self, seconds: float, snapshots: Snapshots) -> list[StageWindow[Tunable]]:
        """Each stage's window since the last call (none for a stage made within it: its
        window began before it existed), and the readings move on to now."""
        out: list[StageWindow[Tunable]] = []
        for key, (stage, now) in snapshots.items():
            before = self._previous.get(key)
            self._previous[key] = now
            if key in self._remade:
                continue
            out.append(
                StageWindow.between(
                    stage,
                    Reading.of(before) if before is not None else Reading(),
                    Reading.of(now),
                    seconds,
                    workers=max(1, stage.knobs["parallelism"].value),
                    bytes_per_element=now["bytes_per_element"],
                )
            )
        self._remade.clear()
        return out


class FreeCpu:
    """CPU seconds free for the run, added up: the machine's idle time, and the time the
    run's own worker processes (and the process they fork from) used. Those are not other
    programs taking the cores: the forkserver started for a move to processes still being
    read (its imports take a core for half a second) made the move look unable to get
    cores, and a GIL-bound map stayed on threads a second longer (2.7k elements/s against
    4.1k over a 2 s run, in 2 runs of 5)."""

    def __init__(self) -> None:
        self._workers = 0.0  # the workers' CPU seconds at the last reading
        self._workers_added = 0.0  # their increases, added up (an ended worker's go with it)

    def read(self, idle: float | None, workers_cpu: float) -> float | None:
        """The free seconds so far, from the machine's idle seconds (None if unknown) and the
        CPU seconds of the worker processes running now."""
        self._workers_added += max(0.0, workers_cpu - self._workers)
        self._workers = workers_cpu
        return None if idle is None else idle + self._workers_added


class CpuReadings:
    """The process's CPU use and the cores left to it, over the tuner's last window and
    since its knobs last changed."""

    def __init__(self, started: float) -> None:
        self._free = FreeCpu()
        self._process = time.process_time()
        self._idle = idle_cpu_seconds()
        self._free_seconds = self._free.read(self._idle, 0.0)
        # When the knobs last changed: tuner clock, process CPU seconds, free CPU seconds.
        self._knobs_set_at = (started, self._process, self._free_seconds)
        self.cores_in_use = 0.0  # the whole process's CPU use over the last window
        self.idle_cores: float | None = None  # cores left idle over it, if known
        self.free_cores: float | None = None  # ... or used by the run's worker processes

    def read(self, now: float, dt: float, workers_cpu: float, knobs_changed: bool) -> None:
        """A window ``dt`` long ended at ``now``; ``workers_cpu``: CPU seconds of the run's
        worker processes running now; ``knobs_changed``: a decision was made in it."""
        process = time.process_time()
        self.cores_in_use = (process - self._process) / dt
        idle = idle_cpu_seconds()
        helpers = cpu_seconds_of(pid for pid in [forkserver_pid()] if pid is not None)
        free = self._free.read(idle, helpers + workers_cpu)
        if knobs_changed:
            self._knobs_set_at = (now, process, free)
        if idle is not None and self._idle is not None:
            self.idle_cores = (idle - self._idle) / dt
        if free is not None and self._free_seconds is not None:
            self.free_cores = (free - self._free_seconds) / dt
        self._process, self._idle, self._free_seconds = process, idle, free

    def held(self, now: float) -> tuple[float, float, float | None]:
        """Since the knobs last changed: how long, the cores the process used (at least as
        many as over the last window), and the cores free for it (at most as many)."""
        since, cpu_since, free_since = self._knobs_set_at
        span = now - since
        cores, free = self.cores_in_use, self.free_cores
        if span > 0:
            cores = max(cores, (self._process - cpu_since) / span)
            if free is not None and free_since is not None and self._free_seconds is not None:
                # Free over the whole span, not only in its last window: other processes
                # that pause now and then free the cores for a window, and a map that
                # releases the GIL but lost cores to them read as one the GIL holds.
                free = min(free, (self._free_seconds - free_since) / span)
        return span, cores, free
