"""The parallelism a tuned stage starts with, chosen from its first calls (run inline).

Pure functions: the stage measures, calls ``choose_start`` (a stage with work of its own) or
``choose_read_ahead`` (a prefetch) and applies what it returns, so the rules can be read (and
tested) apart from the threads.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from feedline.runtime.tunable import (
    CHEAP_WORK_SECONDS,
    PURE_WAITING_SHARE,
    READ_AHEAD_MIN_GAP_SECONDS,
    READ_AHEAD_PULL_SECONDS,
    READ_AHEAD_WORTH_SHARE,
    SERVED_WAIT_SHARE,
)

# The consumer's calls a read-ahead stage watches before it chooses (the first, which also
# starts the input, is not one of them): a few of a 10 ms training step are 40 ms, where the
# tuner's first verdict needs two windows (~0.4 s) of a consumer waiting on inline pulls.
READ_AHEAD_CALLS = 4
# A first chunk this costly per element, of computing work, is chosen for at once: no
# function's first-call costs (tens of microseconds) make it, and a second costly chunk
# inline would only hold the workers back.
CLEARLY_COSTLY_SECONDS = 10 * CHEAP_WORK_SECONDS


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


class FirstCalls:
    """The consumer's first calls to an inline read-ahead stage: its own time between two
    calls (``gaps``) and the time each call waited for the input to be pulled (``pulls``)."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.pulls: list[float] = []
        self._last_end: float | None = None

    def add(self, started: float, ended: float) -> bool:
        """One call, from ``started`` to ``ended``; True once enough are seen to choose."""
        if self._last_end is not None:
            self.gaps.append(started - self._last_end)
            self.pulls.append(ended - started)
        self._last_end = ended
        return len(self.gaps) >= READ_AHEAD_CALLS


def choose_read_ahead(gaps: Sequence[float], pulls: Sequence[float]) -> tuple[int, str] | None:
    """Start reading ahead on a thread (1, and why), or None to stay inline and leave the
    choice to the tuner: the same test as the tuner's rule, on medians of the first calls
    (one slow call is the input starting, not what the consumer does)."""
    gap, pull = statistics.median(gaps), statistics.median(pulls)
    cycle = gap + pull
    if (
        gap >= READ_AHEAD_MIN_GAP_SECONDS
        and gap >= READ_AHEAD_WORTH_SHARE * cycle
        and (pull >= SERVED_WAIT_SHARE * cycle or pull >= READ_AHEAD_PULL_SECONDS)
    ):
        return 1, (
            f"its consumer's first calls came {gap * 1e3:.1f} ms apart and waited "
            f"{pull * 1e6:.0f} us each for it ({pull / cycle:.1%}): read ahead on a thread "
            "to overlap the two"
        )
    return None
