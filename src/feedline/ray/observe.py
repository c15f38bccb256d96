"""What a distributed pass shows beyond ``it.stats()``: each actor's rate and node, and the
stage's own events (actors started, lost, replaced) with AUTOTUNE's decisions on it."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from feedline.observe.view import PassView


def _stages(it: PassView) -> list[Any]:
    from feedline.ray.stage import DistributedStage

    return [s for s in it.all_stages() if isinstance(s, DistributedStage)]


def actors(it: PassView) -> list[dict[str, Any]]:
    """Each actor of the pass's ``distribute`` stages (``live``: not stopped yet): its stage,
    node, shards, elements made, their rate, and the share of its time it worked."""
    return [{"stage": s.name, **actor} for s in _stages(it) for actor in s.actors()]


def history(it: PassView) -> list[dict[str, Any]]:
    """The ``distribute`` stages' decisions, in time order, as ``stats()`` lists AUTOTUNE's
    (time from the pass's start, stage, knob, old -> new, reason): the stage's own events
    (actors started, lost and replaced) and the tuner's changes of its actor count."""
    names = {s.name for s in _stages(it)}
    events = [
        {
            "time": e.at - it.started,
            "stage": s.name,
            "knob": e.knob,
            "old": e.old,
            "new": e.new,
            "reason": e.reason,
        }
        for s in _stages(it)
        for e in s.events
    ]
    tuner = it.tuner
    if tuner is not None:
        own = {e["reason"] for e in events}  # the first of them is in the tuner's too
        events += [asdict(d) for d in tuner.history if d.stage in names and d.reason not in own]
    return sorted(events, key=lambda e: e["time"])
