"""The parallelism a tuned stage starts with, chosen from its first calls (run inline).

A pure function: the stage measures, calls ``choose_start`` and applies what it returns, so
the rule can be read (and tested) apart from the threads.
"""

from __future__ import annotations

from collections.abc import Callable

from feedline.runtime.tunable import CHEAP_WORK_SECONDS, PURE_WAITING_SHARE


def waits(share: float) -> bool:
    """Work whose CPU time is this share of its wall time is almost all waiting."""
    return share < PURE_WAITING_SHARE


def choose_start(
    cores: int,
    cost: float,
    share: float,
    most: Callable[[], int],
    projected_bytes: Callable[[int], float],
    max_buffer_bytes: int,
) -> tuple[int, str]:
    """The parallelism to start with, and why.

    ``cores``: what the stage was told to start with (a worker per core); ``cost``: wall
    seconds per element of the first calls; ``share``: their CPU time / wall time; ``most``:
    the most workers the stage may start (asked only for waiting work); ``projected_bytes``:
    what the stage would buffer at a given parallelism.
    """
    if cost < CHEAP_WORK_SECONDS:
        return 0, f"{cost * 1e6:.0f} us per element: cheaper inline than a hand-off"
    if not waits(share):
        return cores, f"its first call computes (cpu {share:.0%} of wall): a worker per core"
    # Waiting is not bound by the cores: as many calls in flight as would keep them busy were
    # every call like this one. The tuner sees the calls after it, and takes threads that turn
    # out to compute down or to processes. The pass's other stages need threads too: those
    # still to choose, and those made later.
    limit = most()
    start = limit if limit * share <= cores else int(cores / share)
    while start > 1 and projected_bytes(start) > max_buffer_bytes:
        start //= 2
    reason = (
        f"its first calls wait (cpu {share:.1%} of wall): workers to keep "
        f"{cores} cores busy, within the maximum, the buffer's bytes and a share "
        "of the pass's threads"
    )
    return start, reason
