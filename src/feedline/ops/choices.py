"""The slot choices of an interleave that reads in finishing order, kept for its states.

In finishing order an interleave passes over a slot with nothing ready for one that has,
so a restored pass would choose differently, and a reader that replays it by position (a
``map`` after it) would meet other elements there. Every other step of the interleave is
fixed by its slots' contents, so the jumps (at which step, to which slot) are all that must
be replayed: a state records the jumps made after it was taken, and a pass restored from it
makes the same ones until it has delivered as many elements, then chooses freely again.
"""

from __future__ import annotations

import weakref
from typing import Any

from feedline.errors import InvalidStateError
from feedline.runtime.iterator import State
from feedline.runtime.states import LiveState, check_int, state_int, state_list


class ChoiceLog:
    """Steps and deliveries of one interleave pass, the jumps it made since the oldest state
    still held, and the jumps it must make while replaying a restored state."""

    def __init__(self) -> None:
        self.steps = 0
        self.deliveries = 0
        self._jumps: list[tuple[int, int]] = []  # (step, slot), steps ascending
        self._forced: dict[int, int] = {}
        self._forced_until = 0  # deliveries
        self._states: list[weakref.ref[ChoiceState]] = []

    def restore(self, state: State, owner: str, cycle_length: int) -> None:
        """Take the jumps of ``state`` (written by ``ChoiceState.current``) as forced."""
        if "jumps" not in state:
            return
        self._forced_until = state_int(state, "delivered", owner)
        last = 0
        for pair in state_list(state, "jumps", owner):
            if not isinstance(pair, list) or len(pair) != 2:
                raise InvalidStateError(owner, "jumps", f"holds {pair!r}, not a [step, slot]")
            step = check_int(pair[0], "jumps", owner, last + 1)
            slot = check_int(pair[1], "jumps", owner, 0, cycle_length - 1)
            self._forced[step] = slot
            self._jumps.append((step, slot))
            last = step

    @property
    def forced(self) -> bool:
        return self.deliveries < self._forced_until

    def forced_jump(self) -> int | None:
        return self._forced.get(self.steps)

    def record_jump(self, slot: int) -> None:
        alive = [ref for ref in self._states if ref() is not None]
        self._states = alive
        if not alive:
            self._jumps.clear()
            return
        oldest = min(state.base_step for ref in alive if (state := ref()) is not None)
        while self._jumps and self._jumps[0][0] <= oldest:
            self._jumps.pop(0)
        self._jumps.append((self.steps, slot))

    def state(self, fields: State) -> ChoiceState:
        state = ChoiceState(fields)
        state.log, state.base_step, state.base_deliveries = self, self.steps, self.deliveries
        self._states.append(weakref.ref(state))
        return state

    def since(self, step: int, deliveries: int) -> State:
        return {
            "jumps": [[s - step, slot] for s, slot in self._jumps if s > step],
            "delivered": max(self.deliveries, self._forced_until) - deliveries,
        }


class ChoiceState(LiveState):
    __slots__ = ("base_deliveries", "base_step", "log")
    log: ChoiceLog
    base_step: int
    base_deliveries: int

    def current(self) -> State:
        fields: dict[str, Any] = dict(self)
        return {**fields, **self.log.since(self.base_step, self.base_deliveries)}
