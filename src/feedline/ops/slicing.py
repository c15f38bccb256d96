"""Position-based ops: take, skip, shard, repeat, enumerate."""

from __future__ import annotations

from typing import Any

import numpy as np

from feedline.errors import InvalidStateError
from feedline.ops.base import INFINITE, UNKNOWN, Op, UnaryIterator, UnaryOp
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, StageIterator, State, skip_elements
from feedline.runtime.states import (
    INT64_MAX,
    known_end,
    state_bool,
    state_int,
    state_optional_nested,
)
from feedline.structure import TensorSpec


class _OneInputOp(UnaryOp):
    def __init__(self, input_op: Op, name: str) -> None:
        super().__init__(input_op)
        self.name = name

    def compute_spec(self) -> Any:
        return self.input.element_spec()


class TakeOp(_OneInputOp):
    def __init__(self, input_op: Op, count: int) -> None:
        super().__init__(input_op, f"take({count})")
        self.count = count

    def cardinality(self) -> int:
        # tf.data's rule, including take(0) of an unknown input being unknown.
        n = self.input.cardinality()
        if n == UNKNOWN:
            return UNKNOWN
        if n == INFINITE:
            return self.count
        return n if self.count < 0 else min(n, self.count)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return TakeIterator(self, ctx, state)


class TakeIterator(UnaryIterator):
    def __init__(self, op: TakeOp, ctx: IterContext, state: State | None) -> None:
        self.limit = op.count
        self.taken = 0
        if state is not None:
            most = known_end(op.cardinality())
            if most is None and op.count >= 0:  # an input of unknown length
                most = op.count
            self.taken = state_int(state, "taken", op.name, 0, most)
        super().__init__(op, ctx, state)

    def __next__(self) -> Any:
        if 0 <= self.limit <= self.taken:
            raise StopIteration
        element = next(self.input)
        self.taken += 1
        return element

    def next_chunk(self, max_n: int) -> list[Any]:
        if self.limit >= 0:
            max_n = min(max_n, self.limit - self.taken)
            if max_n <= 0:
                return []
        chunk = self.input.next_chunk(max_n)
        self.taken += len(chunk)
        return chunk

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "taken": self.taken}


class SkipOp(_OneInputOp):
    def __init__(self, input_op: Op, count: int) -> None:
        super().__init__(input_op, f"skip({count})")
        self.count = count

    def cardinality(self) -> int:
        # tf.data's rule: unknown and infinite inputs stay so, whatever the count.
        n = self.input.cardinality()
        if n < 0:
            return n
        return 0 if self.count < 0 else max(0, n - self.count)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return SkipIterator(self, ctx, state)


class SkipIterator(UnaryIterator):
    def __init__(self, op: SkipOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.skipped = state is not None and state_bool(state, "skipped", op.name)
        super().__init__(op, ctx, state)

    def _skip_once(self) -> None:
        if not self.skipped:
            self.skipped = True
            if self.op.count < 0:
                while self.input.next_chunk(1024):
                    pass
            else:
                skip_elements(self.input, self.op.count)

    def __next__(self) -> Any:
        self._skip_once()
        return next(self.input)

    def next_chunk(self, max_n: int) -> list[Any]:
        self._skip_once()
        return self.input.next_chunk(max_n)

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "skipped": self.skipped}


class ShardOp(_OneInputOp):
    def __init__(self, input_op: Op, num_shards: int, index: int) -> None:
        super().__init__(input_op, f"shard({num_shards}, {index})")
        self.num_shards = num_shards
        self.index = index

    def cardinality(self) -> int:
        n = self.input.cardinality()
        if n < 0:
            return n
        return n // self.num_shards + (1 if self.index < n % self.num_shards else 0)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return ShardIterator(self, ctx, state)


class ShardIterator(UnaryIterator):
    def __init__(self, op: ShardOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.started = state is not None and state_bool(state, "started", op.name)
        super().__init__(op, ctx, state)

    def __next__(self) -> Any:
        # Position the input on this shard's next element: skip index first, then the others.
        gap = self.op.num_shards - 1 if self.started else self.op.index
        if gap and skip_elements(self.input, gap) < gap:
            raise StopIteration
        element = next(self.input)
        self.started = True
        return element

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "started": self.started}


