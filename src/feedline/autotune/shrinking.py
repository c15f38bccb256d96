"""The tuner's rules that take workers or buffer away: from a stage its consumer never waits
on, from one whose work computes on more workers than cores, and, once more did not help,
from the stage that might run as fast with fewer. Pure functions of the windows and the
situation, as the rules that add (``policy.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from feedline.autotune.constants import (
    BUSY,
    CHEAP_WORK,
    FEWER_SLACK,
    HICCUP_MEMORY_MAX,
    IDLE,
    NO_STALL,
    SHRINK_BLAME_SECONDS,
    STALL,
    WORKERS_MARGIN,
)
from feedline.autotune.experiments import Shrink
from feedline.autotune.policy import (
    Move,
    Situation,
    Window,
    computes_under_contention,
    input_bound,
    waits,
)


def computes_on_too_many_workers(w: Window, s: Situation) -> bool:
    workers = w.stage.knobs["parallelism"].value
    return workers > s.budget.cpu and computes_under_contention(w)


def fewer_may_keep(w: Window) -> bool:
    """Could one worker less keep this stage's rate? Not when the cores its workers use
    need all of them (computing threads or processes at the CPU budget). Going inline
    (from one worker) always may: the consumer's thread then does the work."""
    workers = w.stage.knobs["parallelism"].value
    return workers <= 1 or w.cores < workers - 1 + FEWER_SLACK


def scale_down(windows: Sequence[Window], s: Situation, served: bool, reason: str) -> Move | None:
    """Fewer workers, or a smaller buffer, for the first of ``windows`` (most idle first)
    that can shrink. ``served``: the consumer is served (rather than waiting while more
    workers did not help)."""
    for w in sorted(windows, key=lambda w: w.idle, reverse=True):
        if w.stage.key in s.floor_reached:
            continue
        # A consumer served now that waited on the stage a moment ago meets hiccups (a slow
        # read now and then): what covers them looks idle in between. Only once they stop.
        if served and w.stage.key in s.waited_recently:
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
            return Move(w.stage, parallelism.name, target, reason, -1)
        buffer = w.stage.knobs["buffer_size"]
        if buffer.tunable and buffer.value > 1 and served and w.idle > IDLE:
            return Move(w.stage, buffer.name, buffer.value // 2, reason, -1)
    return None


def workers_needed(w: Window) -> int:
    """Workers the stage's rate keeps at work (Little's law: its rate times the time of an
    element, ``busy`` of the workers it has), with WORKERS_MARGIN for the rate's swings.
    (Only for computing work: waiting work that stalls now and then, a slow read among fast
    ones, needs its calls in flight for the stalls, which an average rate hides.)"""
    workers = max(1, w.stage.knobs["parallelism"].value)
    return math.ceil(WORKERS_MARGIN * w.busy * workers)


def shed_excess(windows: Sequence[Window], s: Situation) -> Move | None:
    """Fewer workers, at once, for a stage whose work computes on more workers than cores
    while they idle: its work turned cheap (a map that stopped waiting on I/O keeps its
    dozens of threads). Such threads hand the GIL round among themselves and slow the whole
    pass, including the experiments that would find the new bottleneck: 37 threads left on a
    map turned cheap made 121 threads on the next map, now waiting, run at 150 batches/s
    where alone they reached 700."""
    for w in windows:
        parallelism = w.stage.knobs["parallelism"]
        if (
            not parallelism.tunable
            or not w.stage.has_own_work
            or parallelism.value <= s.budget.cpu
            or w.idle <= IDLE
            # Computing as measured: a window whose workers only idled saw no work at all.
            or w.cpu_share is None
            or waits(w, s)
            or w.stage.key in s.floor_reached
        ):
            continue
        target = max(1, min(int(s.budget.cpu), workers_needed(w)))
        reason = (
            f"computes (cpu {w.computing_share:.0%} of wall) on {parallelism.value} workers, "
            f"idle {w.idle:.0%} of the time: {target} keep its rate"
        )
        return Move(w.stage, parallelism.name, target, reason, -1)
    return None


def shed_spare(windows: Sequence[Window], s: Situation) -> Move | None:
    """Fewer workers for a stage whose own consumer never waits on it while they idle,
    whatever the consumer's waits: those come from elsewhere (a consumer that sleeps
    between elements waits for the GIL at every wake-up; on a loaded machine, for a core)."""
    spare = [w for w in windows if w.consumer_wait < NO_STALL / 2 and w.idle > IDLE]
    return scale_down(spare, s, served=True, reason="its consumer never waits on it")


def fewer_after_more_failed(windows: Sequence[Window], s: Situation) -> Move | None:
    """The consumer waits, and more did not help: fewer may be faster, down to none, with
    the work inline in the consumer's thread. So where more was saturated, where workers
    are mostly idle although their consumer waits (the hand-offs cost more than the work),
    and where more computing workers than cores run (started for a first call that
    waited). (Idle workers of costly work, while their consumer waits, are a passing
    moment: the consumer just sped up and has not yet emptied the buffer.)"""
    saturated_keys = {key for key, _ in s.saturated}
    worth_fewer = [
        w
        for w in windows
        if (
            w.stage.key in saturated_keys
            or (w.busy < BUSY and w.seconds_per_element < CHEAP_WORK)
            or computes_on_too_many_workers(w, s)
            or input_bound(w)
        )
        and fewer_may_keep(w)
    ]
    return scale_down(worth_fewer, s, served=False, reason="more workers did not help")


def shrinks_to_undo(shrinks: Sequence[Shrink], stall: float, now: float) -> list[Shrink]:
    """The shrinks to take back, newest first, when the consumer stalls: those kept within
    SHRINK_BLAME_SECONDS. What covers hiccups (a slow read now and then) looks idle in the
    quiet between them, and the stall they cause once uncovered comes a hiccup later, after
    the shrink's own window was judged."""
    if stall <= STALL:
        return []
    return sorted(recent(shrinks, now), key=lambda s: s.at, reverse=True)


def recent(shrinks: Sequence[Shrink], now: float) -> list[Shrink]:
    """The shrinks a stall now would still be blamed on."""
    return [s for s in shrinks if now - s.at < SHRINK_BLAME_SECONDS]


def longer_hiccup_memory(memory: float) -> float:
    """How long a stage its consumer waited on keeps what it has, after a shrink that the
    consumer's stalls took back: twice as long (hiccups that come back are covered longer)."""
    return min(2 * memory, HICCUP_MEMORY_MAX)
