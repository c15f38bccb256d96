"""The tuner's experiments: the records it keeps (decisions, the experiment under way, what
experiments taught) and the judging of a change on the window after it.

Each change is an experiment: after a settling window the tuner compares the rate with the
rate before. A gain is kept (and, for a scale-up, followed by another step). No gain from a
scale-up is reverted, and the stage is marked saturated there — e.g. a pure-Python function
holding the GIL — after which the tuner tries *fewer* workers, down to zero (the function then
runs inline in the consumer's thread, with no hand-off cost at all), keeping every decrease
that does not cost rate. A scale-up that did not pay alone may be kept while the stage it
reads from grows too (a chain): both stay or both go.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from feedline.autotune import policy
from feedline.autotune.constants import (
    ALWAYS_WAITING,
    COST_CHANGE,
    GAIN,
    HICCUP_MEMORY,
    INLINE_RETRY_SECONDS,
    KNEE_MARGIN,
    KNEE_SHARE,
    KNEE_STEP,
    LOSS,
    MAX_RETRY_SECONDS,
    MIN_WINDOW,
    NARROWED_STEP,
    NO_STALL,
    PROCESS_RETRY_SECONDS,
    RETRY_SECONDS,
    STALL,
    STALL_CUT,
    STALL_JUMP,
    STALL_RISE,
)
from feedline.autotune.policy import Situation, Window
from feedline.runtime.tunable import Knob, Tunable


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
    # What each stage would have been judged on before the change (by stage key): a verdict
    # that takes the change back stands on it.
    baseline_judged: dict[object, Judged] = field(default_factory=dict)

    @property
    def baseline_stage_rate(self) -> float:
        return self.baseline_rates.get(self.stage.key, 0.0)

    @property
    def baseline_stage_wait(self) -> float:
        return self.baseline_waits.get(self.stage.key, 0.0)


@dataclass(frozen=True)
class Judged:
    """What a verdict on a stage's knob was judged on: the stage's cost per element and
    whether its work mostly waited, and its consumer's rate and stall."""

    seconds_per_element: float
    waits: bool
    rate: float
    stall: float

    def still(self, now: Judged) -> bool:
        """The verdict still speaks for ``now``: the work costs about the same, waits or
        computes as it did, and the consumer runs about as fast, served or waiting as it
        was. (Within a factor: one window's rate moved by half on a busy machine.)"""
        if _apart(self.seconds_per_element, now.seconds_per_element) or _apart(self.rate, now.rate):
            return False
        return self.waits == now.waits and (self.stall > STALL) == (now.stall > STALL)


def _apart(before: float, after: float) -> bool:
    """Two measures differ by more than COST_CHANGE (zero: not measured, never apart)."""
    return before > 0 and after > 0 and max(before, after) > COST_CHANGE * min(before, after)


@dataclass(frozen=True)
class Mark:
    """A verdict that stops a knob's moves: more did not help past ``value`` (saturated), or
    less than ``value`` cost rate (the floor). It holds until ``retry_at`` (tuner clock) and
    while what it was judged on still holds."""

    value: int
    judged: Judged
    retry_at: float


@dataclass(frozen=True)
class Shrink:
    """A decrease the tuner kept: taken back should the consumer stall soon after."""

    at: float
    stage: Tunable
    knob: Knob
    old: int
    new: int


