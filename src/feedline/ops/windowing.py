"""window: overlapping or strided runs of consecutive elements, each yielded as a dataset."""

from __future__ import annotations

from typing import Any

from feedline.ops.base import INFINITE, UNKNOWN, Op, UnaryIterator, UnaryOp
from feedline.ops.in_memory import (
    DatasetSpec,
    ElementsOp,
    as_dataset,
    encode_elements,
    state_elements,
)
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State, skip_elements
from feedline.runtime.states import state_bool, state_int
from feedline.structure import flatten, map_structure, pack_like


class WindowOp(UnaryOp):
    """Window ``k`` holds input elements ``k*shift + j*stride`` for ``j < size``; near the end
    windows are shorter (or dropped with ``drop_remainder``), and a window with no element is
    never made. A nested element gives the same nest of datasets, one per component."""

    def __init__(
        self, input_op: Op, size: int, shift: int, stride: int, drop_remainder: bool
    ) -> None:
        super().__init__(input_op)
        self.size = size
        self.shift = shift
        self.stride = stride
        self.drop_remainder = drop_remainder
        # How many consecutive input elements one full window spans.
        self.span = (size - 1) * stride + 1
        self.name = f"window({size}, {shift}, {stride})"

    def cardinality(self) -> int:
        # tf.data's formula; unknown and infinite inputs stay so.
        n = self.input.cardinality()
        if n in (INFINITE, UNKNOWN):
            return n
        if self.drop_remainder:
            rest = n - self.span
            return 0 if rest < 0 else rest // self.shift + 1
        return -(-n // self.shift)

    def compute_spec(self) -> Any:
        return map_structure(DatasetSpec, self.input.element_spec())

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return WindowIterator(self, ctx, state)


class WindowIterator(UnaryIterator):
    """Holds the input elements from the next window's first one onwards (at most ``span``);
    its state is the input's position plus those elements, so restoring reads nothing twice."""

    def __init__(self, op: WindowOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.buffer: list[Any] = []
        # Input elements to pass over before the next window starts (when shift > span).
        self.skip = 0
        self.exhausted = False
        if state is not None:
            self._restore(state)
        super().__init__(op, ctx, state)

    def _restore(self, state: State) -> None:
        """Reads the buffer and counters of ``state``."""
        op = self.op
        spec = op.input.element_spec
        self.buffer = state_elements(state, "buffer", op.name, spec, op.span)
        # What is left to pass over once a window took all it held (see __next__).
        self.skip = state_int(state, "skip", op.name, 0, 0 if self.buffer else op.shift - 1)
        self.exhausted = state_bool(state, "exhausted", op.name)

    def _fill(self) -> None:
        if self.skip and not self.exhausted:
            skipped = skip_elements(self.input, self.skip)
            self.exhausted = skipped < self.skip
            self.skip -= skipped
        while len(self.buffer) < self.op.span and not self.exhausted:
            chunk = self.input.next_chunk(self.op.span - len(self.buffer))
            self.buffer.extend(chunk)
            self.exhausted = not chunk

    def __next__(self) -> Any:
        self._fill()
        op = self.op
        if self.skip or not self.buffer or (op.drop_remainder and len(self.buffer) < op.span):
            raise StopIteration
        window = self.buffer[: op.span : op.stride]
        if op.shift <= len(self.buffer):
            del self.buffer[: op.shift]
        else:
            self.skip = op.shift - len(self.buffer)
            self.buffer = []
        return self._as_datasets(window)

    def _as_datasets(self, window: list[Any]) -> Any:
        first = window[0]
        specs = flatten(self.op.input.element_spec())
        columns = zip(*(flatten(e) for e in window))
        datasets = [
            as_dataset(ElementsOp(list(column), spec, name="window_elements"))
            for column, spec in zip(columns, specs)
        ]
        return pack_like(first, datasets)

    def get_state(self) -> State:
        return {
            "input": self.input.get_state(),
            "buffer": encode_elements(self.buffer),
            "skip": self.skip,
            "exhausted": self.exhausted,
        }
