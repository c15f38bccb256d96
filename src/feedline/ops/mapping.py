"""Element-wise ops: map, filter, take_while, ignore_errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from feedline.errors import StageError, wrap_user_error
from feedline.ops.base import INFINITE, UNKNOWN, Op, call_with_element, function_name
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import InputCursor, NodeIterator, State
from feedline.structure import normalize_output

logger = logging.getLogger("feedline")

# Values a user function commonly returns that need no conversion: checked by exact type so
# the hot path pays one set lookup per element.
_NO_CONVERSION = frozenset(
    {np.ndarray, bytes, np.int64, np.int32, np.float32, np.float64, np.bool_, np.uint8}
)


def apply_fn(fn: Callable[..., Any], element: Any) -> Any:
    out = fn(*element) if type(element) is tuple else fn(element)
    return out if type(out) in _NO_CONVERSION else normalize_output(out)


class MapOp(Op):
    def __init__(self, input_op: Op, fn: Callable[..., Any], name: str | None = None) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.fn = fn
        self.name = name or f"map({function_name(fn)})"

    def cardinality(self) -> int:
        return self.input.cardinality()

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return MapIterator(self, ctx, state)


class CursorStage(NodeIterator):
    """A one-input stage that reads its input through a cursor and reports a failing element
    after delivering the elements before it (so an error surfaces at its own position)."""

    def __init__(self, input_op: Op, ctx: IterContext, state: State | None) -> None:
        self.cursor = InputCursor.restore(
            lambda s: input_op.make_iterator(ctx, s), None if state is None else state["cursor"]
        )
        self.inputs = (self.cursor.input,)
        self.position = 0 if state is None else state["position"]
        self._pending: StageError | None = None

    def __next__(self) -> Any:
        chunk = self.next_chunk(1)
        if not chunk:
            raise StopIteration
        return chunk[0]

    def fail_at_cursor(self, error: StageError, delivered: list[Any]) -> list[Any]:
        """Deliver ``delivered`` now and raise ``error`` on the next call, or raise it now."""
        self._pending = error
        if not delivered:
            self.raise_pending()
        return delivered

    def raise_pending(self) -> None:
        error, self._pending = self._pending, None
        if error is not None:
            self.cursor.advance(1)
            self.position += 1
            raise error

    def get_state(self) -> State:
        return {"cursor": self.cursor.get_state(), "position": self.position}


class MapIterator(CursorStage):
    """Runs the function inline, a chunk at a time."""

    def __init__(self, op: MapOp, ctx: IterContext, state: State | None) -> None:
        super().__init__(op.input, ctx, state)
        self.op = op

    def next_chunk(self, max_n: int) -> list[Any]:
        self.raise_pending()
        raw = self.cursor.peek(max_n)
        if not raw:
            return []
        fn = self.op.fn
        out: list[Any] = []
        append = out.append
        try:
            for element in raw:
                append(apply_fn(fn, element))
        except Exception as e:
            done = len(out)
            self.cursor.advance(done)
            self.position += done
            return self.fail_at_cursor(wrap_user_error(self.op.name, self.position, e), out)
        self.cursor.advance(len(raw))
        self.position += len(raw)
        return out


class FilterOp(Op):
    def __init__(self, input_op: Op, predicate: Callable[..., Any]) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.predicate = predicate
        self.name = f"filter({function_name(predicate)})"

    def cardinality(self) -> int:
        return INFINITE if self.input.cardinality() == INFINITE else UNKNOWN

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return FilterIterator(self, ctx, state)


def _as_bool(value: Any, stage: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype != np.bool_:
        raise TypeError(
            f"{stage}: the predicate must return a scalar bool, "
            f"got {type(value).__name__} with shape {arr.shape} and dtype {arr.dtype}"
        )
    return bool(arr)


class FilterIterator(CursorStage):
    def __init__(self, op: FilterOp, ctx: IterContext, state: State | None) -> None:
        super().__init__(op.input, ctx, state)
        self.op = op

    def next_chunk(self, max_n: int) -> list[Any]:
        self.raise_pending()
        predicate, name = self.op.predicate, self.op.name
        while True:
            raw = self.cursor.peek(max_n)
            if not raw:
                return []
            out: list[Any] = []
            for element in raw:
                try:
                    keep = _as_bool(call_with_element(predicate, element), name)
                except Exception as e:
                    return self.fail_at_cursor(wrap_user_error(name, self.position, e), out)
                self.cursor.advance(1)
                self.position += 1
                if keep:
                    out.append(element)
            if out:
                return out


class TakeWhileOp(Op):
    def __init__(self, input_op: Op, predicate: Callable[..., Any]) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.predicate = predicate
        self.name = f"take_while({function_name(predicate)})"

    def cardinality(self) -> int:
        return UNKNOWN

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return TakeWhileIterator(self, ctx, state)


class TakeWhileIterator(NodeIterator):
    def __init__(self, op: TakeWhileOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.input = op.input.make_iterator(ctx, None if state is None else state["input"])
        self.inputs = (self.input,)
        self.done = False if state is None else state["done"]
        self.position = 0 if state is None else state["position"]

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        element = next(self.input)
        try:
            keep = _as_bool(call_with_element(self.op.predicate, element), self.op.name)
        except Exception as e:
            raise wrap_user_error(self.op.name, self.position, e) from e
        finally:
            self.position += 1
        if not keep:
            self.done = True
            raise StopIteration
        return element

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "done": self.done, "position": self.position}


class IgnoreErrorsOp(Op):
    """Drops elements whose production raised an error upstream, counting them."""

    def __init__(self, input_op: Op, log_warning: bool) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.log_warning = log_warning
        self.name = "ignore_errors"

    def cardinality(self) -> int:
        return INFINITE if self.input.cardinality() == INFINITE else UNKNOWN

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return IgnoreErrorsIterator(self, ctx, state)


class IgnoreErrorsIterator(NodeIterator):
    def __init__(self, op: IgnoreErrorsOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.input = op.input.make_iterator(ctx, None if state is None else state["input"])
        self.inputs = (self.input,)
        self.ignored = 0 if state is None else state["ignored"]

    def __next__(self) -> Any:
        chunk = self.next_chunk(1)
        if not chunk:
            raise StopIteration
        return chunk[0]

    def next_chunk(self, max_n: int) -> list[Any]:
        while True:
            try:
                return self.input.next_chunk(max_n)
            except Exception as e:
                self.ignored += 1
                if self.op.log_warning:
                    logger.warning("ignore_errors dropped an element: %s", e)

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "ignored": self.ignored}
