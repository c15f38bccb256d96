"""How many actors: the rule for a ``distribute`` stage, a pure function of one window.

The tuner's rules for threads do not fit actors: they cap computing work at this process's
cores (an actor brings its own, on another machine), scale waiting work by x2 or x8 (an
actor costs seconds and ~0.5 GiB to start), and cannot see the cluster. This rule adds one
actor at a time while the consumer waits on the stage, its actors are busy and the cluster
has a CPU free for one more; it retires one while the consumer is served and the work of all
would fit, busy, on one fewer. It waits, without a move, while an actor is starting (what it
adds is not measurable yet). ``DistributedStage.actor_window`` gives its inputs, and the
stage applies the move to its ``parallelism`` knob itself (``DistributedStage._tune``) until
the tuner's loop calls this rule for such stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from feedline.autotune.constants import BUSY, NO_STALL, STALL

# Actors retire only when the others would still have this much of their time to spare.
HEADROOM = 0.8


@dataclass(frozen=True)
class ActorWindow:
    """A ``distribute`` stage over one window, as the rule reads it."""

    consumer_wait: float  # share of the window its consumer waited on it
    busy: Sequence[float]  # per actor up: share of the window it worked
    starting: int  # actors started, not up yet
    free_cpus: float  # CPUs the cluster has free (for one more actor: CPUS_PER_ACTOR)
    most: int  # at most this many actors (max_workers, the virtual shards)
    cpus_per_actor: float = 1.0


@dataclass(frozen=True)
class ActorMove:
    """A new actor count to try, and why."""

    actors: int
    reason: str


def actor_move(w: ActorWindow) -> ActorMove | None:
    """One more actor, one fewer, or None (see the module's docstring)."""
    n = len(w.busy)
    if w.starting or n == 0:
        return None  # what a starting actor adds is not measurable yet
    mean_busy = sum(w.busy) / n
    if w.consumer_wait > STALL:
        if mean_busy < BUSY or n >= w.most:
            return None  # the actors wait too (on their calls, the bytes budget) or cannot grow
        if w.free_cpus < w.cpus_per_actor:
            return None  # no CPU for one more: it would sit unplaced
        return ActorMove(
            n + 1,
            f"consumer waits {w.consumer_wait:.0%} of the time; {n} actors busy "
            f"{mean_busy:.0%}; the cluster has {w.free_cpus:g} CPUs free",
        )
    if w.consumer_wait < NO_STALL and n > 1 and sum(w.busy) <= (n - 1) * HEADROOM:
        return ActorMove(
            n - 1,
            f"consumer never waits; {n} actors busy {mean_busy:.0%}: {n - 1} can do their work",
        )
    return None
