"""The tuner's rules: pure functions of what was measured (stage windows, the process's
cores, budgets, knob bounds, what earlier experiments taught) that propose one move, or none.

The rules that take workers or buffer away are in ``shrinking.py``. Their thresholds, with
what was measured to set them, are in ``constants.py``. ``tuner.py``
runs the loop that applies a move, judges it and keeps it or takes it back; nothing here
changes a knob.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from feedline.autotune.budget import Budget
from feedline.autotune.constants import (
    BUSY,
    CHEAP_WORK,
    CPU_FULL,
    FREE_CORES_FOR_PROCESSES,
    GAIN,
    GIL_CORES,
    GIL_FREE_CORES,
    HELD_IN_ORDER,
    INPUT_BOUND,
    LONG_PULL,
    LONG_WINDOW,
    MANY_WAITING_CORES,
    MIN_WINDOW,
    NO_STALL,
    OVERLAP_MIN_SECONDS,
    OVERLAP_WORTH,
    PROCESS_GAIN,
    PROCESS_WORTH,
    PURE_WAITING,
    STALL,
    THREADS_LEAVE_CORES,
    WAITING_CORES,
    WAITING_WORK,
)
from feedline.autotune.limits import fits, ram_allows, thread_budget_words
from feedline.autotune.windows import StageWindow
from feedline.runtime.tunable import PROCESSES, Knob, Tunable

Window = StageWindow[Tunable]


@dataclass(frozen=True)
class Move:
    """A knob change to try as an experiment, with the reason for it."""

    stage: Tunable
    knob: str
    value: int
    reason: str
    direction: int = +1  # +1 scale up, -1 scale down
    # Shortest settling and measuring windows: longer where the change takes time to show.
    min_window: float = MIN_WINDOW
    # The rate must rise this much for a scale-up to be kept.
    min_gain: float = GAIN
    # Another knob set with it, if it is not there already (knob name, value, reason), and
    # restored with it.
    companion: tuple[str, int, str] | None = None
    # Not an experiment: threads handed to another stage, whose scale-up is then judged.
    hands_over: bool = False


@dataclass(frozen=True)
class Note:
    """What a rule learned of a stage's knob on its way: more cannot be had there
    (``saturated``), and/or the pass's thread budget stopped it short of ``wanted``."""

    stage: Tunable
    knob: Knob
    saturated: bool = False
    wanted: int | None = None


@dataclass(frozen=True)
class Proposal:
    """A rule's answer: at most one move, or a hold (the knobs stay still while a reading
    goes on; ``ready``: a stage whose worker processes may start meanwhile), and its notes."""

    move: Move | None = None
    hold: bool = False
    ready: Tunable | None = None
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True)
class Situation:
    """Everything but the stage windows that the rules read, as of the last window."""

    budget: Budget
    now: float
    cores_in_use: float  # the whole process's CPU use over the last window
    idle_cores: float | None  # cores the machine left idle over it, if known
    # Since the knobs last changed: how long, the cores the process used (at least as many
    # as over the last window), and the cores the machine left idle (at most as many).
    knobs_held_for: float
    cores_held: float
    idle_held: float | None
    workers_rss: int  # resident bytes of the run's worker processes
    rss_per_worker: Callable[[], int]  # what one more is expected to hold (read when needed)
    # What earlier experiments taught (read only):
    saturated: Mapping[tuple[object, str], int]  # (stage key, knob) -> more did not help
    floor_reached: AbstractSet[object]  # stages that cannot shrink further
    process_retry: Mapping[object, tuple[float, float]]  # stage key -> (when, next wait)
    # Stages their consumer waited on in a window of the last HICCUP_MEMORY seconds.
    waited_recently: AbstractSet[object] = frozenset()
    # (stage key, knob) -> a step up to this did not pay: the next stops halfway to it
    ceilings: Mapping[tuple[object, str], int] = field(default_factory=dict)


# -- signs -------------------------------------------------------------------------------


def held_in_order(w: Window) -> bool:
    """Workers blocked on a full buffer while the stage's consumer waited on it: both share
    the window for at least HELD_IN_ORDER of it (each measured as a share of it)."""
    return w.idle + w.consumer_wait - 1 > HELD_IN_ORDER


def input_bound(w: Window) -> bool:
    """The stage's workers spent far more time taking elements from its input than on its
    own work: that input, not this stage, sets the pace."""
    return w.stage.has_own_work and w.input_wall > INPUT_BOUND * max(w.work_wall, 1e-9)


