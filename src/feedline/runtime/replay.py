"""The order of a stage that delivers in finishing order, kept for its states and replayed.

Such a stage cannot make its own order again from an old state, yet a stage reading from it
replays by position. So a state it gives out (``Journal``) goes on recording, while anything
holds it, the positions the stage delivers after it was taken, as runs ``[start, end)`` in
delivery order (``then``). Restored, the stage delivers those positions first and in that
order (``ForcedOrder``), and a reader's replay meets the same elements at the same places.

The forced order is replayed a chunk at a time: the input is pulled only as far as the next
run needs, and elements pulled ahead of their turn wait in ``held``. Finishing order strays
from input order only by what was in flight, so what waits stays within a buffer's worth,
however long the pass recorded was.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from feedline.errors import InvalidStateError
from feedline.runtime.iterator import State
from feedline.runtime.states import state_ranges

# Pulls up to n elements from the input: (the elements a restored state does not skip, their
# positions, whether the input had any left).
Pull = Callable[[int], tuple[list[Any], Sequence[int], bool]]


class Journal(dict[str, Any]):
    """A state that records, in ``then``, what its stage delivers after it was taken.

    The first ``pending`` positions delivered are in ``then`` already: what the stage was
    forced to deliver next when the state was taken."""

    __slots__ = ("__weakref__", "pending")
    pending: int

    def record(self, positions: Sequence[int]) -> None:
        if self.pending:
            already = min(self.pending, len(positions))
            self.pending -= already
            positions = positions[already:]
        runs: list[list[int]] = self["then"]
        if isinstance(positions, range) and positions.step == 1:
            _append_run(runs, positions.start, positions.stop)
        else:
            for position in positions:
                _append_run(runs, position, position + 1)


def _append_run(runs: list[list[int]], start: int, end: int) -> None:
    if start >= end:
        return
    if runs and runs[-1][1] == start:
        runs[-1][1] = end
    else:
        runs.append([start, end])


def positions_of(runs: Sequence[Sequence[int]]) -> Iterator[int]:
    for start, end in runs:
        yield from range(start, end)


def read_forced_order(
    state: State, owner: str, start: int, skip: list[list[int]]
) -> list[list[int]]:
    """A state's ``then``: runs of positions, none delivered already, none twice."""
    if "then" not in state:
        return []
    runs = state_ranges(state, "then", owner)
    covered = sorted(r for r in runs if r[0] < r[1])
    for (_, end), (next_start, _) in itertools.pairwise(covered):
        if next_start < end:
            raise InvalidStateError(owner, "then", "names a position twice")
    for a, b in covered:
        if a < start or any(a < s_end and s_start < b for s_start, s_end in skip):
            raise InvalidStateError(owner, "then", f"names positions {a}..{b - 1}, delivered")
    return runs


class ForcedOrder:
    """What a restored stage must deliver first, in order: the runs not yet issued as
    chunks, the chunks issued for them (by sequence number), and elements pulled early."""

    def __init__(self, runs: list[list[int]], start_state: State, start: int, owner: str) -> None:
        self.runs = deque([a, b] for a, b in runs if a < b)
        self.held: dict[int, Any] = {}
        self.seqs: deque[int] = deque()  # forced chunks issued and not yet retired, in order
        # Where the restored input began, live: a state taken mid-replay resumes there.
        self.start_state = start_state
        self.start = start
        self.owner = owner

    @property
    def replaying(self) -> bool:
        """Runs still to issue, or elements pulled early still to issue."""
        return bool(self.runs or self.held)

    @property
    def gates(self) -> bool:
        """Nothing else may be delivered yet."""
        return bool(self.runs or self.seqs)

    def next_chunk(self, size: int, pull: Pull) -> tuple[list[Any], list[int], bool]:
        """The next chunk to issue: (elements, positions, forced). Forced chunks come first;
        then the elements that were in flight when the state was taken, in input order."""
        if not self.runs:
            positions = sorted(self.held)
            raw = [self.held.pop(p) for p in positions]
            return raw, positions, False
        first, last = self.runs[0]
        end = min(last, first + max(1, size))
        while end - 1 not in self.held:
            raw, pulled, more = pull(end - first)
            if not more:
                raise InvalidStateError(
                    self.owner, "then", f"names position {end - 1}, past the end of the input"
                )
            self.held.update(zip(pulled, raw))
        positions = list(range(first, end))
        missing = [p for p in positions if p not in self.held]
        if missing:
            raise InvalidStateError(
                self.owner, "then", f"names positions the state skips: {missing[:5]}"
            )
        if end == last:
            self.runs.popleft()
        else:
            self.runs[0][0] = end
        return [self.held.pop(p) for p in positions], positions, True

    def still_forced(self, undelivered: Callable[[int], Sequence[int]]) -> list[list[int]]:
        """The order still owed, as runs: the issued forced chunks' undelivered positions
        (``undelivered(seq)``), then the runs not issued yet."""
        runs: list[list[int]] = []
        for seq in self.seqs:
            for position in undelivered(seq):
                _append_run(runs, position, position + 1)
        for a, b in self.runs:
            _append_run(runs, a, b)
        return runs
