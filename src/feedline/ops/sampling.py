"""Random sources and picking among datasets: Dataset.random, sample_from_datasets and
choose_from_datasets (both a directed interleave driven by a selector of input indices)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from feedline.errors import InvalidStateError, StageError
from feedline.ops.base import INFINITE, UNKNOWN, Op, UnobservableSpec
from feedline.ops.randomness import PassKey, PassKeys
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import (
    check_nested,
    state_bool,
    state_int,
    state_list,
    state_nested,
)
from feedline.structure import TensorSpec, flatten, merge_specs, to_array

_INT64_SCALAR = TensorSpec((), np.dtype(np.int64))
# Values made ahead when they are asked for one at a time.
_BLOCK = 256


class RandomStream:
    """Raw 64-bit draws of one pass, counted so that a restore skips them in O(1)."""

    def __init__(self, key: PassKey, state: State | None, owner: str) -> None:
        bits = PassKeys.generator(key).bit_generator
        assert isinstance(bits, np.random.PCG64)  # default_rng's: it can jump ahead
        # PCG64's period is 2**128 draws; no pass comes near 2**64.
        self.drawn = 0 if state is None else state_int(state, "drawn", owner, 0, 2**64)
        bits.advance(self.drawn)
        self.bits = bits
        self.key = key

    def raw(self, n: int) -> np.ndarray:
        self.drawn += n
        values: np.ndarray = self.bits.random_raw(n)
        return values

    def get_state(self) -> State:
        return {**PassKeys.as_state(self.key), "drawn": self.drawn}


class DrawIterator(StageIterator):
    """Endless values, each made from one raw draw by ``transform`` (vectorised). One at a
    time, values are made a block ahead; the state counts only those delivered."""

    def __init__(self, stream: RandomStream, transform: Callable[[np.ndarray], np.ndarray]) -> None:
        self.stream = stream
        self.transform = transform
        self.ready: list[Any] = []  # made ahead, next value last

    def __next__(self) -> Any:
        if not self.ready:
            self.ready = list(self.transform(self.stream.raw(_BLOCK)))[::-1]
        return self.ready.pop()

    def next_chunk(self, max_n: int) -> list[Any]:
        if not self.ready:
            return list(self.transform(self.stream.raw(max_n)))
        n = min(max_n, len(self.ready))
        chunk = self.ready[-n:][::-1]
        del self.ready[-n:]
        return chunk

    def get_state(self) -> State:
        return {**self.stream.get_state(), "drawn": self.stream.drawn - len(self.ready)}


def _uint32(raw: np.ndarray) -> np.ndarray:
    values: np.ndarray = (raw >> np.uint64(32)).astype(np.int64)
    return values


class RandomOp(Op):
    """Dataset.random: int64 values uniform in ``[0, 2**32)``, the range tf.data's draws have.

    As in tf.data: with a seed every pass yields the same values; without one each iterator
    draws new values, but the epochs of one iterator (under ``repeat``) repeat them; with
    ``rerandomize_each_iteration`` every pass and epoch is new.
    """

    def __init__(self, seed: int | None, rerandomize_each_iteration: bool) -> None:
        super().__init__()
        self.per_epoch = rerandomize_each_iteration
        self.passes = PassKeys(seed, vary_per_pass=rerandomize_each_iteration or seed is None)
        self.name = "random"

    def cardinality(self) -> int:
        return INFINITE

    def compute_spec(self) -> Any:
        return _INT64_SCALAR

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        key = self.passes.key(ctx, state, self.name)
        if not self.per_epoch:
            key = (key[0], key[1], 0)
        return DrawIterator(RandomStream(key, state, self.name), _uint32)


class CategoricalOp(Op):
    """sample_from_datasets' selector: input indices drawn with probabilities proportional to
    ``weights`` (fixed), or to successive elements of ``weights_input``, ending with it."""

    def __init__(
        self,
        num_inputs: int,
        weights: np.ndarray | None,
        weights_input: Op | None,
        seed: int | None,
        rerandomize_each_iteration: bool,
    ) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.weights_input = weights_input
        self.inputs = () if weights_input is None else (weights_input,)
        # Fixed weights are checked now, where the user gave them.
        self.thresholds = None if weights is None else _thresholds(weights, num_inputs, "", 0)
        self.passes = PassKeys(seed, vary_per_pass=rerandomize_each_iteration)
        self.name = "sample_selector"

    def cardinality(self) -> int:
        return INFINITE if self.weights_input is None else self.weights_input.cardinality()

    def compute_spec(self) -> Any:
        return _INT64_SCALAR

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        if self.weights_input is None:
            assert self.thresholds is not None
            thresholds = self.thresholds
            stream = RandomStream(self.passes.key(ctx, state, self.name), state, self.name)
            return DrawIterator(stream, lambda raw: _picks(thresholds, raw))
        return WeightsInputIterator(self, self.weights_input, ctx, state)


def _thresholds(weights: Any, n: int, stage: str, position: int) -> np.ndarray:
    """Cumulative probabilities of picking each index, ending at exactly 1.0, so that a
    uniform draw in [0, 1) never picks an index of weight zero."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != n or not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise StageError(
            stage,
            position,
            f"weights must be {n} finite non-negative numbers, not all zero; got {w.tolist()}",
        )
    cumulative: np.ndarray = np.cumsum(w)
    return cumulative / cumulative[-1]


def _picks(thresholds: np.ndarray, raw: np.ndarray) -> np.ndarray:
    uniforms = (raw >> np.uint64(11)) * 2.0**-53  # 53 random bits: a double in [0, 1)
    picks: np.ndarray = np.searchsorted(thresholds, uniforms, side="right").astype(np.int64)
    return picks


