"""What every iterator of one pipeline run shares."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from feedline.options import Options, ResolvedOptions
from feedline.runtime.machine import cpu_seconds_of
from feedline.runtime.tunable import ThreadBudget

if TYPE_CHECKING:
    from feedline.runtime.tunable import Tunable


class WorkerPoolView(Protocol):
    """What the run needs to see of a pool of worker processes (``runtime/process/``)."""

    name: str

    @property
    def closed(self) -> bool: ...

    def pids(self) -> list[int]: ...

    def rss_bytes(self) -> int: ...


@dataclass(frozen=True)
class WorkerMemory:
    stage: str  # the stage whose work the processes run
    processes: int
    rss_bytes: int  # their resident memory, sampled at most every half second
    cpu_seconds: float = 0.0  # CPU time they have used (those running now)


class IterContext:
    """Per-run settings and the registry of the run's tunable stages.

    Created once per top-level iterator and passed down to every node; the tuner and
    ``stats()`` find the stages here.
    """

    def __init__(
        self, options: Options | None = None, probe: bool = False, in_order: bool = False
    ) -> None:
        self.options = ResolvedOptions.of(options or Options())
        # Every stage delivers in input order, even one given deterministic=False (which
        # allows that order): an interleave slot's dataset in a worker process, whose states
        # reach the parent as copies that cannot go on recording a finishing order
        # (runtime/replay.py), so a restore could not replay it.
        self.in_order = in_order
        # A probe pass only looks (e.g. at the first element, for a spec): it must not use up
        # anything a real pass would see, such as a shuffle's run number.
        self.probe = probe
        self._stages: list[Tunable] = []
        self._tuned: dict[object, dict[str, int]] = {}
        self._retired: list[Tunable] = []
        self._closers: list[Callable[[], None]] = []
        self._worker_pools: list[WorkerPoolView] = []
        self._notes: dict[str, None] = {}  # insertion-ordered, each line once
        self._lock = threading.Lock()
        # One budget for every stage of the pass, nested ones (an interleave's) included.
        self.threads = ThreadBudget(self.options.thread_budget, self.stages)

    def register(self, stage: Tunable) -> None:
        with self._lock:
            self._stages.append(stage)
        self.threads.attach(stage)

    def unregister(self, stage: Tunable) -> None:
        """A closed stage leaves the tuner's view; what it measured stays in ``retired``."""
        with self._lock:
            if stage in self._stages:
                self._stages.remove(stage)
                self._retired.append(stage)

    def stages(self) -> list[Tunable]:
        with self._lock:
            return list(self._stages)

    def all_stages(self) -> list[Tunable]:
        """Every stage this run made, closed ones included (for stats)."""
        with self._lock:
            return self._retired + self._stages

    def add_worker_pool(self, pool: WorkerPoolView) -> None:
        with self._lock:
            self._worker_pools = [p for p in self._worker_pools if not p.closed] + [pool]

    def worker_memory(self) -> list[WorkerMemory]:
        """The run's worker processes now, per pool: they count in the RAM budget and in
        ``stats()``."""
        with self._lock:
            pools = [p for p in self._worker_pools if not p.closed]
        memory = []
        for pool in pools:
            pids = pool.pids()
            cpu = cpu_seconds_of(pids)
            memory.append(WorkerMemory(pool.name, len(pids), pool.rss_bytes(), cpu))
        return memory

    def note(self, line: str) -> None:
        """A line for the run's report: something an op fixed when the dataset was built
        (a batch-size schedule, a rank's share of the data), which no stage's knobs show."""
        with self._lock:
            self._notes[line] = None

    def notes(self) -> list[str]:
        with self._lock:
            return list(self._notes)

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run ``closer`` when the run ends (resources shared by its stages: worker pools)."""
        with self._lock:
            self._closers.append(closer)

    def close(self) -> None:
        with self._lock:
            closers, self._closers = self._closers, []
        for closer in closers:
            with contextlib.suppress(Exception):  # one failing closer must not skip the rest
                closer()

    def remember(self, key: object, knobs: dict[str, int]) -> None:
        """Knob values tuned for the op ``key``, for stages made for it later in this run."""
        with self._lock:
            self._tuned[key] = dict(knobs)

    def remembered(self, key: object) -> dict[str, int]:
        with self._lock:
            return dict(self._tuned.get(key, {}))
