"""scan: a running state threaded through the elements (and counter, which is built on it)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from feedline.errors import StageError, wrap_user_error
from feedline.ops.base import Op, UnaryIterator, UnaryOp, UnobservableSpec, function_name
from feedline.ops.in_memory import check_elements, encode_elements
from feedline.ops.sources import owned_array
from feedline.ops.tracing import REAL_ELEMENTS, first_elements, output_check, traced_spec
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import State
from feedline.runtime.states import state_dict, state_int
from feedline.structure import (
    STRING_DTYPE,
    TensorSpec,
    flatten,
    leaf_spec,
    map_structure,
    merge_specs,
    normalize,
    normalize_output,
    pack_like,
    scalar_if_0d,
    spec_of,
)


class ScanOp(UnaryOp):
    """``(state, output) = scan_func(state, element)`` per element; the output is yielded.

    As in tf.data, the function gets exactly two arguments (a tuple element is not unpacked),
    and each new state must have the initial state's leaf count and dtypes (shapes may change);
    it is then read in the initial state's nesting, as tf.data does.
    """

    def __init__(self, input_op: Op, initial_state: Any, fn: Callable[..., Any]) -> None:
        super().__init__(input_op)
        # Converted as tf.data converts it (3 -> int32, [1, 2] -> an array), and owned, so
        # later changes to the caller's arrays do not reach the pipeline.
        self.initial_state = map_structure(
            lambda leaf: scalar_if_0d(owned_array(leaf)), normalize(initial_state)
        )
        self.state_dtypes = [leaf_spec(leaf).dtype for leaf in flatten(self.initial_state)]
        self.fn = fn
        self.name = f"scan({function_name(fn)})"
        self._check_state_dtypes()

    def _step(self, element: Any) -> tuple[Any, Any]:
        """``(new state, output)`` of the function on the initial state and ``element``."""
        result = normalize_output(self.fn(self.initial_state, element))
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError("scan_func must return a pair (new state, output value)")
        return result[0], result[1]

    def _check_state_dtypes(self) -> None:
        """tf.data's check at build: the new state keeps the initial state's components and
        dtypes. Traced, so an empty input does not hide a state that changes dtype."""
        try:
            spec = traced_spec(self.input, lambda e: spec_of(self._step(e)[0]), self.name)
        except UnobservableSpec:
            return
        dtypes = [leaf.dtype for leaf in flatten(spec)]
        if dtypes != self.state_dtypes:
            raise TypeError(
                f"{self.name}: the new state must have the initial state's components and "
                f"dtypes: expected {_names(self.state_dtypes)}, got {_names(dtypes)}"
            )

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        """The outputs of the function on the initial state (traced, so known even when no
        element ever comes), merged with the first real outputs, whose states have moved on."""

        spec = traced_spec(self.input, lambda e: spec_of(self._step(e)[1]), self.name)
        with contextlib.suppress(Exception):  # a look at the data, not a pass: errors come later
            for output in first_elements(self, REAL_ELEMENTS):
                spec = merge_specs(spec, spec_of(output))
        return spec

    def make_iterator(self, ctx: IterContext, state: State | None) -> ScanIterator:
        return ScanIterator(self, ctx, state)


class ScanIterator(UnaryIterator):
    def __init__(self, op: ScanOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.position = 0
        self.state = op.initial_state
        # The function runs here, in this process, whatever Options.executor says for maps.
        self.check = output_check(op, ctx, "thread")
        if state is not None:
            self.position = state_int(state, "position", op.name)
            self.state = self._restored_state(state)
        super().__init__(op, ctx, state)

    def _restored_state(self, state: State) -> Any:
        """The running state saved in ``state``: the initial state's nesting and dtypes, any
        shapes (a new state may change them)."""
        op = self.op
        spec = map_structure(lambda leaf: TensorSpec(None, leaf_spec(leaf).dtype), op.initial_state)
        encoded = state_dict(state, op.name, "state")["state"]
        (running,) = check_elements([encoded], "state", op.name, lambda: spec)
        return running

    def __next__(self) -> Any:
        element = next(self.input)
        position = self.position
        self.position += 1
        try:
            result = self.op.fn(self.state, element)
        except Exception as e:
            raise wrap_user_error(self.op.name, position, e) from e
        result = normalize_output(result)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise StageError(
                self.op.name,
                position,
                "scan_func must return a pair (new state, output value), got "
                f"{type(result).__name__} {result!r}",
            )
        new_state, output = result
        self.state = pack_like(self.op.initial_state, self._checked_leaves(new_state, position))
        if self.check is not None and not self.check.fits(output):
            raise self.check.error(output, position)
        return output

    def _checked_leaves(self, new_state: Any, position: int) -> list[Any]:
        leaves = flatten(new_state)
        dtypes = [leaf_spec(leaf).dtype for leaf in leaves]
        if dtypes != self.op.state_dtypes:
            raise StageError(
                self.op.name,
                position,
                "the new state must have the initial state's components and dtypes: expected "
                f"{_names(self.op.state_dtypes)}, got {_names(dtypes)}",
            )
        return leaves

    def get_state(self) -> State:
        return {
            "input": self.input.get_state(),
            "position": self.position,
            "state": encode_elements([self.state])[0],
        }


def _names(dtypes: list[np.dtype]) -> list[str]:
    return ["string" if d == STRING_DTYPE else d.name for d in dtypes]


def counter_scan(start: Any, step: Any, dtype: np.dtype) -> tuple[Any, Callable[[Any, Any], Any]]:
    """The initial state and function of the scan that tf.data's ``counter`` is: ``step`` is
    added to a state of ``dtype`` once per element, so floats accumulate rounding and integers
    wrap around exactly as they do there."""
    if dtype.kind not in "iuf":
        raise TypeError(f"counter's dtype must be an integer or float type, got {dtype}")
    first = _counter_value(start, dtype, "start")
    increment = _counter_value(step, dtype, "step")

    def count(state: Any, _: Any) -> tuple[Any, Any]:
        return np.add(state, increment), state  # np.add: wraps silently, as tf.data does

    return first, count


def _counter_value(value: Any, dtype: np.dtype, what: str) -> Any:
    """``value`` as ``dtype`` the way tf.data converts it: a float never becomes an integer,
    while an int that does not fit an integer dtype wraps around."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(f"counter's {what} must be a number, got {type(value).__name__} {value!r}")
    if dtype.kind != "f" and isinstance(value, float | np.floating):
        raise TypeError(f"cannot convert counter's {what}={value!r} to {dtype}")
    return np.asarray(value).astype(dtype)[()]
