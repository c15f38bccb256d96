"""The limits a move must keep: the RAM budget (what stages' buffers and worker processes
hold) and the pass's thread budget, in the words the history uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from feedline.autotune.budget import Budget, format_bytes
from feedline.runtime.tunable import PROCESSES, Knob, Tunable

if TYPE_CHECKING:
    from feedline.autotune.policy import Situation, Window


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


def fits(s: Situation, buffers: float, new_workers: int) -> bool:
    """Buffers holding ``buffers`` bytes, the running worker processes and
    ``new_workers`` more: within the RAM budget?"""
    workers = s.workers_rss
    if new_workers:  # the estimate may read this process's memory: only when needed
        workers += new_workers * s.rss_per_worker()
    return buffers + workers <= s.budget.ram


def ram_allows(
    windows: Sequence[Window],
    w: Window,
    s: Situation,
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
    return fits(s, buffers, added)


def thread_budget_words(knob: Knob, wanted: int) -> str:
    """Why ``knob`` stops short of ``wanted``: the pass's thread budget, in words."""
    budget = knob.budget
    if budget is None:
        return f"at most {knob.maximum}"
    return (
        f"the pass's thread budget allows {knob.most()} of {wanted}: "
        f"{budget.in_use()} of its {budget.limit} threads in use"
    )


def ram_floor_warning(
    stage: Tunable, bytes_per_element: float, worker_rss: float, budget: Budget
) -> str | None:
    """What to tell the user when ``stage``, running on workers, holds more than the RAM
    budget even at its smallest (one worker, the least buffer); None when it fits."""
    if not bytes_per_element or stage.knobs["parallelism"].value < 1:
        return None
    least = least_bytes(stage, bytes_per_element, worker_rss)
    if least <= budget.ram:
        return None
    executor = stage.knobs.get("executor")
    held = "its smallest buffer and the element its consumer holds"
    if executor is not None and executor.value == PROCESSES:
        held += ", and a worker process"
    return (
        f"{stage.name} may hold {format_bytes(least)} with even one worker ({held}, "
        f"{format_bytes(bytes_per_element)} an element): more than the RAM budget of "
        f"{format_bytes(budget.ram)}, which cannot be kept; raise "
        "Options.autotune.ram_budget or make the elements smaller"
    )