@dataclass
class TunerState:
    history: list[Decision] = field(default_factory=list)
    # (stage key, knob name) -> more than the mark's value did not help
    saturated_marks: dict[tuple[object, str], Mark] = field(default_factory=dict)
    # stage key -> fewer workers than the mark's value cost rate
    floor_marks: dict[object, Mark] = field(default_factory=dict)
    # (stage key, knob name) -> a step up to the mark's value did not pay: steps stop short
    step_ceilings: dict[tuple[object, str], Mark] = field(default_factory=dict)
    # How long the next mark of a (stage key, knob or "floor") holds: doubled each time one
    # is made (a probe that fails again and again is made less and less often), and reset
    # when a mark falls because what it was judged on changed.
    retry_waits: dict[tuple[object, str], float] = field(default_factory=dict)
    # stage key -> (when processes may be tried again, how long the wait after the next failure)
    process_retry: dict[object, tuple[float, float]] = field(default_factory=dict)
    # Decreases kept lately, and how long a stage its consumer waited on keeps what it has
    # (see shrinking.shrinks_to_undo).
    shrinks: list[Shrink] = field(default_factory=list)
    hiccup_memory: float = HICCUP_MEMORY

    @property
    def saturated(self) -> dict[tuple[object, str], int]:
        return {k: m.value for k, m in self.saturated_marks.items()}

    @property
    def floor_reached(self) -> set[object]:
        return set(self.floor_marks)

    @property
    def ceilings(self) -> dict[tuple[object, str], int]:
        return {k: m.value for k, m in self.step_ceilings.items()}

    def mark_saturated(
        self,
        key: object,
        knob: str,
        value: int,
        judged: Judged,
        now: float,
        longest: float = MAX_RETRY_SECONDS,
    ) -> None:
        """More than ``value`` did not help: a mark that holds (at most ``longest``) until
        tried again."""
        self.saturated_marks[(key, knob)] = self._mark((key, knob), value, judged, now, longest)

    def mark_floor(self, key: object, value: int, judged: Judged, now: float) -> None:
        self.floor_marks[key] = self._mark((key, "floor"), value, judged, now)

    def _mark(
        self,
        retry_key: tuple[object, str],
        value: int,
        judged: Judged,
        now: float,
        longest: float = MAX_RETRY_SECONDS,
    ) -> Mark:
        wait = self.retry_waits.get(retry_key, RETRY_SECONDS)
        self.retry_waits[retry_key] = min(2 * wait, MAX_RETRY_SECONDS)
        return Mark(value, judged, now + min(wait, longest))

    def drop_stale(self, now: float, judged_now: Callable[[object], Judged | None]) -> None:
        """Drop the marks whose time is up, or whose stage's work or consumer changed
        (``judged_now(stage key)``: what it would be judged on now; None if not measured)."""
        for (key, knob), mark in list(self.saturated_marks.items()):
            if self._stale(mark, (key, knob), judged_now(key), now):
                del self.saturated_marks[(key, knob)]
        for key, mark in list(self.floor_marks.items()):
            if self._stale(mark, (key, "floor"), judged_now(key), now):
                del self.floor_marks[key]
        for (key, knob), mark in list(self.step_ceilings.items()):
            if self._stale(mark, (key, "ceiling"), judged_now(key), now):
                del self.step_ceilings[(key, knob)]

    def _stale(
        self, mark: Mark, retry_key: tuple[object, str], current: Judged | None, now: float
    ) -> bool:
        if current is not None and not mark.judged.still(current):
            self.retry_waits.pop(retry_key, None)  # a new situation: probes start afresh
            return True
        return now >= mark.retry_at


# Sets a stage's knob with a reason (recorded if it changed); returns the value applied.
SetKnob = Callable[[Tunable, Knob, int, str], int]


