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
- Each change is an experiment, kept or taken back on the window after it (see
  ``experiments.py``): a scale-up that does not pay marks the stage saturated there, after
  which the tuner tries *fewer* workers, down to zero (the function then runs inline).
- When the consumer never stalls, the pipeline is faster than needed: the tuner shrinks
  what sits idle (workers blocked on a full buffer, buffers that stay full), reverting any
  shrink that makes the consumer stall.
- Each verdict (more did not help; less cost rate) is a mark that holds a while, longer each
  time the same probe fails again, and only while the stage's cost per element, whether its
  work waits, and the consumer's rate and stall stay as they were judged: a map that turns
  I/O-bound, or a training step that slows down, is judged afresh.

Every decision is recorded with its reason and logged at DEBUG on ``feedline.autotune``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from feedline.autotune import policy, shrinking
from feedline.autotune.budget import Budget
from feedline.autotune.constants import (
    COST_CHANGE,
    FIRST_INTERVAL,
    MAX_INTERVAL,
    MAX_RETRY_SECONDS,
    MAX_WINDOW,
    MIN_WINDOW,
    NO_STALL,
    PARKED_RELEASE_SECONDS,
    SETTLE_ELEMENTS,
    STALL,
)
from feedline.autotune.experiments import (
    Decision,
    Experiment,
    Judge,
    Judged,
    Shrink,
    TunerState,
)
from feedline.autotune.policy import (
    Move,
    Proposal,
    Situation,
    Window,
)
from feedline.autotune.record import DecisionLog
from feedline.autotune.windows import CpuReadings, Snapshots, TunerReadings
from feedline.runtime.context import WorkerMemory
from feedline.runtime.machine import rss_of
from feedline.runtime.tunable import Knob, Tunable