def computes_under_contention(w: Window) -> bool:
    """Threads contending for the GIL only spend less of their time on the CPU: work that
    spends this much of it there computes, whatever its first call did."""
    return w.computing_share >= WAITING_WORK


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


def gil_free(cores_in_use: float, idle_cores: float | None) -> bool:
    """Over the last window the process (using ``cores_in_use``) left the GIL free part of
    the time, on a machine with a core to spare (``idle_cores``, if known): threads wanting
    it would have had it."""
    return (
        cores_in_use < GIL_FREE_CORES
        and idle_cores is not None
        and idle_cores >= FREE_CORES_FOR_PROCESSES
    )


def waits(w: Window, s: Situation) -> bool:
    """The stage's work mostly waits (I/O, latency) rather than computes."""
    free = gil_free(s.cores_in_use, s.idle_cores)
    return mostly_waits(w.computing_share, w.cores, w.stage.solo_cpu_share, free)


def consumer_shifted(rate: float, stall: float, last_rate: float, last_stall: float) -> bool:
    """The consumer changed speed since the last window: what was saturated may not be."""
    if last_rate <= 0:
        return False
    return abs(rate - last_rate) > 0.3 * last_rate or ((stall > STALL) != (last_stall > STALL))


# -- rules -------------------------------------------------------------------------------