class Judge:
    """Keeps or takes back the tuner's experiments, through the tuner's ``set_knob`` and
    what experiments taught (``state``); ``situation(now)``: what the rules read then."""

    def __init__(
        self,
        state: TunerState,
        set_knob: SetKnob,
        situation: Callable[[float], Situation],
        judged_now: Callable[[object], Judged],
    ) -> None:
        self.state = state
        self._set = set_knob
        self._situation = situation
        self._judged_now = judged_now  # what a stage's knob would be judged on now

    def judge(
        self,
        e: Experiment,
        rate: float,
        stall: float,
        baseline: float,
        now: float,
        noise: float = 0.0,
        stage_wait: float | None = None,
        windows: list[Window] | None = None,
    ) -> tuple[bool, Experiment | None]:
        """Keep or revert ``e`` on what the window after it showed: whether it was kept (or
        kept for now, while a scale-up chained to it is tried), and that chained experiment,
        if one started. ``noise``: the relative uncertainty of the measured rate;
        ``stage_wait``: the share of the window the tested stage's own consumer waited on it,
        if known; ``windows``: every stage's, in that window."""
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
                # The next decision may scale further, unless the step went past the knee.
                return True, self._back_to_knee(e, rate / base, stall, now, windows or [])
            chained = self._chain(e, windows or [], now)
            if chained is not None:
                return True, chained
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
            return False, None
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
                self.state.mark_saturated(key, e.knob.name, e.new, self._judged_now(key), now)
            return True, None
        if costs_rate:
            self._set(e.stage, e.knob, e.old, f"{e.new} cost rate ({gain:+.0%}): back")
        else:
            self._set(e.stage, e.knob, e.old, f"with {e.new} the consumer stalls ({stall:.0%})")
        self.state.mark_floor(key, e.old, self._before(e), now)
        return False, None

    def _take_back(self, e: Experiment, now: float) -> None:
        """What goes with reverting the scale-up ``e`` (its knob already set back)."""
        if e.companion is not None:
            self._set(e.stage, e.companion[0], e.companion[1], "back with it")
        before = self._before(e)
        if e.knob.name == "parallelism" and e.new - e.old >= NARROWED_STEP:
            # Half the step, tried next (see NARROWED_STEP): no verdict on the knob yet.
            ceiling = Mark(e.new, before, now + MAX_RETRY_SECONDS)
            self.state.step_ceilings[(e.stage.key, e.knob.name)] = ceiling
            return
        # A stage that waits, inline, with its consumer waiting on it is tried again soon: a
        # trial judged against a window from before a change of load failed for that alone
        # (a map turned I/O-bound stayed inline at 16 batches/s for 4 s).
        inline_waiting = e.knob.name == "parallelism" and e.old == 0
        inline_waiting = inline_waiting and before.waits and e.baseline_stall > STALL
        longest = INLINE_RETRY_SECONDS if inline_waiting else MAX_RETRY_SECONDS
        self.state.mark_saturated(e.stage.key, e.knob.name, e.old, before, now, longest)
        if e.knob.name == "executor":
            _, wait = self.state.process_retry.get(e.stage.key, (0.0, PROCESS_RETRY_SECONDS))
            self.state.process_retry[e.stage.key] = (now + wait, 2 * wait)

    def _back_to_knee(
        self, e: Experiment, rate_ratio: float, stall: float, now: float, windows: list[Window]
    ) -> Experiment | None:
        """A big step up in calls in flight (x8 for waiting work) that raised the rate far
        less than in proportion went past the knee, where the GIL (or the input) lets no
        more run and threads only add hand-offs: 16 -> 128 threads on 2 ms waits gained x4,
        and 64 ran 4x faster than 256. Below the knee the rate grew with the calls: the knee
        is near ``old * rate_ratio``. Try it (a little above) as a decrease of its own."""
        # Only while the consumer still waits about as much: else it, not the stage, held
        # the rate (a consumer-bound pass gains little from any step).
        if e.knob.name != "parallelism" or e.old < 1 or stall < KNEE_SHARE * e.baseline_stall:
            return None
        step = e.new / e.old
        if step < KNEE_STEP or rate_ratio >= KNEE_SHARE * step:
            return None
        # Its workers now wait on its input: the stage it reads from holds the rate, not the
        # calls in flight here; that one grows next. (Cut back to the knee instead, 108
        # threads of 2 ms waits fed by one computing thread sat at 39, and 300 batches/s.)
        tested = next((w for w in windows if w.stage.key == e.stage.key), None)
        if tested is not None and policy.input_bound(tested):
            return None
        knee = math.ceil(e.old * max(1.0, rate_ratio) * KNEE_MARGIN)
        if knee >= e.new:
            return None
        applied = self._set(
            e.stage,
            e.knob,
            knee,
            f"{e.old} -> {e.new} calls raised the rate only x{rate_ratio:.1f}: past the knee, "
            f"about {e.old} x {rate_ratio:.1f}",
        )
        return Experiment(
            e.stage,
            e.knob,
            e.new,
            applied,
            -1,
            e.baseline_rate * rate_ratio,
            stall,
            now,
            e.baseline_rates,
            e.baseline_waits,
            baseline_judged=e.baseline_judged,
        )

    def _before(self, e: Experiment) -> Judged:
        """What ``e``'s stage was judged on before the change: a knob taken back is back
        there, not where the window after the change measured it."""
        return e.baseline_judged.get(e.stage.key) or self._judged_now(e.stage.key)

    def _chain(self, e: Experiment, windows: list[Window], now: float) -> Experiment | None:
        """A scale-up that did not pay may have moved the bottleneck to the stage it reads
        from (see ``policy.chain_partner``): grow that stage too, keeping ``e`` meanwhile;
        the pair is judged against the rate before ``e``. The chained experiment, if any."""
        if e.chained_from is not None or e.companion is not None or e.knob.name != "parallelism":
            return None
        move = policy.chain_partner(
            e.stage, e.knob.name, e.new, e.baseline_waits, windows, self._situation(now)
        )
        if move is None:
            return None
        parallelism = move.stage.knobs[move.knob]
        old = parallelism.value
        applied = self._set(move.stage, parallelism, move.value, move.reason)
        return Experiment(
            move.stage,
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
            baseline_judged=e.baseline_judged,
        )
