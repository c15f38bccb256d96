"""``batch(..., schedule=...)``: batches whose size follows a schedule of the elements seen.

Large-model training ramps the batch size up (small batches first, larger ones once the loss
settles). tf.data has no such op: its users rebuild the pipeline at each step of the ramp, which
loses the iterator's position. Here the schedule is part of the description, fixed when the
dataset is built: each batch's size is a pure function of how many elements were batched before
it, so the sizes are the same on every pass, at any parallelism, and after a restore (the state
holds that count). No knob exposes the size, so AUTOTUNE cannot change it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from feedline.errors import StageError
from feedline.ops.base import (
    INFINITE,
    UNKNOWN,
    Op,
    UnaryIterator,
    UnaryOp,
    function_name,
    require_positive_int,
)
from feedline.ops.batching import read_up_to, stack_elements
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import known_end, state_int
from feedline.structure import map_structure

# ``schedule`` as users write it: ``[(elements_seen, batch_size), ...]`` or a function.
Schedule = Sequence[tuple[int, int]] | Callable[[int], int]


def check_steps(schedule: Sequence[Any]) -> list[tuple[int, int]]:
    """The steps of a list schedule: ``(elements_seen, batch_size)`` pairs, strictly
    increasing in ``elements_seen``."""
    steps: list[tuple[int, int]] = []
    for step in schedule:
        if not isinstance(step, tuple | list) or len(step) != 2:
            raise ValueError(f"a schedule step is (elements_seen, batch_size), got {step!r}")
        seen = require_positive_int(step[0], "a schedule step's elements_seen", True)
        size = require_positive_int(step[1], "a schedule step's batch_size")
        if steps and seen <= steps[-1][0]:
            raise ValueError(
                f"schedule steps must be in increasing order of elements_seen: {seen} comes "
                f"after {steps[-1][0]}"
            )
        steps.append((seen, size))
    if not steps:
        raise ValueError("a schedule needs at least one (elements_seen, batch_size) step")
    return steps


class ScheduledBatchOp(UnaryOp):
    """Batches of ``size_at(elements_seen)`` elements; ``batch_size`` holds before a list
    schedule's first step. The schedule is in the op's name, so it shows in the report and a
    state saved under another schedule is refused (the pipelines' names differ)."""

    def __init__(
        self, input_op: Op, batch_size: int, drop_remainder: bool, schedule: Schedule
    ) -> None:
        super().__init__(input_op)
        self.batch_size = batch_size
        self.drop_remainder = bool(drop_remainder)
        self.function: Callable[[int], int] | None = None
        self.steps: list[tuple[int, int]] = []
        if callable(schedule):
            self.function = schedule
            described = function_name(schedule)
        else:
            self.steps = check_steps(schedule)
            if self.steps[0][0] > 0:
                self.steps.insert(0, (0, batch_size))
            described = ", ".join(f"{seen}:{size}" for seen, size in self.steps)
        self._starts = [seen for seen, _ in self.steps]
        self.name = f"batch(schedule={described})"

    def size_at(self, seen: int) -> int:
        """The size of the batch that starts after ``seen`` elements."""
        if self.function is None:
            return self.steps[bisect.bisect_right(self._starts, seen) - 1][1]
        size = self.function(seen)
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise StageError(
                self.name,
                seen,
                f"the schedule {function_name(self.function)}({seen}) returned {size!r}, "
                "not a batch size (an int >= 1)",
            )
        return int(size)

    def describe(self) -> str:
        """The schedule, for the report."""
        if self.function is not None:
            return f"batch sizes from {function_name(self.function)}(elements_seen)"
        return "batch sizes: " + ", ".join(
            f"{size} from element {seen}" for seen, size in self.steps
        )

    def cardinality(self) -> int:
        n = self.input.cardinality()
        if n in (INFINITE, UNKNOWN) or self.function is not None:
            # A function could be anything: counting its batches would mean calling it per batch.
            return n if n == INFINITE else UNKNOWN
        batches, seen = 0, 0
        # Whole steps at a time: an input of 10**9 elements costs one loop turn per step.
        for i, (_, size) in enumerate(self.steps):
            end = self.steps[i + 1][0] if i + 1 < len(self.steps) else n
            end = min(end, n)
            if seen >= end:
                continue
            count = -(-(end - seen) // size)  # batches starting before ``end``
            batches += count
            seen += count * size
        if seen > n and self.drop_remainder:
            batches -= 1  # the last batch ran past the input's end: it is partial
        return batches

    def compute_spec(self) -> Any:
        # The size changes from batch to batch: the batch dimension is unknown.
        return map_structure(lambda s: s.with_leading(None), self.input.element_spec())

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        ctx.note(f"{self.name}: {self.describe()}")
        return ScheduledBatchIterator(self, ctx, state)


class ScheduledBatchIterator(UnaryIterator):
    """State: the input's and ``seen``, the elements batched so far, which fixes the size of
    every batch after."""

    def __init__(self, op: ScheduledBatchOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.seen = 0
        if state is not None:
            self.seen = state_int(state, "seen", op.name, 0, known_end(op.input.cardinality()))
        super().__init__(op, ctx, state)

    def __next__(self) -> Any:
        size = self.op.size_at(self.seen)
        elements = read_up_to(self.input, size)
        if not elements or (self.op.drop_remainder and len(elements) < size):
            raise StopIteration
        first = self.seen
        self.seen += len(elements)
        return stack_elements(elements, self.op.name, first)

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "seen": self.seen}
