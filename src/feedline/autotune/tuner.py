"""The tuner: watches a running pipeline and moves its knobs, one experiment at a time.

It reads only ``StageMetrics`` (per stage) and the root's delivery counters, and writes only
``Knob``s, through ``runtime/tunable.py``; it knows nothing of ops.

How it decides (every tick; ticks are frequent at first and slow down once nothing changes):

- The objective is the rate at which the consumer receives elements. When the consumer waits
  for the pipeline (it *stalls*), the pipeline is the bottleneck: the tuner scales the stage
  its consumer waits on most, among those whose workers are busy doing their own work (or
  blocked behind the oldest element, a slow call that holds the finished ones in order).
  A stage that mostly *waits* (wall time far above CPU time, e.g. I/O latency) doubles its
  parallelism, past the core count, within the RAM budget; a stage that computes adds one
  worker at a time, within the CPU budget.
- Each change is an experiment: after a settling window the tuner compares the rate with the
  rate before. A gain is kept (and, for a scale-up, followed by another step). No gain from a
  scale-up is reverted, and the stage is marked saturated there — e.g. a pure-Python function
  holding the GIL — after which the tuner tries *fewer* workers, down to zero (the function
  then runs inline in the consumer's thread, with no hand-off cost at all), keeping every
  decrease that does not cost rate.
- When the consumer never stalls, the pipeline is faster than needed: the tuner shrinks
  what sits idle (workers blocked on a full buffer, buffers that stay full), reverting any
  shrink that makes the consumer stall.
- A shift in the consumer's rate or stall (a training step that slows down or speeds up)
  clears the saturation marks and makes ticks frequent again.

Every decision is recorded with its reason and logged at DEBUG on ``feedline.autotune``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from feedline.autotune.budget import Budget, format_bytes
from feedline.runtime.context import WorkerMemory
from feedline.runtime.machine import idle_cpu_seconds, rss_of
from feedline.runtime.tunable import (
    CHEAP_WORK_SECONDS,
    PROCESSES,
    PURE_WAITING_SHARE,
    Knob,
    Tunable,
)

logger = logging.getLogger("feedline.autotune")
# What users must see even with the tuner's own log quiet: a budget that cannot be kept.
warnings_logger = logging.getLogger("feedline")

FIRST_INTERVAL = 0.05
MAX_INTERVAL = 1.0
MIN_WINDOW = 0.15  # a measuring window lasts at least this long ...
LATENCIES_PER_WINDOW = 3  # ... and this many per-element times of the stage under test ...
SETTLE_ELEMENTS = 8  # ... and sees this many elements move (at the root or one stage) ...
MAX_WINDOW = 2.0  # ... unless it has lasted this long: then it is judged on what it saw
STALL = 0.01  # the consumer stalls when it waits more than this fraction of the time
NO_STALL = 0.006  # ... and is served comfortably below this (a consumer that sleeps pays
# some waiting for the GIL on every wake-up, whatever the pipeline does)
STALL_RISE = 0.005  # a decrease that raises the stall by more than this is taken back
STALL_CUT = 0.7  # an increase that leaves less than this share of the stall is kept
# A decrease that makes a consumer already waiting much of the time wait this much more of
# it is taken back (smaller moves of a large wait are noise).
STALL_JUMP = 0.05
ALWAYS_WAITING = 0.9  # a consumer waiting more than this share of the time has no work of its own
GAIN = 0.08  # a change must raise the rate by this much to be worth its cost
LOSS = 0.03  # a decrease may cost at most this much rate
WAITING_WORK = 0.5  # CPU time / wall time below this: the work mostly waits (I/O) ...
WAITING_CORES = 0.3  # ... if all its workers together also use less than this many cores:
# threads waiting for the GIL show little CPU each too, but together they keep a core busy.
# Many threads that wait add up to more cores (each pays its hand-offs): they still wait when
# the work, run alone, waits too, until together they come near the one core the GIL allows.
MANY_WAITING_CORES = 0.7
PURE_WAITING = PURE_WAITING_SHARE  # CPU time / wall time below this: bigger steps
BUSY = 0.5  # workers spending this fraction of their time on their own work are "busy"
IDLE = 0.3  # ... and this fraction blocked on a full buffer, idle: fewer would do
# ... unless their consumer waited on the stage meanwhile, for at least this share of the
# window: the element it waits for, the oldest, holds the finished ones behind it in the
# buffer (in order, a slow call among fast ones). More calls in flight then fill the wait.
HELD_IN_ORDER = 0.15
CPU_FULL = 0.85  # the process uses this share of its CPU budget: the cores are taken
# Threads held by the GIL run Python one at a time: together they use about one core. Past
# this many, they already run in parallel enough that processes would mostly add hand-offs.
GIL_CORES = 1.5
# A process using less than this many cores leaves the GIL free a fifth of the time or more:
# its threads are not held by it.
GIL_FREE_CORES = 0.8
# Moving to processes needs at least this many idle cores on the machine to run them on (or
# half the cores the process leaves unused, if fewer).
FREE_CORES_FOR_PROCESSES = 0.5
# Fewer workers can keep the rate only if the cores the stage uses fit in them (a worker uses
# at most one): threads contending for the GIL, or waiting. Slack for measurement noise.
FEWER_SLACK = 0.15
# Work per element below which a hand-off between threads costs about as much as the work:
# such a stage, its workers idle while its consumer waits, goes inline in one step.
CHEAP_WORK = CHEAP_WORK_SECONDS
# CPU time per element above which moving a GIL-bound function to processes can pay for
# sending elements and results between processes (waiting does not move: only the CPU work).
PROCESS_WORTH = 100e-6
# Moving threads that already use most cores to processes costs memory (each worker loads
# what the function needs): it must raise the rate by this much to stay, above the noise of
# a busy machine (~10%). Image decoding gained 14-30% over a thread per core, round by round;
# numpy work that releases the GIL, +3% in one such comparison and +30% in one benchmark run.
PROCESS_GAIN = 0.15
# A thread per core that leaves more than this share of the cores unused (while its consumer
# waits on it) waits on the other threads: processes may run the same work in parallel. They
# can at best use the cores left, so with fewer unused the move could not gain PROCESS_GAIN.
# Two threads measured (with the batching and the consumer in the same process): Pillow image
# decoding used 1.15-1.82 of 2 cores, numpy work that releases the GIL 1.47-1.75; image
# decoding tried at 1.82 cores lost 21% in its trial, on top of what starting the workers cost.
THREADS_LEAVE_CORES = 1 - 1 / (1 + PROCESS_GAIN)
# A move to processes that did not pay is tried again only after this long, doubled at each
# further failure: a trial costs ~1 s of a slower pipeline (workers starting beside the threads,
# then the trial window), and a consumer changing speed says little about whether processes pay.
PROCESS_RETRY_SECONDS = 10.0
# Settle / measure windows, at least, of changes whose effect is slow to show (processes must
# start) or small next to the noise of short windows (reading ahead for a consumer that is
# mostly busy: its rate moves by about the fraction it waits).
LONG_WINDOW = 1.0
# A stage with nothing to compute (a prefetch) gains at most the consumer's own share of the
# time by reading ahead on a thread: below this share, the hand-offs cost more than that.
OVERLAP_WORTH = GAIN
# ... and the consumer's own work between two elements must last at least this long: shorter,
# and the two threads only hand the GIL back and forth (a loop that merely counts batches).
OVERLAP_MIN_SECONDS = 0.5e-3


@dataclass
class Decision:
    """One knob change (or revert) with the reason for it."""

    time: float  # seconds since the pipeline started
    stage: str
    knob: str
    old: int
    new: int
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.time:7.2f}s  {self.stage}.{self.knob}: {self.old} -> {self.new}  "
            f"({self.reason})"
        )


@dataclass
class StageWindow:
    """What a stage did between two ticks."""

    stage: Tunable
    rate: float  # elements delivered per second
    consumer_wait: float  # fraction of the window its consumer spent waiting for it
    busy: float  # fraction of worker time spent on the stage's own work
    cpu_share: float  # CPU time / wall time of that work (1: computing; ~0: waiting)
    cores: float  # CPU seconds per second used by the stage's work, all workers together
    idle: float  # fraction of worker time spent blocked on a full buffer
    bytes_per_element: float
    seconds_per_element: float  # wall time of the stage's own work per element
    cpu_per_element: float  # CPU time of it: what would move to a worker process


@dataclass
class Experiment:
    stage: Tunable
    knob: Knob
    old: int
    new: int
    direction: int  # +1 scale up, -1 scale down
    baseline_rate: float
    baseline_stall: float
    started: float
    # Every stage's rate and the share of the time its reader waited on it, before the
    # change (before the first of a chain), by stage key.
    baseline_rates: dict[object, float]
    baseline_waits: dict[object, float]
    # A scale-up that did not pay alone, kept while this one (of the stage it made the new
    # bottleneck) is tried with it: both stay or both go.
    chained_from: Experiment | None = None
    # A second knob changed with the first (processes come with workers), restored with it.
    companion: tuple[Knob, int] | None = None
    # Shortest settling and measuring windows: longer where the change takes time to show
    # (worker processes must start and load what the function needs).
    min_window: float = MIN_WINDOW
    # The rate must rise this much for a scale-up to be kept.
    min_gain: float = GAIN
    # Right after a change, buffers fill or drain: that window is discarded, not judged.
    settling: bool = True

    @property
    def baseline_stage_rate(self) -> float:
        return self.baseline_rates.get(self.stage.key, 0.0)

    @property
    def baseline_stage_wait(self) -> float:
        return self.baseline_waits.get(self.stage.key, 0.0)


def held_in_order(w: StageWindow) -> bool:
    """Workers blocked on a full buffer while the stage's consumer waited on it: both share
    the window for at least HELD_IN_ORDER of it (each measured as a share of it)."""
    return w.idle + w.consumer_wait - 1 > HELD_IN_ORDER


def computes_under_contention(w: StageWindow) -> bool:
    """Threads contending for the GIL only spend less of their time on the CPU: work that
    spends this much of it there computes, whatever its first call did."""
    return w.cpu_share >= WAITING_WORK


def mostly_waits(
    cpu_share: float, cores: float, solo_cpu_share: float | None, gil_free: bool = False
) -> bool:
    """Work whose workers spend ``cpu_share`` of their time on the CPU, ``cores`` together,
    and ``solo_cpu_share`` when one ran alone, mostly waits (I/O, latency) rather than computes.
    Threads waiting for the GIL also show a small share each, but keep about a core busy.
    ``gil_free``: the process left the GIL free part of the time, on a machine with cores to
    spare; threads wanting it would have taken it, so a small share is waiting on other things
    (a few slow calls among fast ones make the first call alone a poor guide)."""
    if cpu_share >= WAITING_WORK:
        return False
    if gil_free:
        return True
    alone_waits = solo_cpu_share is not None and solo_cpu_share < WAITING_WORK
    return cores < (MANY_WAITING_CORES if alone_waits else WAITING_CORES)


def least_bytes(stage: Tunable, bytes_per_element: float, worker_rss: float) -> float:
    """What ``stage`` may hold with one worker and its buffer at its smallest (the chunk
    being made, those made, the one being delivered), plus the element its consumer holds,
    and ``worker_rss`` (a worker process's resident memory) on processes."""
    buffer = stage.knobs["buffer_size"]
    held = stage.projected_bytes(1, buffer.minimum if buffer.tunable else None)
    held += bytes_per_element
    executor = stage.knobs.get("executor")
    if executor is not None and executor.value == PROCESSES:
        held += worker_rss
    return held


def thread_budget_words(knob: Knob, wanted: int) -> str:
    """Why ``knob`` stops short of ``wanted``: the pass's thread budget, in words."""
    budget = knob.budget
    if budget is None:
        return f"at most {knob.maximum}"
    return (
        f"the pass's thread budget allows {knob.most()} of {wanted}: "
        f"{budget.in_use()} of its {budget.limit} threads in use"
    )


@dataclass
class RootCounters:
    """The consumer's side of the pipeline, counted by the public iterator."""

    delivered: int = 0
    wait: float = 0.0  # finished waits
    waiting_since: float | None = None  # when the wait in progress began, if one is

    def waited(self, now: float) -> float:
        """All the time spent waiting until ``now``, including a wait not yet over."""
        since = self.waiting_since
        return self.wait + (now - since if since is not None else 0.0)


@dataclass
class TunerState:
    history: list[Decision] = field(default_factory=list)
    # (stage key, knob name) -> the value above which more did not help
    saturated: dict[tuple[object, str], int] = field(default_factory=dict)
    floor_reached: set[object] = field(default_factory=set)  # stages that cannot shrink further
    # stage key -> (when processes may be tried again, how long the wait after the next failure)
    process_retry: dict[object, tuple[float, float]] = field(default_factory=dict)


class Tuner:
    """Runs beside one pipeline on a daemon thread; ``stop()`` ends it."""

    def __init__(
        self,
        stages: Callable[[], list[Tunable]],
        root: RootCounters,
        budget: Budget,
        started: float,
        worker_memory: Callable[[], list[WorkerMemory]] = list,
    ) -> None:
        self._stages = stages
        self._worker_memory = worker_memory
        self.workers_rss = 0  # resident bytes of the run's worker processes, last window
        self.process_workers = 0  # how many there were
        self._root = root
        self.budget = budget
        self._started = started
        self.state = TunerState()
        self._start_choices_recorded: set[object] = set()
        # (stage key, parallelism) at which the thread budget stopped a scale-up, said once.
        self._budget_noted: set[tuple[object, int]] = set()
        # Budgets that cannot be kept, said once per stage: in stats() and on the log.
        self.warnings: list[str] = []
        self._warned: set[object] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._experiment: Experiment | None = None
        self._previous: dict[object, dict[str, float]] = {}
        self._stage_objects: dict[object, Tunable] = {}  # the stage running each op now
        self._remade: set[object] = set()  # ops whose stage was made anew in this window
        self._previous_root = (0, 0.0, time.perf_counter())
        self._previous_process_cpu = time.process_time()
        # When the knobs last changed (tuner clock, process CPU seconds then), and how many
        # decisions the history held at that moment.
        self._knobs_set_at = (started, self._previous_process_cpu)
        self._decisions_seen = 0
        self._reading = False  # the knobs hold still while a move to processes is read
        self.cores_in_use = 0.0  # the whole process's CPU use over the last window
        self._previous_idle = idle_cpu_seconds()
        self.idle_cores: float | None = None  # cores left idle over the last window, if known
        self._last_rate = 0.0
        self._last_stall = 0.0
        self.interval = FIRST_INTERVAL
        self._warmed_up = False
        self._last_stage_rates: dict[object, float] = {}
        self._last_stage_waits: dict[object, float] = {}
        self.cpu_seconds = 0.0  # the tuner's own cost
        self._thread = threading.Thread(target=self._run, name="feedline-autotune", daemon=True)

    def start(self) -> None:
        for stage in self._stages():
            self._cap_buffers(stage)
        self._thread.start()

    def _cap_buffers(self, stage: Tunable) -> None:
        """The RAM budget is also a hard cap per stage, whatever the tuner later decides."""
        stage.max_buffer_bytes = min(stage.max_buffer_bytes, self.budget.ram)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    @property
    def history(self) -> list[Decision]:
        with self._lock:
            return list(self.state.history)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            cpu_started = time.thread_time()
            try:
                self.step()
            except Exception:  # the tuner must never take the pipeline down
                logger.exception("autotune step failed; knobs left as they are")
            self.cpu_seconds += time.thread_time() - cpu_started

    # -- one tick ----------------------------------------------------------------------------

    def step(self, now: float | None = None) -> None:
        """Measure the last window and make at most one decision."""
        now = time.perf_counter() if now is None else now
        delivered, since = self._root.delivered, self._previous_root[2]
        wait = self._root.waited(now)
        dt = now - since
        snapshots = {stage.key: (stage, stage.metrics.snapshot()) for stage in self._stages()}
        self._follow_remade_stages(snapshots)
        self._record_start_choices(snapshots)
        self._check_ram_floor(snapshots)
        if not self._window_complete(dt, delivered - self._previous_root[0], snapshots):
            return  # windows (before and after a change) must be long enough to compare
        windows = self._windows(dt, snapshots)  # the same window as the root's
        self._remade.clear()
        self._last_stage_rates = {w.stage.key: w.rate for w in windows}
        self._last_stage_waits = {w.stage.key: w.consumer_wait for w in windows}
        process_cpu = time.process_time()
        self.cores_in_use = (process_cpu - self._previous_process_cpu) / dt
        self._previous_process_cpu = process_cpu
        if len(self.state.history) != self._decisions_seen:
            self._decisions_seen = len(self.state.history)
            self._knobs_set_at = (now, process_cpu)
        idle = idle_cpu_seconds()
        if idle is not None and self._previous_idle is not None:
            self.idle_cores = (idle - self._previous_idle) / dt
        self._previous_idle = idle
        pools = self._worker_memory()
        self.workers_rss = sum(p.rss_bytes for p in pools)
        self.process_workers = sum(p.processes for p in pools)
        experiment = self._experiment
        rate = (delivered - self._previous_root[0]) / dt
        stall = (wait - self._previous_root[1]) / dt
        self._previous_root = (delivered, wait, now)
        if not self._warmed_up:
            self._warmed_up = True  # the first window is start-up (buffers filling): no verdict
            return
        if experiment is not None and experiment.settling:
            experiment.settling = False  # the next window is the one that counts
            return
        if delivered == 0:
            return
        if experiment is not None:
            # The consumer's rate is what counts; a stage's own rate stands in for it only
            # when too few elements reached the consumer to measure (large batches, slow).
            tested = next((w for w in windows if w.stage.key == experiment.stage.key), None)
            root_moved = rate * dt >= SETTLE_ELEMENTS
            measured = rate if root_moved or tested is None else tested.rate
            baseline = experiment.baseline_rate if root_moved else experiment.baseline_stage_rate
            # Rates are counts: over few elements, one more or less is a real difference.
            noise = 1.0 / max(1.0, measured * dt)
            stage_wait = tested.consumer_wait if tested is not None else None
            self._experiment = None  # the verdict may start a chained one
            kept = self._judge(
                experiment, measured, stall, baseline, now, noise, stage_wait, windows
            )
            if kept:
                # The rate moved because of the change, not the consumer: the next window
                # is the new reference for noticing a shift in the consumer's speed.
                self._last_rate = 0.0
            # Reverted: the pipeline is as before it, and so is the reference, so a consumer
            # that changed speed meanwhile is still noticed.
            self.interval = FIRST_INTERVAL
            return
        else:
            self._notice_shift(rate, stall)
            self._reading = False
            self._decide(windows, rate, stall, now)
        self._last_rate, self._last_stall = rate, stall
        # A reading in progress (see _try_processes) is a decision pending: no slower pace.
        changed = self._experiment is not None or self._reading
        self.interval = FIRST_INTERVAL if changed else min(MAX_INTERVAL, self.interval * 1.5)

    def _follow_remade_stages(
        self, snapshots: dict[object, tuple[Tunable, dict[str, float]]]
    ) -> None:
        """A stage made anew for the same op (the next epoch under ``repeat``) starts its
        counters from zero and inherits the knobs' values: measure it from its start, and
        carry an experiment on the old one over to it, measured afresh."""
        for key, (stage, _) in snapshots.items():
            if self._stage_objects.get(key) is not stage:
                self._cap_buffers(stage)  # made after the tuner started (an epoch, a slot)
            if self._stage_objects.get(key, stage) is not stage:
                self._previous.pop(key, None)
                self._remade.add(key)
                experiment = self._experiment
                if experiment is not None and experiment.stage.key == key:
                    experiment.settling = True
                while experiment is not None:
                    if experiment.stage.key == key:
                        experiment.stage = stage
                        experiment.knob = stage.knobs[experiment.knob.name]
                        if experiment.companion is not None:
                            name = experiment.companion[0].name
                            experiment.companion = (stage.knobs[name], experiment.companion[1])
                    experiment = experiment.chained_from
            self._stage_objects[key] = stage

    def _record_start_choices(
        self, snapshots: dict[object, tuple[Tunable, dict[str, float]]]
    ) -> None:
        """What stages chose from their first calls, into the history with the rest."""
        for key, (stage, _) in snapshots.items():
            choice = stage.start_choice
            if choice is None or key in self._start_choices_recorded:
                continue
            self._start_choices_recorded.add(key)
            self._record(
                Decision(
                    choice.at - self._started,
                    stage.name,
                    choice.knob,
                    choice.old,
                    choice.new,
                    choice.reason,
                )
            )

    def _check_ram_floor(self, snapshots: dict[object, tuple[Tunable, dict[str, float]]]) -> None:
        """Say once, for each stage running on workers, if even one worker holds more than
        the RAM budget: the tuner cannot keep to it, and the user would not know."""
        for key, (stage, now) in snapshots.items():
            per_element = now["bytes_per_element"]
            if key in self._warned or not per_element or stage.knobs["parallelism"].value < 1:
                continue
            worker_rss = self.workers_rss / self.process_workers if self.process_workers else 0
            least = least_bytes(stage, per_element, worker_rss)
            if least <= self.budget.ram:
                continue
            self._warned.add(key)
            on_processes = stage.knobs.get("executor")
            held = "its smallest buffer and the element its consumer holds"
            if on_processes is not None and on_processes.value == PROCESSES:
                held += ", and a worker process"
            warning = (
                f"{stage.name} may hold {format_bytes(least)} with even one worker ({held}, "
                f"{format_bytes(per_element)} an element): more than the RAM budget of "
                f"{format_bytes(self.budget.ram)}, which cannot be kept; raise "
                "Options.autotune.ram_budget or make the elements smaller"
            )
            with self._lock:
                self.warnings.append(warning)
            warnings_logger.warning("%s", warning)

    def _window_complete(
        self, dt: float, root_moved: int, snapshots: dict[object, tuple[Tunable, dict[str, float]]]
    ) -> bool:
        if dt >= max(MAX_WINDOW, self._experiment.min_window if self._experiment else 0.0):
            return True
        shortest = MIN_WINDOW
        experiment = self._experiment
        if experiment is not None:
            shortest = experiment.min_window
        if experiment is not None and experiment.stage.key in snapshots:
            stage, now = snapshots[experiment.stage.key]
            before: dict[str, float] = self._previous.get(stage.key, {})
            work = now["work_wall"] - before.get("work_wall", 0.0)
            done = now["worked"] - before.get("worked", 0.0)
            if done > 0:
                shortest = max(shortest, LATENCIES_PER_WINDOW * work / done)
        if dt < shortest:
            return False
        moved = max(
            [root_moved]
            + [
                now["elements"] - self._previous.get(key, {}).get("elements", 0.0)
                for key, (_, now) in snapshots.items()
            ]
        )
        return moved >= SETTLE_ELEMENTS

    def _windows(
        self, dt: float, snapshots: dict[object, tuple[Tunable, dict[str, float]]]
    ) -> list[StageWindow]:
        out = []
        for key, (stage, now) in snapshots.items():
            before = self._previous.get(key, {k: 0.0 for k in now})
            self._previous[key] = now
            if key in self._remade:
                continue  # its window began before it existed: no verdict on it yet
            workers = max(1, stage.knobs["parallelism"].value)
            work = now["work_wall"] - before["work_wall"]
            # Elements worked on, not delivered: a full buffer draining delivers with no work.
            done = now["worked"] - before["worked"]
            # A window in which no element was worked on says nothing of the cost: the average.
            if done > 0:
                per_element = work / done
                cpu_per_element = (now["work_cpu"] - before["work_cpu"]) / done
            else:
                per_element = now["work_wall"] / max(1.0, now["worked"])
                cpu_per_element = now["work_cpu"] / max(1.0, now["worked"])
            out.append(
                StageWindow(
                    stage=stage,
                    rate=(now["elements"] - before["elements"]) / dt,
                    # A wait is booked when it ends, so it can exceed this window: clamp.
                    consumer_wait=min(1.0, (now["consumer_wait"] - before["consumer_wait"]) / dt),
                    busy=work / (dt * workers),
                    cpu_share=(now["work_cpu"] - before["work_cpu"]) / work if work > 0 else 1.0,
                    cores=(now["work_cpu"] - before["work_cpu"]) / dt,
                    # Workers let go during the window idled in it too: clamp.
                    idle=min(1.0, (now["worker_idle"] - before["worker_idle"]) / (dt * workers)),
                    bytes_per_element=now["bytes_per_element"],
                    seconds_per_element=per_element,
                    cpu_per_element=cpu_per_element,
                )
            )
        return out

    def _notice_shift(self, rate: float, stall: float) -> None:
        """The consumer changed speed: what was saturated may not be any more."""
        if self._last_rate <= 0:
            return
        shifted = abs(rate - self._last_rate) > 0.3 * self._last_rate or (
            (stall > STALL) != (self._last_stall > STALL)
        )
        if shifted:
            self.state.saturated.clear()
            self.state.floor_reached.clear()
            self.interval = FIRST_INTERVAL

    # -- experiments -------------------------------------------------------------------------

    def _judge(
        self,
        e: Experiment,
        rate: float,
        stall: float,
        baseline: float,
        now: float,
        noise: float = 0.0,
        stage_wait: float | None = None,
        windows: list[StageWindow] | None = None,
    ) -> bool:
        """Keep or revert ``e`` on what the window after it showed; True when kept (or kept
        for now, while a scale-up chained to it is tried). ``noise``: the relative uncertainty
        of the measured rate; ``stage_wait``: the share of the window the tested stage's own
        consumer waited on it, if known; ``windows``: every stage's, in that window."""
        base = max(baseline, 1e-9)
        gain = rate / base - 1
        loss_allowed = LOSS + noise
        key = e.stage.key
        if e.direction > 0:
            # A consumer that waited too little for its rate to rise by GAIN is judged on its
            # waits: waiting clearly less (when that was more than comfortable) is a gain.
            waits_less = NO_STALL < e.baseline_stall < GAIN and stall < STALL_CUT * e.baseline_stall
            # A costly change (min_gain above GAIN) must pay in rate, which a consumer waiting
            # a point less does not show.
            stall_counts = e.min_gain <= GAIN
            if gain >= e.min_gain + noise or (
                stall_counts
                and (stall < e.baseline_stall - STALL or waits_less)
                and gain > -loss_allowed
            ):
                return True  # the next decision may scale further
            if self._chain(e, windows or [], now):
                return True
            self._set(e.stage, e.knob, e.old, f"no gain from {e.new} ({gain:+.0%}): back")
            self._take_back(e, now)
            chained_from = e.chained_from
            while chained_from is not None:
                self._set(
                    chained_from.stage,
                    chained_from.knob,
                    chained_from.old,
                    f"back with {e.stage.name}'s {e.knob.name}",
                )
                self._take_back(chained_from, now)
                chained_from = chained_from.chained_from
            return False
        # A consumer that always waits (it does no work of its own) is judged on the rate
        # alone; one that did work can be made to stall more by a decrease, and a rate that
        # rose anyway (the consumer itself sped up) must not hide that.
        if e.baseline_stall <= STALL:
            stalls_now = stall > STALL or stall > e.baseline_stall + STALL_RISE
        else:
            stalls_now = e.baseline_stall < ALWAYS_WAITING and stall > e.baseline_stall + STALL_JUMP
        if stalls_now and stage_wait is not None:
            # Fewer workers slow the consumer only through a reader waiting more on this stage
            # (its wait includes the work done inline). Otherwise the waits came from elsewhere:
            # a sleeping consumer's wake-up after a burst of GIL hand-offs, say.
            stalls_now = stage_wait > e.baseline_stage_wait + STALL_RISE
        # A consumer served before and after sets the rate itself: waiting at most STALL of
        # the time, it cannot have lost more than that to the pipeline. A lower rate is its
        # own doing, as is a stage's own rate falling while the buffers after it fill up.
        served = e.baseline_stall <= STALL and stall <= STALL
        costs_rate = gain < -loss_allowed and not served
        if not costs_rate and not stalls_now:
            if e.baseline_stall > STALL and e.baseline_stage_wait > STALL / 2:
                # Kept while the stage was the bottleneck: more than this did not help either.
                # (A stage its consumer does not wait on says nothing of what more would do.)
                self.state.saturated[(key, e.knob.name)] = e.new
            return True
        if costs_rate:
            self._set(e.stage, e.knob, e.old, f"{e.new} cost rate ({gain:+.0%}): back")
        else:
            self._set(e.stage, e.knob, e.old, f"with {e.new} the consumer stalls ({stall:.0%})")
        self.state.floor_reached.add(key)
        return False

    def _take_back(self, e: Experiment, now: float) -> None:
        """What goes with reverting the scale-up ``e`` (its knob already set back)."""
        if e.companion is not None:
            self._set(e.stage, e.companion[0], e.companion[1], "back with it")
        self.state.saturated[(e.stage.key, e.knob.name)] = e.old
        if e.knob.name == "executor":
            _, wait = self.state.process_retry.get(e.stage.key, (0.0, PROCESS_RETRY_SECONDS))
            self.state.process_retry[e.stage.key] = (now + wait, 2 * wait)

    def _chain(self, e: Experiment, windows: list[StageWindow], now: float) -> bool:
        """A scale-up that did not pay may have moved the bottleneck to the stage it reads
        from: two stages at about the same rate gain nothing when either grows alone (each
        one's gain tried alone is taken back, and the pipeline stays at their rate). If a
        stage's reader now waits on it clearly more than before, grow that stage too, keeping
        ``e`` meanwhile; the pair is judged against the rate before ``e``. True if chained."""
        if e.chained_from is not None or e.companion is not None or e.knob.name != "parallelism":
            return False
        for w in sorted(windows, key=lambda w: w.consumer_wait, reverse=True):
            parallelism = w.stage.knobs.get("parallelism")
            if (
                w.stage.key == e.stage.key
                or parallelism is None
                or not parallelism.tunable
                or not w.stage.has_own_work
                or w.consumer_wait < STALL / 2
                or w.consumer_wait < e.baseline_waits.get(w.stage.key, 0.0) + STALL
            ):
                continue
            target, _ = self._scaled_parallelism(w, windows)
            if target <= parallelism.value:
                continue
            old = parallelism.value
            reason = (
                f"its reader waits on it {w.consumer_wait:.0%} of the time with "
                f"{e.stage.name}'s {e.knob.name} at {e.new}: tried with it"
            )
            applied = self._set(w.stage, parallelism, target, reason)
            self._experiment = Experiment(
                w.stage,
                parallelism,
                old,
                applied,
                +1,
                e.baseline_rate,
                e.baseline_stall,
                now,
                e.baseline_rates,
                e.baseline_waits,
                chained_from=e,
            )
            return True
        return False

    def _decide(self, windows: list[StageWindow], rate: float, stall: float, now: float) -> None:
        if not windows:
            return
        if self._read_ahead(windows, rate, stall, now, inline_only=True):
            return
        if stall > STALL:
            # Stages with work of their own first: reading ahead only overlaps what is left.
            if self._scale_up(windows, rate, stall, now):
                return
            if self._read_ahead(windows, rate, stall, now):
                return
            if self._shed_spare(windows, rate, stall, now):
                return
            # Where more did not help, or where workers are mostly idle although their consumer
            # waits (the hand-offs cost more than the work): fewer may then be faster, down to
            # none, with the work inline in the consumer's thread.
            # (Idle workers of costly work, while their consumer waits, are a passing moment:
            # the consumer just sped up and has not yet emptied the buffer.)
            # So may more computing workers than cores (started for a first call that waited).
            saturated_keys = {key for key, _ in self.state.saturated}
            worth_fewer = [
                w
                for w in windows
                if (
                    w.stage.key in saturated_keys
                    or (w.busy < BUSY and w.seconds_per_element < CHEAP_WORK)
                    or self._computes_on_too_many_workers(w)
                )
                and self._fewer_may_keep(w)
            ]
            self._scale_down(
                worth_fewer, rate, stall, now, served=False, reason="more workers did not help"
            )
        elif stall < NO_STALL:
            self._scale_down(windows, rate, stall, now, served=True, reason="consumer never waits")
        else:
            # Served, but not comfortably: reading ahead may take the last waits away.
            if not self._shed_spare(windows, rate, stall, now):
                self._read_ahead(windows, rate, stall, now)

    def _shed_spare(
        self, windows: list[StageWindow], rate: float, stall: float, now: float
    ) -> bool:
        """Fewer workers for a stage whose own consumer never waits on it while they idle,
        whatever the consumer's waits: those come from elsewhere (a consumer that sleeps
        between elements waits for the GIL at every wake-up; on a loaded machine, for a core).
        True if one was tried."""
        spare = [w for w in windows if w.consumer_wait < NO_STALL / 2 and w.idle > IDLE]
        return self._scale_down(
            spare, rate, stall, now, served=True, reason="its consumer never waits on it"
        )

    def _read_ahead(
        self,
        windows: list[StageWindow],
        rate: float,
        stall: float,
        now: float,
        inline_only: bool = False,
    ) -> bool:
        """Put a read-ahead stage (one with no work of its own) on a thread, or back inline,
        from what its consumer does between calls: a thread overlaps the consumer's own work
        with pulling the input, and is a pure cost when the consumer has none."""
        for w in windows:
            knob = w.stage.knobs["parallelism"]
            if w.stage.has_own_work or not knob.tunable or knob.maximum != 1:
                continue
            own = 1.0 - w.consumer_wait  # the consumer's time away from this stage
            key = w.stage.key
            if (
                not inline_only
                and knob.value == 0
                and own >= OVERLAP_WORTH
                and own / max(w.rate, 1e-9) >= OVERLAP_MIN_SECONDS
                and w.consumer_wait >= NO_STALL
                and (key, knob.name) not in self.state.saturated
            ):
                if knob.most() < 1:  # no thread left for it: other stages' turn
                    self._note_thread_budget(w.stage, knob, 1)
                    continue
                reason = (
                    f"its consumer works {own:.0%} of the time and waits {w.consumer_wait:.0%} "
                    "for it: read ahead on a thread to overlap the two"
                )
                self._try(w.stage, knob, 1, +1, rate, stall, now, reason)
                if self._experiment is not None:
                    self._experiment.min_window = LONG_WINDOW
                return True
            if knob.value == 1 and own < OVERLAP_WORTH / 2 and key not in self.state.floor_reached:
                reason = (
                    f"its consumer waits {w.consumer_wait:.0%} of the time, with nothing of its "
                    "own to overlap: inline, without hand-offs"
                )
                self._try(w.stage, knob, 0, -1, rate, stall, now, reason)
                return True
        return False

    def _scale_up(self, windows: list[StageWindow], rate: float, stall: float, now: float) -> bool:
        candidates = sorted(
            (w for w in windows if w.consumer_wait > STALL / 2),
            key=lambda w: w.consumer_wait,
            reverse=True,
        )
        for w in candidates:
            # A computing stage its consumer waits on while the process leaves cores unused is
            # held by the GIL: more threads cannot help, processes may.
            if self._try_processes(w, windows, rate, stall, now):
                return True
            key = w.stage.key
            parallelism = w.stage.knobs["parallelism"]
            saturated_at = self.state.saturated.get((key, "parallelism"))
            if (
                parallelism.tunable
                and w.stage.has_own_work  # read-ahead stages: see _read_ahead
                and (w.busy > BUSY or parallelism.value == 0 or held_in_order(w))
                # Work this cheap runs inline: a hand-off would cost about as much.
                and not (parallelism.value == 0 and w.seconds_per_element < CHEAP_WORK)
                and (saturated_at is None or parallelism.value < saturated_at)
            ):
                target, wanted = self._scaled_parallelism(w, windows)
                if target <= parallelism.value:
                    # At a bound: no more threads. If the process cannot use its cores, the
                    # GIL is the bound: processes may be.
                    self.state.saturated[(key, "parallelism")] = parallelism.value
                    if wanted > target:
                        self._note_thread_budget(w.stage, parallelism, wanted)
                else:
                    reason = (
                        f"consumer waits {w.consumer_wait:.0%} of the time; workers "
                        f"{'wait' if self._waits(w) else 'compute'} "
                        f"(cpu {w.cpu_share:.0%} of wall, {w.cores:.2f} cores)"
                    )
                    if wanted > target:
                        reason += f"; {thread_budget_words(parallelism, wanted)}"
                    self._try(w.stage, parallelism, target, +1, rate, stall, now, reason)
                    return True
            buffer = w.stage.knobs["buffer_size"]
            buffer_saturated_at = self.state.saturated.get((key, "buffer_size"))
            if (
                buffer.tunable
                # Inline, the stage hands each element straight over: no buffer to grow. (Its
                # last window may still show the idle time of the workers it just let go.)
                and parallelism.value > 0
                and w.idle > 0.05
                and (buffer_saturated_at is None or buffer.value < buffer_saturated_at)
                and self._ram_allows(windows, w, buffer_size=2 * buffer.value)
            ):
                reason = f"consumer found it empty {w.consumer_wait:.0%} of the time"
                self._try(w.stage, buffer, buffer.value * 2, +1, rate, stall, now, reason)
                return True
        return False

    def _try_processes(
        self, w: StageWindow, windows: list[StageWindow], rate: float, stall: float, now: float
    ) -> bool:
        executor = w.stage.knobs.get("executor")
        if (
            executor is None
            or not executor.tunable
            or executor.value == PROCESSES
            or (w.stage.key, "executor") in self.state.saturated
            or now < self.state.process_retry.get(w.stage.key, (0.0, 0.0))[0]
            or self._waits(w)
            or w.cpu_per_element < PROCESS_WORTH
            or self.budget.cpu < 2
        ):
            return False
        if not computes_under_contention(w) and (
            # Threads that wait (I/O) look GIL-bound when there are many of them: what the
            # work does alone tells them apart.
            (w.stage.solo_cpu_share is not None and w.stage.solo_cpu_share < WAITING_WORK)
            # More workers than cores came from waiting (computing stages stop at the cores):
            # its calls in flight, not the GIL, set its rate.
            or w.stage.knobs["parallelism"].value > self.budget.cpu
        ):
            return False
        # The cores are read both in the last window and since the knobs were last set: one
        # short window can fall in a slow moment of the machine (image decoding's two threads
        # read 1.33-1.82 cores from one run to the next).
        since, cpu_since = self._knobs_set_at
        span = now - since
        cores = self.cores_in_use
        if span > 0:
            cores = max(cores, (self._previous_process_cpu - cpu_since) / span)
        unused = self.budget.cpu - cores
        # Held by the GIL: threads together use about one core.
        held = cores < min(CPU_FULL * self.budget.cpu, GIL_CORES)
        # Or a thread per core already, yet the cores are not all used: the threads wait on
        # each other (the GIL between the native calls of the function) part of the time.
        waiting_on_each_other = (
            w.stage.knobs["parallelism"].value >= self.budget.cpu
            and unused > THREADS_LEAVE_CORES * self.budget.cpu
        )
        if not (held or waiting_on_each_other):
            return False
        # Cores kept busy by other processes look like the GIL from inside; processes would
        # not get them either.
        cores_free = self.idle_cores is None or self.idle_cores >= min(
            FREE_CORES_FOR_PROCESSES, unused / 2
        )
        # A move for a large gain (the GIL holds the threads to one core) on a reading that
        # held for two windows; one for a small gain (threads leaving a few cores unused) on a
        # reading over LONG_WINDOW. Until then the knobs stay as they are, to read it.
        if span < (2 * MIN_WINDOW if held else LONG_WINDOW):
            self._reading = True
            if held and cores_free:  # a move likely: what it needs, started meanwhile
                w.stage.expect_processes()
            return True
        if not cores_free:
            return False
        parallelism = w.stage.knobs["parallelism"]
        workers = int(self.budget.cpu)  # computing work: one process per core
        if not self._fits(sum(x.stage.projected_bytes() for x in windows), workers):
            return False  # the processes would not fit in the RAM budget
        reason = (
            f"computes, yet the process uses {cores:.2f} of {self.budget.cpu:.0f} "
            f"cores{' with a thread per core' if not held else ''}: the GIL; moving the "
            "function to processes"
        )
        self._try(w.stage, executor, PROCESSES, +1, rate, stall, now, reason)
        if self._experiment is not None:
            self._experiment.min_window = LONG_WINDOW
            if not held:  # threads already near the cores: the gain must be clear
                self._experiment.min_gain = PROCESS_GAIN
        if self._experiment is not None and workers != parallelism.value:
            self._experiment.companion = (parallelism, parallelism.value)
            self._set(w.stage, parallelism, workers, "one worker process per core")
        return True

    def gil_free(self) -> bool:
        """Over the last window the process left the GIL free part of the time, on a machine
        with a core to spare: threads wanting it would have had it."""
        return (
            self.cores_in_use < GIL_FREE_CORES
            and self.idle_cores is not None
            and self.idle_cores >= FREE_CORES_FOR_PROCESSES
        )

    def _waits(self, w: StageWindow) -> bool:
        """The stage's work mostly waits (I/O, latency) rather than computes."""
        return mostly_waits(w.cpu_share, w.cores, w.stage.solo_cpu_share, self.gil_free())

    def _scaled_parallelism(self, w: StageWindow, windows: list[StageWindow]) -> tuple[int, int]:
        """The parallelism to try next for ``w``, and what it would be were it not for the
        pass's thread budget."""
        knob = w.stage.knobs["parallelism"]
        current = knob.value
        if current == 0:
            return min(1, knob.most()), 1
        cores_taken = self.cores_in_use >= CPU_FULL * self.budget.cpu
        # With every core busy, threads that get little CPU are starved, not waiting: more of
        # them would only add contention.
        if self._waits(w) and not cores_taken:
            # Latency-bound: calls in flight are cheap; when the work is almost all waiting,
            # take big steps (x8), since a run may not last long enough for many small ones.
            target = current * (8 if w.cpu_share < PURE_WAITING else 2)
        else:
            # Computing work never gets more workers than the budget has cores, whatever the
            # measured load says (a busy machine can make the cores look free).
            if cores_taken or current + 1 > self.budget.cpu:
                return current, current
            target = current + 1
        while target > current and not self._ram_allows(windows, w, parallelism=target):
            target = current + (target - current) // 2
        wanted = min(target, knob.maximum)
        return min(wanted, knob.most()), wanted

    def _scale_down(
        self,
        windows: list[StageWindow],
        rate: float,
        stall: float,
        now: float,
        served: bool,
        reason: str,
    ) -> bool:
        """Try fewer workers, or a smaller buffer, on the first of ``windows`` (most idle
        first) that can shrink; True if one did. ``served``: the consumer is served (rather
        than waiting while more workers did not help)."""
        for w in sorted(windows, key=lambda w: w.idle, reverse=True):
            key = w.stage.key
            if key in self.state.floor_reached:
                continue
            parallelism = w.stage.knobs["parallelism"]
            # With the consumer served, shed idle workers but keep at least one (inline work
            # would add to the consumer's own step); otherwise, after scale-ups failed, fewer
            # (even none) may be faster.
            floor = 1 if served else 0
            if parallelism.tunable and parallelism.value > floor and (not served or w.idle > IDLE):
                # Steps in proportion: one worker of a hundred waiting ones is noise.
                step = max(1, parallelism.value // (2 if w.idle > 0.6 else 4))
                target = max(floor, parallelism.value - step)
                if not served and w.busy < BUSY and w.seconds_per_element < CHEAP_WORK:
                    target = 0
                return self._try(w.stage, parallelism, target, -1, rate, stall, now, reason)
            buffer = w.stage.knobs["buffer_size"]
            if buffer.tunable and buffer.value > 1 and served and w.idle > IDLE:
                return self._try(w.stage, buffer, buffer.value // 2, -1, rate, stall, now, reason)
        return False

    def _computes_on_too_many_workers(self, w: StageWindow) -> bool:
        workers = w.stage.knobs["parallelism"].value
        return workers > self.budget.cpu and computes_under_contention(w)

    @staticmethod
    def _fewer_may_keep(w: StageWindow) -> bool:
        """Could one worker less keep this stage's rate? Not when the cores its workers use
        need all of them (computing threads or processes at the CPU budget). Going inline
        (from one worker) always may: the consumer's thread then does the work."""
        workers = w.stage.knobs["parallelism"].value
        return workers <= 1 or w.cores < workers - 1 + FEWER_SLACK

    def _ram_allows(
        self,
        windows: list[StageWindow],
        w: StageWindow,
        parallelism: int | None = None,
        buffer_size: int | None = None,
    ) -> bool:
        """Would every stage's buffers, at most, and the worker processes (with any that
        ``w``'s new parallelism adds) fit in the RAM budget with ``w`` changed?"""
        others = sum(x.stage.projected_bytes() for x in windows if x.stage is not w.stage)
        buffers = others + w.stage.projected_bytes(parallelism, buffer_size)
        added = 0
        executor = w.stage.knobs.get("executor")
        if parallelism is not None and executor is not None and executor.value == PROCESSES:
            added = max(0, parallelism - max(1, w.stage.knobs["parallelism"].value))
        return self._fits(buffers, added)

    def _fits(self, buffers: float, new_workers: int) -> bool:
        """Buffers holding ``buffers`` bytes, the running worker processes and
        ``new_workers`` more: within the RAM budget?"""
        workers = self.workers_rss
        if new_workers:  # the estimate may read this process's memory: only when needed
            workers += new_workers * self._rss_per_worker()
        return buffers + workers <= self.budget.ram

    def _rss_per_worker(self) -> int:
        """What one more worker process is expected to hold: as much as those running, or,
        before there are any, as much as this process (a worker loads what the function
        needs, as this process did)."""
        if self.process_workers:
            return self.workers_rss // self.process_workers
        return rss_of()

    def _note_thread_budget(self, stage: Tunable, knob: Knob, wanted: int) -> None:
        """Record, once at each value, that the thread budget stopped a scale-up of ``knob``."""
        noted = (stage.key, knob.value)
        if noted not in self._budget_noted:
            self._budget_noted.add(noted)
            reason = f"no more workers: {thread_budget_words(knob, wanted)}"
            self._record(
                Decision(
                    time.perf_counter() - self._started,
                    stage.name,
                    knob.name,
                    knob.value,
                    knob.value,
                    reason,
                )
            )

    def _try(
        self,
        stage: Tunable,
        knob: Knob,
        target: int,
        direction: int,
        rate: float,
        stall: float,
        now: float,
        reason: str,
    ) -> bool:
        """Set ``knob`` to ``target`` as an experiment; False if the value stayed the same."""
        old = knob.value
        applied = self._set(stage, knob, target, reason)
        if applied != old:
            self._experiment = Experiment(
                stage,
                knob,
                old,
                applied,
                direction,
                rate,
                stall,
                now,
                self._last_stage_rates,
                self._last_stage_waits,
            )
        return applied != old

    def _set(self, stage: Tunable, knob: Knob, value: int, reason: str) -> int:
        old = knob.value
        applied = knob.set(value)
        if applied != old:
            self._record(
                Decision(
                    time.perf_counter() - self._started, stage.name, knob.name, old, applied, reason
                )
            )
        return applied

    def _record(self, decision: Decision) -> None:
        with self._lock:
            self.state.history.append(decision)
        logger.debug("%s", decision)