def scaled_parallelism(w: Window, windows: Sequence[Window], s: Situation) -> tuple[int, int]:
    """The parallelism to try next for ``w``, and what it would be were it not for the
    pass's thread budget."""
    knob = w.stage.knobs["parallelism"]
    current = knob.value
    cores_taken = s.cores_in_use >= CPU_FULL * s.budget.cpu
    # With every core busy, threads that get little CPU are starved, not waiting: more of
    # them would only add contention.
    if waits(w, s) and not cores_taken:
        # Latency-bound: calls in flight are cheap; when the work is almost all waiting,
        # take big steps (x8), since a run may not last long enough for many small ones.
        # From inline, a core's worth of calls at least: one worker waits as the consumer
        # did, so 0 -> 1 shows no gain and would leave the stage inline.
        step = 8 if w.computing_share < PURE_WAITING else 2
        target = step * max(current, int(s.budget.cpu))
        # Past cores / (CPU share) calls in flight, their CPU parts alone keep every core
        # busy, and each thread more only adds hand-offs (2 ms waits with 20-40 us of numpy:
        # 64 threads ran at 31k elements/s, 256 at 7k). Where the GIL stops them sooner, the
        # knee rule (experiments.py) brings the calls back.
        if w.cpu_share:
            target = min(target, math.ceil(s.budget.cpu / w.cpu_share))
    elif current == 0:
        return min(1, knob.most()), 1
    else:
        # Computing work never gets more workers than the budget has cores, whatever the
        # measured load says (a busy machine can make the cores look free).
        if cores_taken or current + 1 > s.budget.cpu:
            return current, current
        target = current + 1
    ceiling = s.ceilings.get((w.stage.key, knob.name))
    if ceiling is not None and current < ceiling:
        target = min(target, current + max(1, (ceiling - current) // 2))
    while target > current and not ram_allows(windows, w, s, parallelism=target):
        target = current + (target - current) // 2
    wanted = min(target, knob.maximum)
    return min(wanted, knob.most()), wanted


def read_ahead(windows: Sequence[Window], s: Situation, inline_only: bool = False) -> Proposal:
    """Put a read-ahead stage (one with no work of its own) on a thread, or back inline,
    from what its consumer does between calls: a thread overlaps the consumer's own work
    with pulling the input, and is a pure cost when the consumer has none."""
    notes: list[Note] = []
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
            and (w.consumer_wait >= NO_STALL or w.consumer_wait / max(w.rate, 1e-9) >= LONG_PULL)
            and (key, knob.name) not in s.saturated
        ):
            if knob.most() < 1:  # no thread left for it: other stages' turn
                notes.append(Note(w.stage, knob, wanted=1))
                continue
            per_call = w.consumer_wait / max(w.rate, 1e-9)
            reason = (
                f"its consumer works {own:.0%} of the time and waits {w.consumer_wait:.1%} "
                f"for it ({per_call * 1e6:.0f} us a call): read ahead on a thread to overlap "
                "the two"
            )
            move = Move(w.stage, knob.name, 1, reason, min_window=LONG_WINDOW)
            return Proposal(move, notes=tuple(notes))
        if knob.value == 1 and own < OVERLAP_WORTH / 2 and key not in s.floor_reached:
            reason = (
                f"its consumer waits {w.consumer_wait:.0%} of the time, with nothing of its "
                "own to overlap: inline, without hand-offs"
            )
            return Proposal(Move(w.stage, knob.name, 0, reason, -1), notes=tuple(notes))
    return Proposal(notes=tuple(notes))


def give_way(w: Window, windows: Sequence[Window], target: int, wanted: int) -> Move | None:
    """Fewer workers for a stage whose workers wait on their input, when the pass's thread
    budget holds ``w``'s scale-up to less than half of what it wants: that stage's threads
    only wait, and the stage it waits on (maybe ``w`` itself) needs them. (A switch of
    bottleneck left a map 148 threads waiting on the map before it, which the budget held at
    1 of the 16 it wanted: 14 batches/s for 3 s.)"""
    short = wanted - target
    if short <= target:
        return None
    for other in windows:
        knob = other.stage.knobs.get("parallelism")
        if other is w or knob is None or not knob.tunable or knob.value <= 1:
            continue
        if input_bound(other):
            keep = max(1, knob.value - short)
            reason = (
                f"its workers wait on its input: {knob.value - keep} threads for "
                f"{w.stage.name}, which the pass's thread budget holds at {target} of {wanted}"
            )
            return Move(other.stage, knob.name, keep, reason, -1, hands_over=True)
    return None


def scale_up(windows: Sequence[Window], s: Situation) -> Proposal:
    """More for the stage its consumer waits on most that can have it: processes for a
    computing stage held by the GIL, more workers, or a bigger buffer."""
    candidates = sorted(
        (w for w in windows if w.consumer_wait > STALL / 2),
        key=lambda w: w.consumer_wait,
        reverse=True,
    )
    notes: list[Note] = []
    for w in candidates:
        if input_bound(w):
            continue  # its input is a candidate too: the one to grow
        # A computing stage its consumer waits on while the process leaves cores unused is
        # held by the GIL: more threads cannot help, processes may.
        processes = to_processes(w, windows, s)
        if processes is not None:
            return Proposal(processes.move, processes.hold, processes.ready, tuple(notes))
        key = w.stage.key
        parallelism = w.stage.knobs["parallelism"]
        saturated_at = s.saturated.get((key, "parallelism"))
        if (
            parallelism.tunable
            and w.stage.has_own_work  # read-ahead stages: see read_ahead
            and (w.busy > BUSY or parallelism.value == 0 or held_in_order(w))
            # Work this cheap runs inline: a hand-off would cost about as much.
            and not (parallelism.value == 0 and w.seconds_per_element < CHEAP_WORK)
            and (saturated_at is None or parallelism.value < saturated_at)
        ):
            target, wanted = scaled_parallelism(w, windows, s)
            yielding = give_way(w, windows, target, wanted)
            if yielding is not None:
                return Proposal(yielding, notes=tuple(notes))
            if target <= parallelism.value:
                # At a bound: no more threads. If the process cannot use its cores, the
                # GIL is the bound: processes may be.
                stopped = wanted if wanted > target else None
                notes.append(Note(w.stage, parallelism, saturated=True, wanted=stopped))
            else:
                reason = (
                    f"consumer waits {w.consumer_wait:.0%} of the time; workers "
                    f"{'wait' if waits(w, s) else 'compute'} "
                    f"(cpu {w.computing_share:.0%} of wall, {w.cores:.2f} cores)"
                )
                if wanted > target:
                    reason += f"; {thread_budget_words(parallelism, wanted)}"
                return Proposal(Move(w.stage, parallelism.name, target, reason), notes=tuple(notes))
        buffer = w.stage.knobs["buffer_size"]
        buffer_saturated_at = s.saturated.get((key, "buffer_size"))
        if (
            buffer.tunable
            # Inline, the stage hands each element straight over: no buffer to grow. (Its
            # last window may still show the idle time of the workers it just let go.)
            and parallelism.value > 0
            and w.idle > 0.05
            and (buffer_saturated_at is None or buffer.value < buffer_saturated_at)
            and ram_allows(windows, w, s, buffer_size=2 * buffer.value)
        ):
            reason = f"consumer found it empty {w.consumer_wait:.0%} of the time"
            move = Move(w.stage, buffer.name, buffer.value * 2, reason)
            return Proposal(move, notes=tuple(notes))
    return Proposal(notes=tuple(notes))


def to_processes(w: Window, windows: Sequence[Window], s: Situation) -> Proposal | None:
    """Move a computing stage held by the GIL to worker processes (or hold still while the
    reading that would decide it goes on); None when processes are not for it now."""
    executor = w.stage.knobs.get("executor")
    if (
        executor is None
        or not executor.tunable
        or executor.value == PROCESSES
        or (w.stage.key, "executor") in s.saturated
        or s.now < s.process_retry.get(w.stage.key, (0.0, 0.0))[0]
        or waits(w, s)
        or w.cpu_per_element < PROCESS_WORTH
        or s.budget.cpu < 2
    ):
        return None
    if not computes_under_contention(w) and (
        # Threads that wait (I/O) look GIL-bound when there are many of them: what the
        # work does alone tells them apart.
        (w.stage.solo_cpu_share is not None and w.stage.solo_cpu_share < WAITING_WORK)
        # More workers than cores came from waiting (computing stages stop at the cores):
        # its calls in flight, not the GIL, set its rate.
        or w.stage.knobs["parallelism"].value > s.budget.cpu
    ):
        return None
    # The cores are read both in the last window and since the knobs were last set: one
    # short window can fall in a slow moment of the machine (image decoding's two threads
    # read 1.33-1.82 cores from one run to the next).
    cores = s.cores_held
    unused = s.budget.cpu - cores
    # Held by the GIL: threads together use about one core.
    held = cores < min(CPU_FULL * s.budget.cpu, GIL_CORES)
    # Or a thread per core already, yet the cores are not all used: the threads wait on
    # each other (the GIL between the native calls of the function) part of the time.
    waiting_on_each_other = (
        w.stage.knobs["parallelism"].value >= s.budget.cpu
        and unused > THREADS_LEAVE_CORES * s.budget.cpu
    )
    if not (held or waiting_on_each_other):
        return None
    # Cores kept busy by other processes look like the GIL from inside; processes would
    # not get them either.
    idle = s.idle_held
    cores_free = idle is None or idle >= min(FREE_CORES_FOR_PROCESSES, unused / 2)
    # A move for a large gain (the GIL holds the threads to one core) on a reading that
    # held for two windows; one for a small gain (threads leaving a few cores unused) on a
    # reading over LONG_WINDOW. Until then the knobs stay as they are, to read it.
    if s.knobs_held_for < (2 * MIN_WINDOW if held else LONG_WINDOW):
        # A move likely: what it needs, started meanwhile.
        return Proposal(hold=True, ready=w.stage if held and cores_free else None)
    if not cores_free:
        return None
    workers = int(s.budget.cpu)  # computing work: one process per core
    if not fits(s, sum(x.stage.projected_bytes() for x in windows), workers):
        return None  # the processes would not fit in the RAM budget
    reason = (
        f"computes, yet the process uses {cores:.2f} of {s.budget.cpu:.0f} "
        f"cores{' with a thread per core' if not held else ''}: the GIL; moving the "
        "function to processes"
    )
    move = Move(
        w.stage,
        executor.name,
        PROCESSES,
        reason,
        min_window=LONG_WINDOW,
        # Threads already near the cores: the gain must be clear.
        min_gain=GAIN if held else PROCESS_GAIN,
        companion=("parallelism", workers, "one worker process per core"),
    )
    return Proposal(move)


def chain_partner(
    tried: Tunable,
    knob: str,
    value: int,
    baseline_waits: Mapping[object, float],
    windows: Sequence[Window],
    s: Situation,
) -> Move | None:
    """A scale-up (``tried``'s ``knob`` to ``value``) that did not pay may have moved the
    bottleneck to the stage it reads from: two stages at about the same rate gain nothing
    when either grows alone. If a stage's reader now waits on it clearly more than before
    (``baseline_waits``), grow that stage too, to be tried with it."""
    for w in sorted(windows, key=lambda w: w.consumer_wait, reverse=True):
        parallelism = w.stage.knobs.get("parallelism")
        if (
            w.stage.key == tried.key
            or parallelism is None
            or not parallelism.tunable
            or not w.stage.has_own_work
            or w.consumer_wait < STALL / 2
            or w.consumer_wait < baseline_waits.get(w.stage.key, 0.0) + STALL
        ):
            continue
        target, _ = scaled_parallelism(w, windows, s)
        if target <= parallelism.value:
            continue
        reason = (
            f"its reader waits on it {w.consumer_wait:.0%} of the time with "
            f"{tried.name}'s {knob} at {value}: tried with it"
        )
        return Move(w.stage, parallelism.name, target, reason)
    return None