class RepeatOp(_OneInputOp):
    def __init__(self, input_op: Op, count: int | None) -> None:
        self.count = -1 if count is None else int(count)
        super().__init__(input_op, "repeat()" if self.count < 0 else f"repeat({self.count})")

    def cardinality(self) -> int:
        n = self.input.cardinality()
        if self.count < 0:
            return 0 if n == 0 else INFINITE
        if self.count == 0:
            return 0
        if n < 0:
            return n
        return n * self.count

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return RepeatIterator(self, ctx, state)


class RepeatIterator(ChunkedIterator):
    """Starts a fresh pass over its input for every epoch; an empty epoch ends the repetition
    (otherwise ``repeat()`` over an empty dataset would spin forever)."""

    def __init__(self, op: RepeatOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.ctx = ctx
        self.epoch = self.epoch_produced = 0
        self.input: StageIterator | None = None
        if state is None:
            if op.count != 0:
                self.input = op.input.make_iterator(ctx, None)
        else:
            input_state = self._restore(state)
            if input_state is not None:
                self.input = op.input.make_iterator(ctx, input_state)
        self.inputs = (self.input,) if self.input is not None else ()

    def _restore(self, state: State) -> State | None:
        """Reads the counters of ``state``; returns the input's state, None once done."""
        op, name = self.op, self.op.name
        last_epoch = None if op.count < 0 else op.count
        self.epoch = state_int(state, "epoch", name, 0, last_epoch)
        self.epoch_produced = state_int(
            state, "epoch_produced", name, 0, known_end(op.input.cardinality())
        )
        done = state_bool(state, "done", name)
        input_state = state_optional_nested(state, "input", name)
        if done and input_state is not None:
            raise InvalidStateError(name, "done", "is True, yet the input's state is there")
        if not done and input_state is None:
            raise InvalidStateError(name, "input", "is None, yet the repetition goes on")
        if done and self.epoch_produced:
            raise InvalidStateError(name, "epoch_produced", "counts elements of a finished pass")
        if not done and self.epoch == last_epoch:
            raise InvalidStateError(name, "epoch", f"is {self.epoch}: every epoch is done")
        return input_state

    def next_chunk(self, max_n: int) -> list[Any]:
        while self.input is not None:
            chunk = self.input.next_chunk(max_n)
            if chunk:
                self.epoch_produced += len(chunk)
                return chunk
            self.input.close()
            self.epoch += 1
            empty_epoch = self.epoch_produced == 0
            self.epoch_produced = 0
            if empty_epoch or 0 <= self.op.count <= self.epoch:
                self.input = None
            else:
                self.input = self.op.input.make_iterator(self.ctx, None)
            self.inputs = (self.input,) if self.input is not None else ()
        return []

    def get_state(self) -> State:
        return {
            "epoch": self.epoch,
            "epoch_produced": self.epoch_produced,
            "done": self.input is None,
            "input": None if self.input is None else self.input.get_state(),
        }


class EnumerateOp(_OneInputOp):
    def __init__(self, input_op: Op, start: int) -> None:
        super().__init__(input_op, "enumerate")
        self.start = start

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        return (TensorSpec((), np.dtype(np.int64)), self.input.element_spec())

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return EnumerateIterator(self, ctx, state)


class EnumerateIterator(UnaryIterator):
    def __init__(self, op: EnumerateOp, ctx: IterContext, state: State | None) -> None:
        self.index = op.start
        if state is not None:
            end = known_end(op.cardinality())
            last = INT64_MAX if end is None else op.start + end
            self.index = state_int(state, "index", op.name, op.start, last)
        super().__init__(op, ctx, state)

    def __next__(self) -> Any:
        element = next(self.input)
        i = self.index
        self.index += 1
        return (np.int64(i), element)

    def next_chunk(self, max_n: int) -> list[Any]:
        chunk = self.input.next_chunk(max_n)
        start = self.index
        self.index += len(chunk)
        return [(np.int64(start + k), e) for k, e in enumerate(chunk)]

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "index": self.index}
