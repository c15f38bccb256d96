"""The narrow interface between the runtime and the tuner.

Every asynchronous stage exposes the same things: its knobs (``parallelism``, ``buffer_size``),
each with bounds and a thread-safe setter that takes effect while the stage runs, and a
``StageMetrics`` record the stage updates as it works. The tuner reads metrics and writes knobs;
it never touches a stage otherwise, and stages never import the tuner.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Work per element below which handing elements between threads costs about as much as the
# work itself: such work is best done inline, in the consumer's thread.
CHEAP_WORK_SECONDS = 50e-6
# CPU time / wall time of work below which it is almost all waiting (I/O latency): such work
# is not bound by the cores, and is given many workers at once.
PURE_WAITING_SHARE = 0.1
# Knob values of ``executor``: where a stage's function runs.
THREADS, PROCESSES = 0, 1


class Knob:
    """One tunable integer with bounds; ``on_change`` lets the stage react at once."""

    def __init__(
        self,
        name: str,
        value: int,
        minimum: int,
        maximum: int,
        tunable: bool,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.minimum = minimum
        self.maximum = maximum
        self.tunable = tunable
        self._value = max(minimum, min(maximum, value))
        self._on_change = on_change

    @property
    def value(self) -> int:
        return self._value

    def set(self, value: int) -> int:
        """Clamp ``value`` to the bounds, apply it, and return what was applied."""
        value = max(self.minimum, min(self.maximum, int(value)))
        if value != self._value:
            self._value = value
            if self._on_change is not None:
                self._on_change()
        return value

    def __repr__(self) -> str:
        return f"Knob({self.name}={self._value} in [{self.minimum}, {self.maximum}])"


@dataclass
class StageMetrics:
    """Counters a stage accumulates; readers take differences between two snapshots.

    Times are seconds. ``work_wall``/``work_cpu`` cover the stage's own work (the user
    function, or pulling the input for a prefetch) on ``worked`` elements, which can run ahead
    of the ``elements`` delivered by a buffer's worth, or lag behind them while a full buffer
    drains; ``consumer_wait`` is time the consumer spent
    blocked waiting for this stage; ``worker_idle`` is time workers spent waiting for buffer
    space (the consumer is slower than the stage); ``input_wall`` is time a stage with work of
    its own spent taking elements from its input (a slow source shows there, not in the work).
    Worker processes' memory is the run's, in
    ``IterContext.worker_memory``.
    """

    elements: int = 0
    worked: int = 0
    chunks: int = 0
    work_wall: float = 0.0
    work_cpu: float = 0.0
    consumer_wait: float = 0.0
    worker_idle: float = 0.0
    input_wall: float = 0.0
    buffered_elements: int = 0
    buffered_bytes: int = 0
    bytes_per_element: float = 0.0
    errors: int = 0
    # When the consumer's wait in progress began (None: not waiting). Snapshots count it, so a
    # long wait shows in the window it happens in, not only in the one where it ends.
    consumer_waiting_since: float | None = None
    # When each waiting worker began to wait for buffer space, by worker index: counted by
    # snapshots too, as workers that wait long (one is woken per chunk retired) are the idle ones.
    workers_idle_since: dict[int, float] = field(default_factory=dict, repr=False)
    # Recent per-element work times (one sample per chunk), for percentiles in stats().
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=512), repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            now = time.perf_counter()
            since = self.consumer_waiting_since
            in_progress = 0.0 if since is None else now - since
            idle_in_progress = sum(now - t for t in self.workers_idle_since.values())
            return {
                "elements": self.elements,
                "chunks": self.chunks,
                "worked": self.worked,
                "work_wall": self.work_wall,
                "work_cpu": self.work_cpu,
                "consumer_wait": self.consumer_wait + in_progress,
                "worker_idle": self.worker_idle + idle_in_progress,
                "input_wall": self.input_wall,
                "buffered_elements": self.buffered_elements,
                "buffered_bytes": self.buffered_bytes,
                "bytes_per_element": self.bytes_per_element,
                "errors": self.errors,
            }

    def start_wait(self) -> float:
        """The consumer starts waiting for this stage; returns when, for ``end_wait``."""
        started = time.perf_counter()
        self.consumer_waiting_since = started  # one store: snapshots read it under the lock
        return started

    def end_wait(self, started: float, delivered: int = 0, cpu: float = 0.0) -> float:
        """The wait begun at ``started`` is over; returns how long it lasted. With
        ``delivered``: the wait was the stage's own work on that many elements, done in the
        consumer's thread (inline), using ``cpu`` seconds of CPU."""
        waited = time.perf_counter() - started
        with self.lock:
            self.consumer_wait += waited
            self.consumer_waiting_since = None
            if delivered:
                self.elements += delivered
                self.worked += delivered
                self.work_wall += waited
                self.work_cpu += cpu
                self.recent.append(waited / delivered)
        return waited

    def start_idle(self, worker: int) -> None:
        """Worker ``worker`` starts waiting for buffer space."""
        with self.lock:
            self.workers_idle_since[worker] = time.perf_counter()

    def end_idle(self, worker: int) -> None:
        with self.lock:
            since = self.workers_idle_since.pop(worker, None)
            if since is not None:
                self.worker_idle += time.perf_counter() - since

    def add_work(self, elements: int, wall: float, cpu: float, input_wall: float = 0.0) -> None:
        """``elements`` worked on in ``wall`` seconds (``cpu`` of CPU), after ``input_wall``
        seconds taking them from the input."""
        with self.lock:
            self.worked += elements
            self.work_wall += wall
            self.work_cpu += cpu
            self.input_wall += input_wall
            if elements:
                self.recent.append(wall / elements)


@dataclass(frozen=True)
class StartChoice:
    """A knob a stage set itself from its first calls, before the tuner's first window."""

    at: float  # time.perf_counter() when made
    knob: str
    old: int
    new: int
    reason: str


class Tunable:
    """What a tunable stage offers the tuner (and stats): a name, knobs and metrics.

    ``key`` identifies the op the stage runs, and stays the same when a stage is made again
    (each epoch under ``repeat``), so what was tuned carries over; ``chunk_size`` is how many
    elements a worker takes at once.
    """

    name: str
    key: object
    knobs: dict[str, Knob]
    metrics: StageMetrics
    max_buffer_bytes: int  # finished results a stage may hold before its workers pause
    # CPU time / wall time of the stage's work when it ran without other workers contending
    # for the GIL (inline or alone): what the work itself is, computing (~1) or waiting (~0).
    # None until measured.
    solo_cpu_share: float | None
    # Shown in the tuning history with the tuner's own decisions.
    start_choice: StartChoice | None = None

    @property
    def chunk_size(self) -> int:
        raise NotImplementedError

    def projected_bytes(
        self, parallelism: int | None = None, buffer_size: int | None = None
    ) -> float:
        """Bytes the stage may hold with these knob values (its current ones by default)."""
        raise NotImplementedError

    @property
    def has_own_work(self) -> bool:
        """False when the stage's work time is only waiting on its input (a prefetch)."""
        raise NotImplementedError

    def expect_processes(self) -> None:
        """The tuner is reading whether to move this stage's work to processes: get what the
        move needs ready, so it is quick if it comes. Changes nothing the stage does."""
