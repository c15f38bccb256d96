"""The op node: one immutable step of a dataset description.

Each op knows its inputs, its cardinality and element spec, and how to make a stage iterator for
one pass (fresh, or resumed from a saved state). It never runs anything at construction time,
except argument validation, so a bad argument fails where the user wrote it.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_nested
from feedline.structure import spec_of

INFINITE = -1
UNKNOWN = -2
AUTOTUNE = -1


class UnobservableSpec(ValueError):
    """The spec depends on a Python function's output, and there was no element to run it on.

    tf.data knows such specs by tracing its graph functions; feedline runs the function on the
    first element instead, so an empty dataset has no spec to report.
    """


class Op:
    """Base class of every op node; subclasses set ``name`` and ``inputs``."""

    name: str = "op"
    inputs: tuple[Op, ...] = ()

    def __init__(self) -> None:
        self._spec_lock = threading.Lock()
        self._spec: Any = None
        self._spec_known = False

    # A dataset sent to a worker process (inside a function it runs) leaves its locks behind:
    # they belong to this process, and the copy makes its own.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_spec_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._spec_lock = threading.Lock()

    def cardinality(self) -> int:
        return UNKNOWN

    def element_spec(self) -> Any:
        with self._spec_lock:
            if not self._spec_known:
                self._spec = self.compute_spec()
                self._spec_known = True
            return self._spec

    def compute_spec(self) -> Any:
        """Static spec from the inputs' specs; by default, observed from the first element."""
        return self.observed_spec()

    def observed_spec(self) -> Any:
        """The spec of the first element of a probe pass."""
        it = self.make_iterator(IterContext(probe=True), None)
        try:
            first = next(it)
        except StopIteration:
            raise UnobservableSpec(
                f"cannot infer the element spec of {self.name}: it produced no element"
            ) from None
        finally:
            it.close()
        return spec_of(first)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class UnaryOp(Op):
    """An op over one input dataset, ``self.input``."""

    def __init__(self, input_op: Op) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)


class UnaryIterator(StageIterator):
    """The iterator of a ``UnaryOp``: owns ``self.input``, a pass over ``op.input`` opened
    where the state's ``field`` (``"input"`` by default) says, or fresh without a state.

    A subclass reads its own fields of the state first and calls this ``__init__`` last: a
    state refused there has opened nothing that would need closing.
    """

    input: StageIterator

    def __init__(
        self, op: UnaryOp, ctx: IterContext, state: State | None, field: str = "input"
    ) -> None:
        input_state = None if state is None else state_nested(state, field, op.name)
        self.input = op.input.make_iterator(ctx, input_state)
        self.inputs = (self.input,)

    def catch_up(self, replay: Callable[..., Any], *args: Any) -> None:
        """Run a restore's ``replay`` of the input opened above; if it fails (the state does
        not fit the input after all), close that input before the error goes up."""
        try:
            replay(*args)
        except BaseException:
            self.input.close()
            raise


def require_positive_int(value: Any, what: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")
    return int(value)


def require_callable(fn: Any, what: str) -> Any:
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__} {fn!r}")
    return fn


def snapshot(fn: Any) -> Any:
    """``fn`` as it is now: rebinding, later, a variable it reads (a closure variable or a
    module global) does not change it, as tf.data's tracing at build time would not.

    Only plain Python functions are copied (bound methods, partials and callable objects are
    used as they are). The values themselves are shared, not copied: mutating an object in
    place (``array[0] = 1``, ``table["k"] = v``) is still seen, as it would be by any Python
    code holding that object.
    """
    if not isinstance(fn, types.FunctionType):
        return fn
    closure = None
    if fn.__closure__ is not None:
        closure = tuple(_frozen_cell(cell) for cell in fn.__closure__)
    copy = types.FunctionType(
        fn.__code__, dict(fn.__globals__), fn.__name__, fn.__defaults__, closure
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return copy


def _frozen_cell(cell: types.CellType) -> types.CellType:
    try:
        return types.CellType(cell.cell_contents)
    except ValueError:  # not assigned yet (e.g. a function defined further down): stay live
        return cell


def function_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def call_with_element(fn: Any, element: Any) -> Any:
    """tf.data's calling convention: a plain tuple's parts are separate arguments."""
    if type(element) is tuple:
        return fn(*element)
    return fn(element)
