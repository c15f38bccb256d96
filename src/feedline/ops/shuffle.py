"""shuffle: a bounded random buffer, seeded per pass."""

from __future__ import annotations

from typing import Any

from feedline.errors import InvalidStateError
from feedline.ops.base import Op, UnaryIterator, UnaryOp
from feedline.ops.randomness import PassKeys
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State, skip_elements
from feedline.runtime.states import known_end, state_int, state_nested

_UNIFORM_BLOCK = 256


class ShuffleOp(UnaryOp):
    """A random buffer; each pass is seeded by its ``PassKeys`` key (see ops/randomness.py).
    With ``reshuffle_each_iteration=False`` every pass has the same order."""

    def __init__(
        self, input_op: Op, buffer_size: int, seed: int | None, reshuffle_each_iteration: bool
    ) -> None:
        super().__init__(input_op)
        self.buffer_size = buffer_size
        self.passes = PassKeys(seed, vary_per_pass=bool(reshuffle_each_iteration))
        self.name = f"shuffle({buffer_size})"

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return ShuffleIterator(self, ctx, state)


class ShuffleIterator(UnaryIterator):
    """Fills the buffer, then repeatedly emits a random slot and refills it from the input.

    Its saved state is the input's state at the start of the pass plus a count: restoring
    replays the pass up to that count. That keeps states small (no buffered elements in them)
    at the price of re-reading the input up to the saved point.
    """

    def __init__(self, op: ShuffleOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        produced = 0
        if state is not None:
            produced = state_int(state, "produced", op.name, 0, known_end(op.cardinality()))
            state_nested(state, "input_start", op.name)  # reported before a bad key
        self.pass_key = op.passes.key(ctx, state, op.name)
        super().__init__(op, ctx, state, field="input_start")
        # Taken from the input even when restored: the saved one is a frozen copy, and an
        # input that delivers in finishing order records its order only in the live one.
        self.input_start = self.input.get_state()
        self.rng = PassKeys.generator(self.pass_key)
        self.buffer: list[Any] = []
        self.exhausted = False
        self.produced = 0
        self._uniforms: list[float] = []
        if produced:
            self.catch_up(self._replay, produced)

    def _replay(self, produced: int) -> None:
        if skip_elements(self, produced) < produced:
            raise InvalidStateError(
                self.op.name,
                "produced",
                f"is {produced}: the pass it resumes has only {self.produced} elements",
            )

    def _fill(self) -> None:
        missing = self.op.buffer_size - len(self.buffer)
        while missing > 0 and not self.exhausted:
            chunk = self.input.next_chunk(missing)
            if not chunk:
                self.exhausted = True
                break
            self.buffer.extend(chunk)
            missing -= len(chunk)

    def __next__(self) -> Any:
        self._fill()
        buffer = self.buffer
        if not buffer:
            raise StopIteration
        if not self._uniforms:
            self._uniforms = self.rng.random(_UNIFORM_BLOCK).tolist()
            self._uniforms.reverse()
        i = int(self._uniforms.pop() * len(buffer))
        element = buffer[i]
        buffer[i] = buffer[-1]
        buffer.pop()
        self.produced += 1
        return element

    def get_state(self) -> State:
        return {
            **PassKeys.as_state(self.pass_key),
            "input_start": self.input_start,
            "produced": self.produced,
        }