class WeightsInputIterator(StageIterator):
    """One pick per element of the weights dataset, which may hold a bad weight vector."""

    def __init__(
        self, op: CategoricalOp, weights_input: Op, ctx: IterContext, state: State | None
    ) -> None:
        self.op = op
        pass_state = input_state = None
        if state is not None:
            pass_state = state_nested(state, "pass", op.name)
            input_state = state_nested(state, "input", op.name)
        self.stream = RandomStream(op.passes.key(ctx, pass_state, op.name), pass_state, op.name)
        self.weights = weights_input.make_iterator(ctx, input_state)
        self.inputs = (self.weights,)

    def __next__(self) -> Any:
        weights = flatten(next(self.weights))
        position = self.stream.drawn
        thresholds = _thresholds(weights, self.op.num_inputs, self.op.name, position)
        return _picks(thresholds, self.stream.raw(1))[0]

    def get_state(self) -> State:
        return {"pass": self.stream.get_state(), "input": self.weights.get_state()}


class DirectedInterleaveOp(Op):
    """Elements of ``data_inputs[i]`` for each index ``i`` the selector yields. An exhausted
    input ends everything with ``stop_on_empty_dataset``; otherwise picks of it are passed
    over, and the end comes when every input is exhausted (or the selector is)."""

    def __init__(
        self, selector: Op, data_inputs: list[Op], stop_on_empty_dataset: bool, name: str
    ) -> None:
        super().__init__()
        self.selector = selector
        self.data_inputs = data_inputs
        self.inputs = (selector, *data_inputs)
        self.stop_on_empty_dataset = stop_on_empty_dataset
        self.name = name
        # Incompatible datasets fail here, where the user wrote it; inputs whose specs cannot
        # be known (all empty, made by functions) have nothing to check, and yield nothing.
        with contextlib.suppress(UnobservableSpec):
            self.compute_spec()

    def cardinality(self) -> int:
        # tf.data's rule, which looks neither at the selector nor at stop_on_empty_dataset.
        if any(op.cardinality() == INFINITE for op in self.data_inputs):
            return INFINITE
        return UNKNOWN

    def compute_spec(self) -> Any:
        # An input whose spec could only be observed from an element it does not have (an
        # empty mapped dataset) constrains nothing: tf.data would know it from tracing.
        spec: Any = None
        for i, op in enumerate(self.data_inputs):
            try:
                other = op.element_spec()
            except UnobservableSpec:
                continue
            try:
                spec = other if spec is None else merge_specs(spec, other)
            except TypeError as e:
                raise TypeError(
                    f"datasets must have compatible element specs: dataset {i} has {other}, "
                    f"the ones before it {spec}"
                ) from e
        if spec is None:
            raise UnobservableSpec(
                f"cannot infer the element spec of {self.name}: every input is an empty "
                "dataset whose spec depends on a function"
            )
        return spec

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return DirectedInterleaveIterator(self, ctx, state)


class DirectedInterleaveIterator(StageIterator):
    def __init__(self, op: DirectedInterleaveOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.done = False
        self.picks = 0
        selector_state = None
        states: list[State | None] = [None] * len(op.data_inputs)
        if state is not None:
            selector_state, states = self._restore(state)
        self.selector = op.selector.make_iterator(ctx, selector_state)
        # None marks an exhausted input (its state is then None too).
        self.data: list[StageIterator | None] = []
        try:
            for data_op, s in zip(op.data_inputs, states):
                exhausted = state is not None and s is None
                self.data.append(None if exhausted else data_op.make_iterator(ctx, s))
        except BaseException:
            for it in (self.selector, *self.data):
                if it is not None:
                    it.close()
            raise
        self.inputs = (self.selector, *(it for it in self.data if it is not None))

    def _restore(self, state: State) -> tuple[State, list[State | None]]:
        """Reads the counters of ``state``; returns the selector's and the inputs' states."""
        name = self.op.name
        self.done = state_bool(state, "done", name)
        self.picks = state_int(state, "picks", name)
        selector = state_nested(state, "selector", name)
        listed = state_list(state, "inputs", name, length=len(self.op.data_inputs))
        states = [None if s is None else check_nested(s, "inputs", name) for s in listed]
        exhausted = [s is None for s in states]
        if not self.done and (all(exhausted) or (self.op.stop_on_empty_dataset and any(exhausted))):
            raise InvalidStateError(name, "done", "is False, yet the inputs that end it are done")
        return selector, states

    def __next__(self) -> Any:
        while not self.done:
            try:
                index = int(next(self.selector))
            except StopIteration:
                break
            position = self.picks
            self.picks += 1
            if not 0 <= index < len(self.data):
                raise StageError(
                    self.op.name,
                    position,
                    f"Selector index out of range: {index} >= {len(self.data)}",
                )
            source = self.data[index]
            if source is None:
                continue
            try:
                return next(source)
            except StopIteration:
                source.close()
                self.data[index] = None
                self.inputs = (self.selector, *(it for it in self.data if it is not None))
                self.done = self.op.stop_on_empty_dataset or all(it is None for it in self.data)
        self.done = True
        raise StopIteration

    def get_state(self) -> State:
        return {
            "done": self.done,
            "picks": self.picks,
            "selector": self.selector.get_state(),
            "inputs": [None if it is None else it.get_state() for it in self.data],
        }


def sampling_weights(weights: Any, n: int) -> np.ndarray:
    """``sample_from_datasets``' fixed weights, checked as tf.data checks them: one per
    dataset, and floats (``[1, 2]`` is an int32 tensor there, and refused)."""
    arr = to_array(weights)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"weights must hold one weight per dataset ({n}), got {weights!r}")
    if arr.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"weights must be float32 or float64 numbers, got {arr.dtype.name}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"weights must be finite, got {weights!r}")
    return arr.astype(np.float64)