logger = logging.getLogger("feedline.autotune")


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
        # What each stage's knobs would be judged on now (by stage key), as of the last window.
        self._judged: dict[object, Judged] = {}
        self._log = DecisionLog(self.state, started)
        self._set = self._log.set
        self._record = self._log.record
        self._judge = Judge(self.state, self._set, self._situation, self._judged_now)
        self._stop = threading.Event()
        self._experiment: Experiment | None = None
        self._readings = TunerReadings()
        self._previous_root = (0, 0.0, time.perf_counter())
        self.cpu = CpuReadings(started)
        self._decisions_seen = 0  # how many decisions the history held at the last window
        self._reading = False  # the knobs hold still while a move to processes is read
        self._last_rate = 0.0
        self._last_stall = 0.0
        self.interval = FIRST_INTERVAL
        self._warmed_up = False
        self._last_stage_rates: dict[object, float] = {}
        self._last_stage_waits: dict[object, float] = {}
        self._waited_at: dict[object, float] = {}  # stage key -> when its consumer last waited
        self.cpu_seconds = 0.0  # the tuner's own cost
        # Called after each tick (the pass's timeline takes a sample: observers, not the tuner).
        self.on_tick: Callable[[], None] = lambda: None
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
        return self._log.history()

    @property
    def warnings(self) -> list[str]:
        """Budgets the tuner cannot keep, said once per stage (also on the log)."""
        return self._log.warnings

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            cpu_started = time.thread_time()
            try:
                self.step()
                self.on_tick()
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
        self._log.record_start_choices(snapshots)
        worker_rss = self.workers_rss / self.process_workers if self.process_workers else 0
        self._log.check_ram_floor(snapshots, worker_rss, self.budget)
        experiment = self._experiment
        shortest = MIN_WINDOW if experiment is None else experiment.min_window
        longest = MAX_WINDOW if experiment is None else max(MAX_WINDOW, experiment.min_window)
        tested = None if experiment is None else experiment.stage.key
        moved = delivered - self._previous_root[0]
        if not self._readings.complete(dt, moved, snapshots, shortest, longest, tested):
            return  # windows (before and after a change) must be long enough to compare
        windows = self._readings.windows(dt, snapshots)  # the same window as the root's
        self._last_stage_rates = {w.stage.key: w.rate for w in windows}
        self._last_stage_waits = {w.stage.key: w.consumer_wait for w in windows}
        self._waited_at.update((w.stage.key, now) for w in windows if w.consumer_wait > STALL)
        pools = self._worker_memory()
        self.workers_rss = sum(p.rss_bytes for p in pools)
        self.process_workers = sum(p.processes for p in pools)
        knobs_changed = len(self.state.history) != self._decisions_seen
        self._decisions_seen = len(self.state.history)
        self.cpu.read(now, dt, sum(p.cpu_seconds for p in pools), knobs_changed)
        experiment = self._experiment
        rate = (delivered - self._previous_root[0]) / dt
        stall = (wait - self._previous_root[1]) / dt
        self._previous_root = (delivered, wait, now)
        self._judge_windows(windows, rate, stall, now)
        if not self._warmed_up:
            self._warmed_up = True  # the first window is start-up (buffers filling): no verdict
            return
        if experiment is not None and experiment.settling:
            experiment.settling = False  # the next window is the one that counts ...
            # ... unless the rate fell apart after a scale-up: judged now, not a window later
            # (the load changed under it, or the threads it added hand the GIL round).
            if experiment.direction < 0 or rate * COST_CHANGE > experiment.baseline_rate:
                return
        if delivered == 0:
            return
        if experiment is not None and self._refused(experiment, now):
            experiment = self._experiment = None
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
            # The verdict may start a chained experiment.
            kept, self._experiment = self._judge.judge(
                experiment, measured, stall, baseline, now, noise, stage_wait, windows
            )
            if kept and experiment.direction < 0 and experiment.baseline_stall <= STALL:
                # (Made while the consumer was served: a stall that follows is new.)
                self.state.shrinks.append(
                    Shrink(now, experiment.stage, experiment.knob, experiment.old, experiment.new)
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
            self.state.shrinks = shrinking.recent(self.state.shrinks, now)
            undo = shrinking.shrinks_to_undo(self.state.shrinks, stall, now)
            if undo:
                self._undo_shrinks(undo, stall, now)
            else:
                self._decide(windows, rate, stall, now)
        self._last_rate, self._last_stall = rate, stall
        # A reading in progress (see _try_processes) is a decision pending: no slower pace.
        changed = self._experiment is not None or self._reading
        self.interval = FIRST_INTERVAL if changed else min(MAX_INTERVAL, self.interval * 1.5)

    def _follow_remade_stages(self, snapshots: Snapshots) -> None:
        """A stage made anew for the same op (the next epoch under ``repeat``) inherits the
        knobs' values: an experiment on the old one carries over to it, measured afresh."""
        new, remade = self._readings.follow(snapshots)
        for stage in new:
            self._cap_buffers(stage)  # made after the tuner started (an epoch, a slot)
        for stage in remade:
            experiment = self._experiment
            if experiment is not None and experiment.stage.key == stage.key:
                experiment.settling = True
            while experiment is not None:
                if experiment.stage.key == stage.key:
                    experiment.stage = stage
                    experiment.knob = stage.knobs[experiment.knob.name]
                    if experiment.companion is not None:
                        name = experiment.companion[0].name
                        experiment.companion = (stage.knobs[name], experiment.companion[1])
                experiment = experiment.chained_from

    def _refused(self, e: Experiment, now: float) -> bool:
        """The stage set ``e``'s knob back itself (a move it cannot make): say so in the
        history, as the move was, and take back what came with it."""
        knob = e.knob
        if knob.value == e.new or knob.refusal is None:
            return False
        self._record(
            Decision(now - self._started, e.stage.name, knob.name, e.new, knob.value, knob.refusal)
        )
        if e.companion is not None:
            self._set(e.stage, e.companion[0], e.companion[1], "back with it")
        return True

    def _notice_shift(self, rate: float, stall: float) -> None:
        """The consumer changed speed: look again soon (the marks it made stale have
        fallen, see ``_judge_windows``)."""
        if policy.consumer_shifted(rate, stall, self._last_rate, self._last_stall):
            self.interval = FIRST_INTERVAL

    def _judge_windows(self, windows: list[Window], rate: float, stall: float, now: float) -> None:
        """Take what each stage would be judged on now, and drop the verdicts it overturns:
        a knob judged on other work, or for a consumer running otherwise, is judged again."""
        s = self._situation(now)
        self._judged = {
            w.stage.key: Judged(w.seconds_per_element, policy.waits(w, s), rate, stall)
            for w in windows
            if w.worked > 0
        }
        self.state.drop_stale(now, self._judged.get)

    def _judged_now(self, key: object) -> Judged:
        judged = self._judged.get(key)
        return judged if judged is not None else Judged(0.0, False, self._last_rate, 0.0)

    # -- decisions ---------------------------------------------------------------------------

    def _situation(self, now: float) -> Situation:
        span, cores, idle_held = self.cpu.held(now)
        return Situation(
            budget=self.budget,
            now=now,
            cores_in_use=self.cpu.cores_in_use,
            idle_cores=self.cpu.idle_cores,
            idle_held=idle_held,
            knobs_held_for=span,
            cores_held=cores,
            workers_rss=self.workers_rss,
            rss_per_worker=self._rss_per_worker,
            saturated=self.state.saturated,
            floor_reached=self.state.floor_reached,
            waited_recently={
                k for k, t in self._waited_at.items() if now - t < self.state.hiccup_memory
            },
            process_retry=self.state.process_retry,
            ceilings=self.state.ceilings,
        )

    def _decide(self, windows: list[Window], rate: float, stall: float, now: float) -> None:
        """Run the rules in turn until one acts (see the module's docstring)."""
        windows = [w for w in windows if not w.stage.tuned_by_itself]
        if not windows:
            return
        s = self._situation(now)

        def act(proposal: Proposal | Move | None, must_change: bool = False) -> bool:
            return self._act(proposal, rate, stall, now, must_change)

        if act(policy.read_ahead(windows, s, inline_only=True)):
            return
        # Before any other move: surplus computing threads slow everything, including the
        # experiments that would find the bottleneck.
        if act(shrinking.shed_excess(windows, s), must_change=True):
            return
        if stall > STALL:
            # Stages with work of their own first: reading ahead only overlaps what is left.
            if act(policy.scale_up(windows, s)):
                return
            if act(policy.read_ahead(windows, s)):
                return
            if act(shrinking.shed_spare(windows, s), must_change=True):
                return
            act(shrinking.fewer_after_more_failed(windows, s), must_change=True)
        elif stall < NO_STALL:
            move = shrinking.scale_down(windows, s, served=True, reason="consumer never waits")
            act(move, must_change=True)
        # Served, but not comfortably: reading ahead may take the last waits away.
        elif not act(shrinking.shed_spare(windows, s), must_change=True):
            act(policy.read_ahead(windows, s))

    def _act(
        self,
        proposal: Proposal | Move | None,
        rate: float,
        stall: float,
        now: float,
        must_change: bool,
    ) -> bool:
        """Take what a rule learned, and try its move; True if the rule acted (with
        ``must_change``: only if a knob changed)."""
        if isinstance(proposal, Move):
            proposal = Proposal(proposal)
        if proposal is None:
            return False
        for note in proposal.notes:
            # The stage the budget stopped tries again once the parked threads have ended.
            released = note.wanted is not None and self._release_parked_for(note.knob)
            if note.saturated:
                key = note.stage.key
                judged = self._judged_now(key)
                longest = PARKED_RELEASE_SECONDS if released else MAX_RETRY_SECONDS
                self.state.mark_saturated(
                    key, note.knob.name, note.knob.value, judged, now, longest
                )
            if note.wanted is not None:
                self._log.note_thread_budget(note.stage, note.knob, note.wanted)
        if proposal.hold:
            self._reading = True
            if proposal.ready is not None:
                proposal.ready.expect_processes()
            return True
        move = proposal.move
        if move is None:
            return False
        knob = move.stage.knobs[move.knob]
        if move.hands_over:
            # Its workers end now, not after PARKED_SECONDS: the next tick's scale-up of the
            # stage they are for finds their share of the budget free.
            self._set(move.stage, knob, move.value, move.reason)
            move.stage.release_parked()
            return True
        if (
            knob.budget is not None
            and move.direction > 0
            and move.value >= knob.most()
            and self._release_parked_for(knob)
        ):
            # A raise the budget cut short while other stages' parked threads held part of
            # it: tried at the next tick, once they have ended, rather than judged now short.
            return True
        changed = self._try(
            move.stage, knob, move.value, move.direction, rate, stall, now, move.reason
        )
        experiment = self._experiment
        if experiment is not None:
            experiment.min_window = move.min_window
            experiment.min_gain = move.min_gain
            if move.companion is not None:
                name, value, reason = move.companion
                companion = move.stage.knobs[name]
                if value != companion.value:
                    experiment.companion = (companion, companion.value)
                    self._set(move.stage, companion, value, reason)
        return changed or not must_change

    def gil_free(self) -> bool:
        """Over the last window the process left the GIL free part of the time, on a machine
        with a core to spare: threads wanting it would have had it."""
        return policy.gil_free(self.cpu.cores_in_use, self.cpu.idle_cores)

    def _rss_per_worker(self) -> int:
        """What one more worker process is expected to hold: as much as those running, or,
        before there are any, as much as this process (a worker loads what the function
        needs, as this process did)."""
        if self.process_workers:
            return self.workers_rss // self.process_workers
        return rss_of()

    def _release_parked_for(self, knob: Knob) -> bool:
        """End the workers other stages let go and keep at hand (a scale-up taken back, a
        shed): while parked they hold their share of the thread budget, which goes where it
        is wanted now. True if there were any. (After a switch of bottleneck, a waiting map
        had 26 threads of the 129 it asked for, behind 84 parked.)"""
        holders = knob.budget.parked_elsewhere(knob) if knob.budget is not None else []
        for holder in holders:
            holder.release_parked()
        return bool(holders)

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
                baseline_judged=dict(self._judged),
            )
        return applied != old

    def _undo_shrinks(self, undo: list[Shrink], stall: float, now: float) -> None:
        """Take back the shrinks the consumer's stall follows, and keep what covers hiccups
        longer from now on (see shrinking.shrinks_to_undo)."""
        self.state.hiccup_memory = shrinking.longer_hiccup_memory(self.state.hiccup_memory)
        for shrink in undo:
            if shrink.knob.value >= shrink.old:
                continue  # grown back since
            self._set(
                shrink.stage,
                shrink.knob,
                shrink.old,
                f"the consumer stalls ({stall:.0%}) {now - shrink.at:.1f} s after {shrink.new}: "
                f"back (what covers hiccups now stays {self.state.hiccup_memory:.0f} s)",
            )
        self.state.shrinks = []
