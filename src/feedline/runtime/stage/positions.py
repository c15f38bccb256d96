"""A stage's state: where its input resumes, and what was delivered after that point.

The consumer's position is the oldest chunk not fully delivered -- its input state and start
position -- plus the positions already delivered after it. A finishing-order stage also gives
out ``Journal`` states that go on recording what it delivers (``runtime/replay.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.replay import ForcedOrder, Journal
from feedline.runtime.stage.core import Chunk, StageCore


class StateSide(StageCore):
    """``get_state`` and the journals of states given out (under ``_lock``)."""

    def _journal(self, positions: Sequence[int]) -> None:
        """Record delivered positions in every state given out that is still held."""
        with self._lock:
            alive = []
            for ref in self._journals:
                journal = ref()
                if journal is not None:
                    journal.record(positions)
                    alive.append(ref)
            self._journals = alive

    def get_state(self) -> State:
        with self._input_lock, self._lock:
            oldest = self._oldest_of_plain_run()
            if oldest is not None:
                state = plain_run_state(oldest)
            else:
                state = resume_state(
                    self._open.values(), self._next_position, self._skip, self._replay, self._input
                )
            if self.deterministic:
                return state
            journal = Journal(state)
            owed = [] if self._replay is None else self._replay.still_forced(self._undelivered)
            journal["then"] = owed
            journal.pending = sum(b - a for a, b in owed)
            self._journals.append(weakref.ref(journal))
            return journal

    def _oldest_of_plain_run(self) -> Chunk | None:
        """The oldest open chunk, when the open chunks are a run of plain ranges delivered in
        order: only the oldest can be partly delivered, and the state follows from it alone.
        This is the common case, and the next stage reads this state for every chunk it
        pulls: at 880 open chunks, ``resume_state`` took 390 us, under the input lock."""
        if not self.deterministic or self._replay is not None or self._skip:
            return None
        if self._deliver_seq < self._plain_from_seq:
            return None
        return self._open.get(self._deliver_seq)

    def _undelivered(self, seq: int) -> Sequence[int]:
        chunk = self._open[seq]
        return chunk.positions[chunk.delivered :]


def plain_run_state(oldest: Chunk) -> State:
    """``resume_state`` when the open chunks run from ``oldest`` on, each a plain range
    starting where the one before ended, and only ``oldest`` is partly delivered."""
    delivered = oldest.delivered
    skip = [[oldest.start, oldest.start + delivered]] if delivered else []
    return {"input": oldest.start_state, "start": oldest.start, "skip": skip}


def resume_state(
    open_chunks: Iterable[Chunk],
    next_position: int,
    skip: list[list[int]],
    replay: ForcedOrder | None,
    source: StageIterator,
) -> State:
    """Where the input resumes, and every position from there on already delivered:
    all those pulled (up to ``next_position``) and not still to deliver in an open chunk (or
    held for a forced order), and the restored state's skips not yet reached. ``source``'s
    state is read only when nothing is open."""
    later_skips = [[max(a, next_position), b] for a, b in skip]
    later_skips = [r for r in later_skips if r[0] < r[1]]
    chunks = list(open_chunks)
    held = [] if replay is None else [[p, p + 1] for p in replay.held]
    if replay is not None and replay.replaying:
        start_state, start = replay.start_state, replay.start
    elif chunks:
        oldest = min(chunks, key=lambda c: c.start)
        start_state, start = oldest.start_state, oldest.start
    else:
        return {"input": source.get_state(), "start": next_position, "skip": later_skips}
    to_deliver: list[list[int]] = held
    for chunk in chunks:
        rest = chunk.positions[chunk.delivered :]
        if isinstance(rest, range):
            if len(rest):
                to_deliver.append([rest.start, rest.stop])
        else:
            to_deliver += [[p, p + 1] for p in rest]
    done: list[list[int]] = []
    at = start
    for a, b in merge_ranges(to_deliver):
        if a > at:
            done.append([at, a])
        at = max(at, b)
    if at < next_position:
        done.append([at, next_position])
    return {"input": start_state, "start": start, "skip": merge_ranges(done + later_skips)}


def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged
