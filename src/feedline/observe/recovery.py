"""Did a pass keep up after its load changed? A judgement from what the process could use.

Over the second half of each phase (the first half is AUTOTUNE's to find the new setting),
the pass kept up if its consumer was served (it waited at most ``SERVED`` of the time), or if
the process used at least ``BUSY_SHARE`` of the cores it could have had (its own plus those
the machine left idle): a pipeline held up by a stage left inline on I/O uses a few percent
of them; a tuned one, on latency or on computing work, half or more. Cores other programs
keep busy are not counted against it, so on a machine they fill, a second sign is read that
no load hides: a stage whose work mostly waits, run one call at a time (or inline) while its
consumer waits on it most of the time, is held up whatever the machine does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from feedline.autotune.constants import WAITING_WORK
from feedline.observe.timeline import Window
from feedline.runtime.machine import idle_cpu_seconds

SERVED = 0.10
BUSY_SHARE = 0.35
# Phases shorter than this are not judged: AUTOTUNE takes a few windows to find a setting.
SHORTEST_JUDGED = 3.0


@dataclass(frozen=True)
class Reading:
    wall: float
    cpu: float  # this process's CPU seconds
    idle: float | None  # the machine's idle CPU seconds, if known
    waited: float  # the consumer's seconds spent waiting for data


def read(waited: float) -> Reading:
    return Reading(time.perf_counter(), time.process_time(), idle_cpu_seconds(), waited)


@dataclass(frozen=True)
class Verdict:
    phase: str
    judged: bool
    kept_up: bool
    detail: str


def held_up_by(window: Window | None) -> str | None:
    """A stage of ``window`` whose waiting work, one call at a time, held its consumer up."""
    for stage in () if window is None else window.stages:
        share = stage.cpu_share
        if (
            stage.own_work
            and stage.knobs.get("parallelism", 2) <= 1
            and stage.consumer_wait > 0.5
            and share is not None
            and share < WAITING_WORK
        ):
            return stage.name
    return None


def judge(
    phase: str, seconds: float, middle: Reading, end: Reading, window: Window | None
) -> Verdict:
    """Whether the pass kept up over ``middle`` .. ``end`` of a phase ``seconds`` long;
    ``window``: what its stages did over that span."""
    if seconds < SHORTEST_JUDGED:
        return Verdict(phase, False, True, f"{phase}: too short to judge ({seconds:.1f} s)")
    span = max(end.wall - middle.wall, 1e-9)
    waited = (end.waited - middle.waited) / span
    cores = (end.cpu - middle.cpu) / span
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    available = float(cpus or 1)
    if end.idle is not None and middle.idle is not None:
        available = min(available, cores + (end.idle - middle.idle) / span)
    share = cores / max(available, 1e-9)
    stuck = held_up_by(window)
    kept_up = (waited <= SERVED or share >= BUSY_SHARE) and stuck is None
    detail = (
        f"{phase}: consumer waited {waited:.0%}, the process used {cores:.2f} of "
        f"{available:.2f} cores it could have ({share:.0%})"
    )
    if stuck is not None:
        detail += f"; {stuck} waits on one call at a time"
    return Verdict(phase, True, kept_up, detail)
