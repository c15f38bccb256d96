"""The narrow interface between the runtime and the tuner.

Every asynchronous stage exposes the same things: its knobs (``parallelism``, ``buffer_size``),
each with bounds and a thread-safe setter that takes effect while the stage runs, and a
``StageMetrics`` record the stage updates as it works. The tuner reads metrics and writes knobs;
it never touches a stage otherwise, and stages never import the tuner. A tuned ``parallelism``
also draws from the pass's ``ThreadBudget``, whoever raises it (the stage's start choice or
the tuner).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Work per element below which handing elements between threads costs about as much as the
# work itself: such work is best done inline, in the consumer's thread.
CHEAP_WORK_SECONDS = 50e-6
# CPU time / wall time of work below which it is almost all waiting (I/O latency): such work
# is not bound by the cores, and is given many workers at once.
PURE_WAITING_SHARE = 0.1
# A read-ahead stage (a prefetch) reading on a thread overlaps its consumer's own work with
# pulling the input. That pays only when the consumer works at least this long between two
# calls: shorter, and the two threads only hand the GIL back and forth ...
READ_AHEAD_MIN_GAP_SECONDS = 0.5e-3
# ... and spends at least this share of its time on its own work (the most the overlap gains) ...
READ_AHEAD_WORTH_SHARE = 0.08
# ... and waits for the stage at least this share of the time: below it the consumer is
# served (a consumer that sleeps pays some waiting for the GIL on every wake-up, whatever
# the pipeline does) ...
SERVED_WAIT_SHARE = 0.006
# ... or at least this long a call: twice what taking a ready element from a thread costs
# (12-15 us median after a 10 ms step, against 35-41 us for batching 64 elements inline).
READ_AHEAD_PULL_SECONDS = 30e-6
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
        # Set for a tuned stage's parallelism: raising it draws from the pass's threads.
        self.budget: ThreadBudget | None = None
        # Why the stage set the knob back itself and fixed it there (a move it cannot make).
        self.refusal: str | None = None

    @property
    def value(self) -> int:
        return self._value

    def set(self, value: int) -> int:
        """Clamp ``value`` to the bounds (a raise, also to what the thread budget leaves),
        apply it, and return what was applied."""
        value = max(self.minimum, min(self.maximum, int(value)))
        old = self._value
        if value > old and self.budget is not None:
            value = self.budget.raise_to(self, value)
        else:
            self._value = value
        if value != old and self._on_change is not None:
            self._on_change()
        return value

    def refuse(self, value: int, reason: str) -> None:
        """The stage cannot run at the value set: it goes back to ``value`` for good, and
        ``reason`` tells the tuner, which set it, why."""
        self._value, self.tunable, self.refusal = value, False, reason

    def most(self) -> int:
        """The highest value ``set`` would apply now."""
        if self.budget is None:
            return self.maximum
        return max(self._value, min(self.maximum, self.budget.room(self)))

    def __repr__(self) -> str:
        return f"Knob({self.name}={self._value} in [{self.minimum}, {self.maximum}])"


class ThreadBudget:
    """The worker threads one pass may run, all its stages together.

    A stage holds its ``parallelism`` in threads, or more while workers it let go are still
    alive (parked, to be taken back). Raising a tuned stage's parallelism (a knob given this
    budget) applies at most what the other stages leave, read and applied under one lock, so
    stages choosing at once (an interleave's datasets, each on a thread of its own) cannot
    overdraw it. A stage whose parallelism the user fixed runs what was asked for, and leaves
    the tuned ones that much less.
    """

    def __init__(self, limit: int, stages: Callable[[], list[Tunable]]) -> None:
        self.limit = limit
        self._stages = stages  # the pass's stages now
        self._threads: dict[Tunable, list[threading.Thread]] = {}
        self._lock = threading.Lock()
        self.peak = 0  # the most worker threads alive at once, for the report

    def attach(self, stage: Tunable) -> None:
        """``stage`` joins the pass: a tuned parallelism draws from the budget from now on,
        and keeps a value it starts with (what an earlier stage of its op reached) only as far
        as it fits."""
        knob = stage.knobs.get("parallelism")
        if knob is None or not knob.tunable or stage.tuned_by_itself:
            return
        with self._lock:
            knob.budget = self
            knob._value = max(knob.minimum, min(knob._value, self._room(knob)))

    def track(self, stage: Tunable, thread: threading.Thread) -> None:
        """``thread`` works for ``stage``: it counts until it ends, the stage closed or not."""
        with self._lock:
            self._threads.setdefault(stage, []).append(thread)
            alive = sum(1 for threads in self._threads.values() for t in threads if t.is_alive())
            self.peak = max(self.peak, alive)

    def in_use(self) -> int:
        with self._lock:
            return sum(self._held().values())

    def room(self, knob: Knob) -> int:
        """The most threads the stage of ``knob`` may hold: what the other stages leave."""
        with self._lock:
            return self._room(knob)

    def start_share(self, stage: Tunable) -> int:
        """What a tuned stage choosing its first parallelism may take: an equal part of what
        is left with the stages still to choose, keeping as much again for the tuner and for
        stages made later (an interleave opens its datasets' stages as it goes)."""
        with self._lock:
            choosing = sum(1 for s in self._stages() if _choosing(s)) or 1
            return self._room(stage.knobs["parallelism"]) // (choosing + 1)

    def parked_elsewhere(self, knob: Knob) -> list[Tunable]:
        """The other stages holding more threads than their parallelism: workers let go and
        kept at hand for a while, which the stage of ``knob`` could use."""
        with self._lock:
            return [
                stage
                for stage, n in self._held().items()
                if stage.knobs.get("parallelism") not in (None, knob)
                and n > stage.knobs["parallelism"].value
            ]

    def raise_to(self, knob: Knob, value: int) -> int:
        """Raise ``knob`` towards ``value`` as far as the budget allows; what was applied."""
        with self._lock:
            value = max(knob._value, min(value, self._room(knob)))
            knob._value = value
            return value

    def _held(self) -> dict[Tunable, int]:
        held: dict[Tunable, int] = {}
        for stage, threads in list(self._threads.items()):
            alive = [t for t in threads if t.is_alive()]
            if alive:
                self._threads[stage] = alive
                held[stage] = len(alive)
            else:
                del self._threads[stage]
        for stage in self._stages():
            knob = stage.knobs.get("parallelism")
            if knob is not None and not stage.tuned_by_itself:  # actors are no threads
                held[stage] = max(held.get(stage, 0), knob.value)
        return held

    def _room(self, knob: Knob) -> int:
        held = self._held().items()
        others = sum(n for stage, n in held if stage.knobs.get("parallelism") is not knob)
        return max(0, self.limit - others)


def _choosing(stage: Tunable) -> bool:
    """A tuned stage that may run many workers and has not chosen how many to start with."""
    knob = stage.knobs.get("parallelism")
    return (
        knob is not None
        and knob.tunable
        and knob.maximum > 1
        and knob.value == 0
        and stage.start_choice is None
    )


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
    # A stage that sets its own ``parallelism`` knob (a distributed stage's actors, whose
    # start takes longer than the tuner's trials): the tuner's rules leave it alone, its
    # knob draws nothing from the thread budget, and ``events`` (what it decided, and why,
    # in order) go into the history.
    tuned_by_itself: bool = False
    events: Sequence[StartChoice] = ()

    def release_parked(self) -> None:
        """End at once the workers it let go and keeps at hand (see ThreadBudget); by default
        it keeps none."""

    def workers_detail(self) -> list[dict[str, Any]]:
        """Rows the report shows under the stage, one per worker that has a life of its own
        (a distributed stage's actors: node, rate, busy share); none for threads."""
        return []

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
