"""assert_cardinality: declare a dataset's number of elements, checked as it is read
(tf.data's ``tf.data.experimental.assert_cardinality``).

``cardinality()`` then reports the declared count (after a ``filter``, say, whose count only
the user knows), and a pass whose input has fewer or more elements fails, as tf.data's does,
once the difference shows: at the end of a short input, or at the first element too many.
"""

from __future__ import annotations

from typing import Any

from feedline.errors import StageError
from feedline.ops.base import INFINITE, Op, UnaryIterator, UnaryOp
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int


class AssertCardinalityOp(UnaryOp):
    def __init__(self, input_op: Op, expected: int) -> None:
        super().__init__(input_op)
        self.expected = expected
        self.name = f"assert_cardinality({expected})"

    def cardinality(self) -> int:
        return self.expected

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return AssertCardinalityIterator(self, ctx, state)


class AssertCardinalityIterator(UnaryIterator):
    """State: the input's and the number of elements it gave so far."""

    def __init__(self, op: AssertCardinalityOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        most = None if op.expected == INFINITE else op.expected
        self.count = 0 if state is None else state_int(state, "count", op.name, 0, most)
        super().__init__(op, ctx, state)

    def next_chunk(self, max_n: int) -> list[Any]:
        error, self._deferred_error = self._deferred_error, None
        if error is not None:
            raise error
        chunk = self.input.next_chunk(max_n)
        expected = self.op.expected
        if not chunk and self.count != expected:
            raise self._mismatch(f"only {self.count}")
        if expected != INFINITE and self.count + len(chunk) > expected:
            keep = expected - self.count
            self.count = expected
            error = self._mismatch(f"at least {expected + 1}")
            if not keep:
                raise error
            # The elements up to the declared count come first; the error at the next call.
            self._deferred_error = error
            return chunk[:keep]
        self.count += len(chunk)
        return chunk

    def __next__(self) -> Any:
        chunk = self.next_chunk(1)
        if not chunk:
            raise StopIteration
        return chunk[0]

    def _mismatch(self, found: str) -> StageError:
        expected = "infinitely many" if self.op.expected == INFINITE else self.op.expected
        return StageError(
            self.op.name,
            self.count,
            f"the input was expected to hold {expected} elements but held {found}",
        )

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "count": self.count}
