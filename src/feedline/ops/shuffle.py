"""shuffle: a bounded random buffer, seeded per pass."""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import numpy as np

from feedline.ops.base import Op
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import NodeIterator, State, skip_elements

_UNIFORM_BLOCK = 256
_SEED_MASK = 2**64 - 1


def fresh_seed() -> int:
    """An unpredictable 64-bit seed, for ops given ``seed=None``."""
    entropy = np.random.SeedSequence().entropy
    assert isinstance(entropy, int)
    return entropy & _SEED_MASK


def as_seed(seed: Any) -> int:
    """A user's seed as a non-negative 64-bit int; tf.data takes any int64, negatives included."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    return int(seed) & _SEED_MASK


class PassCounter:
    """Numbers the passes over one op, so each pass can get its own random stream."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            return next(self._counter)


class ShuffleOp(Op):
    """Each pass draws from ``rng(seed, run, epoch)``: ``run`` numbers the top-level iterators
    made over this op (so a new iterator reshuffles), ``epoch`` numbers the passes one run makes
    over it (``repeat``). Both are in the saved state, and a restored pass tells its run which
    epoch comes next, so resuming inside ``shuffle().repeat()`` continues with the same orders,
    in any process. With ``reshuffle_each_iteration=False`` every pass is ``(seed, 0, 0)``."""

    def __init__(
        self, input_op: Op, buffer_size: int, seed: int | None, reshuffle_each_iteration: bool
    ) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.buffer_size = buffer_size
        self.seed = fresh_seed() if seed is None else as_seed(seed)
        self.reshuffle = bool(reshuffle_each_iteration)
        self.runs = PassCounter()
        # Per top-level run: (seed, run, next epoch). Weak keys: a finished run leaves nothing.
        self._next_epoch: weakref.WeakKeyDictionary[IterContext, tuple[int, int, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._epoch_lock = threading.Lock()
        self.name = f"shuffle({buffer_size})"

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def pass_key(self, ctx: IterContext, state: State | None) -> tuple[int, int, int]:
        """(seed, run, epoch) of a new pass in ``ctx``, or of the pass ``state`` resumes."""
        if not self.reshuffle:
            return (self.seed, 0, 0) if state is None else (state["seed"], 0, 0)
        with self._epoch_lock:
            known = self._next_epoch.get(ctx)
            if state is None:
                seed, run, epoch = known if known else (self.seed, self.runs.next(), 0)
            else:
                seed, run, epoch = state["seed"], state["run"], state["epoch"]
            if known is None or known[:2] != (seed, run) or known[2] <= epoch:
                self._next_epoch[ctx] = (seed, run, epoch + 1)
        return seed, run, epoch

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return ShuffleIterator(self, ctx, state)


class ShuffleIterator(NodeIterator):
    """Fills the buffer, then repeatedly emits a random slot and refills it from the input.

    Its saved state is the input's state at the start of the pass plus a count: restoring
    replays the pass up to that count. That keeps states small (no buffered elements in them)
    at the price of re-reading the input up to the saved point.
    """

    def __init__(self, op: ShuffleOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.seed, self.run, self.epoch = op.pass_key(ctx, state)
        if state is None:
            self.input = op.input.make_iterator(ctx, None)
            self.input_start = self.input.get_state()
        else:
            self.input_start = state["input_start"]
            self.input = op.input.make_iterator(ctx, self.input_start)
        self.inputs = (self.input,)
        self.rng = np.random.default_rng([self.seed, self.run, self.epoch])
        self.buffer: list[Any] = []
        self.exhausted = False
        self.produced = 0
        self._uniforms: list[float] = []
        if state is not None and state["produced"]:
            skip_elements(self, state["produced"])

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
            "seed": self.seed,
            "run": self.run,
            "epoch": self.epoch,
            "input_start": self.input_start,
            "produced": self.produced,
        }
