"""Ops that group elements by value: group_by_window (and bucket_by_sequence_length on top
of it), and unique."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from feedline.errors import InvalidStateError, StageError, wrap_user_error
from feedline.ops.base import (
    INFINITE,
    UNKNOWN,
    Op,
    UnaryIterator,
    UnaryOp,
    UnobservableSpec,
    call_with_element,
)
from feedline.ops.in_memory import (
    ElementsOp,
    as_dataset,
    check_elements,
    encode_elements,
    state_elements,
)
from feedline.ops.tracing import output_check, traced_spec
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, StageIterator, State
from feedline.runtime.states import (
    INT64_MAX,
    INT64_MIN,
    check_int,
    state_bool,
    state_dict,
    state_int,
    state_list,
    state_nested,
)
from feedline.structure import STRING_DTYPE, TensorSpec, flatten, leaf_spec, map_structure

if TYPE_CHECKING:
    from feedline.dataset import Dataset

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class GroupByWindowOp(UnaryOp):
    """tf.data's group_by_window: elements go to the group of ``key_func(element)``; a group
    reaching ``window_size_func(key)`` elements (asked once per key and pass) is handed, as a
    dataset, to ``reduce_func(key, window)``, whose elements are yielded. At the end of the
    input the remaining groups are flushed in increasing key order, as tf.data's ordered map
    of groups does.

    ``spec_reduce`` maps an empty window dataset to a dataset of the output's spec: the
    counterpart of tf.data tracing ``reduce_func`` with a symbolic key.
    """

    def __init__(
        self,
        input_op: Op,
        key_func: Callable[..., Any],
        reduce_func: Callable[[Any, Any], Any],
        window_size_func: Callable[[Any], Any],
        spec_reduce: Callable[[Dataset], Any],
        name: str = "group_by_window",
    ) -> None:
        super().__init__(input_op)
        self.key_func = key_func
        self.reduce_func = reduce_func
        self.window_size_func = window_size_func
        self.spec_reduce = spec_reduce
        self.name = name
        self._check_key_func()

    def _check_key_func(self) -> None:
        """tf.data's check at build: ``key_func`` returns an int64 scalar (a Python int is
        converted to one; an int32 value is refused). The spec is traced as a map's is, so
        an empty input does not hide a wrong key."""
        try:
            spec = traced_spec(
                self.input, lambda e: key_spec(call_with_element(self.key_func, e)), self.name
            )
        except UnobservableSpec:
            return
        if spec != _KEY_SPEC:
            raise ValueError(
                f"{self.name}: key_func must return an int64 scalar (a Python int or "
                f"np.int64), but it returns {spec}"
            )

    def cardinality(self) -> int:
        return INFINITE if self.input.cardinality() == INFINITE else UNKNOWN

    def compute_spec(self) -> Any:
        window = as_dataset(ElementsOp([], self.input.element_spec(), name="group_window"))
        try:
            return reduced_dataset(self.spec_reduce(window), self.name, None).element_spec
        except Exception:
            # The reduced empty window may only know its spec from an element (a map), or
            # our stand-in key may not suit reduce_func where tf.data's symbolic one would:
            # learn the spec from a real group instead.
            return self.observed_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return GroupByWindowIterator(self, ctx, state)


def reduced_dataset(result: Any, stage: str, position: int | None) -> Dataset:
    from feedline.dataset import Dataset

    if not isinstance(result, Dataset):
        raise StageError(
            stage, position, f"reduce_func must return a Dataset, got {type(result).__name__}"
        )
    return result


def _keyed(state: State, field: str, owner: str) -> list[tuple[int, Any]]:
    """A state's list of ``[key, value]`` pairs, one per int64 key."""
    pairs = []
    for pair in state_list(state, field, owner):
        if not isinstance(pair, list) or len(pair) != 2:
            raise InvalidStateError(owner, field, f"holds {pair!r}, not a [key, value] pair")
        pairs.append((check_int(pair[0], field, owner, INT64_MIN, INT64_MAX), pair[1]))
    if len({key for key, _ in pairs}) < len(pairs):
        raise InvalidStateError(owner, field, "holds a key twice")
    return pairs


_KEY_SPEC = TensorSpec((), np.dtype(np.int64))


def key_spec(value: Any) -> TensorSpec:
    """The spec of a key as tf.data converts it to int64: a Python int (not a bool) is an
    int64 scalar, anything else keeps its own dtype and shape."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _KEY_SPEC
    return leaf_spec(value)


def _key(value: Any, stage: str, position: int) -> int:
    """The int64 key ``key_func`` returned (see ``key_spec``); a StageError for another."""
    spec = key_spec(value)
    if spec != _KEY_SPEC:
        raise StageError(
            stage, position, f"key_func must return an int64 scalar, but it returned {spec}"
        )
    key = int(value)
    if not INT64_MIN <= key <= INT64_MAX:
        raise StageError(stage, position, f"key_func returned {key}, beyond int64")
    return key


def _int64_scalar(value: Any, what: str, stage: str, position: int) -> np.int64:
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "iu":
        raise StageError(
            stage,
            position,
            f"{what} must return an integer scalar, got {arr.dtype.name} with shape {arr.shape}",
        )
    return np.int64(arr)


class GroupByWindowIterator(UnaryIterator):
    """State: the input's position, every open group (its elements encoded), the window sizes
    learnt so far, and the group being reduced, whose dataset is rebuilt on restore by calling
    ``reduce_func`` again on the same window, then resumed from its own state."""

    def __init__(self, op: GroupByWindowOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.ctx = ctx
        self.groups: dict[int, list[Any]] = {}
        self.sizes: dict[int, int] = {}
        self.current: StageIterator | None = None
        self.current_key = 0
        self.current_window: list[Any] = []
        self.input_done = False
        self.position = 0
        # reduce_func's datasets may differ from the one its spec was found from (once known).
        self.check = output_check(op, ctx, "thread", trace=False)
        current = None
        if state is not None:
            state_nested(state, "input", op.name)  # reported before a bad group
            current = self._restore(state)
        super().__init__(op, ctx, state)
        if current is not None:
            self.catch_up(self._start_reduce, *current)

    def _restore(self, state: State) -> tuple[int, list[Any], State] | None:
        """Reads the groups and counters of ``state``; returns the group being reduced (its
        key, its window and its dataset's state), if any."""
        name = self.op.name
        self.position = state_int(state, "position", name)
        self.input_done = state_bool(state, "input_done", name)
        for key, size in _keyed(state, "sizes", name):
            self.sizes[key] = check_int(size, "sizes", name, 1, INT64_MAX)
        for key, encoded in _keyed(state, "groups", name):
            group = self._group(key, encoded, "groups")
            if len(group) >= self.sizes[key]:
                raise InvalidStateError(name, "groups", f"holds a full window of key {key}")
            self.groups[key] = group
        current = state_dict(state, name, "current")["current"]
        restored = None
        if current is not None:
            current = state_dict(current, name, "key", "window", "state")
            key = check_int(current["key"], "current", name, INT64_MIN, INT64_MAX)
            window = self._group(key, current["window"], "current")
            if not window or len(window) > self.sizes[key]:
                raise InvalidStateError(name, "current", f"holds {len(window)} elements")
            restored = key, window, state_nested(current, "state", name)
        # Every element held came from the input, which counted it.
        held = sum(map(len, self.groups.values())) + (len(restored[1]) if restored else 0)
        if held > self.position:
            raise InvalidStateError(
                name, "position", f"is {self.position}, fewer than the {held} elements held"
            )
        return restored

    def _group(self, key: int, encoded: Any, field: str) -> list[Any]:
        """The elements of group ``key``, which must fit the input's spec."""
        name = self.op.name
        if key not in self.sizes:
            raise InvalidStateError(name, field, f"holds key {key}, whose window size is unknown")
        return check_elements(encoded, field, name, self.op.input.element_spec)

    def _start_reduce(self, key: int, window: list[Any], state: State | None) -> None:
        op = self.op
        dataset = as_dataset(ElementsOp(window, op.input.element_spec(), name="group_window"))
        try:
            result = op.reduce_func(np.int64(key), dataset)
        except Exception as e:
            raise wrap_user_error(op.name, None, e) from e
        self.current = reduced_dataset(result, op.name, None)._op.make_iterator(self.ctx, state)
        self.current_key = key
        self.current_window = window

    def _window_size(self, key: int, position: int) -> int:
        size = self.sizes.get(key)
        if size is None:
            op = self.op
            try:
                value = op.window_size_func(np.int64(key))
            except Exception as e:
                raise wrap_user_error(op.name, position, e) from e
            size = int(_int64_scalar(value, "window_size_func", op.name, position))
            if size <= 0:
                raise StageError(
                    op.name, position, f"Window size must be greater than zero, but got {size}."
                )
            self.sizes[key] = size
        return size

    def _add(self, element: Any, position: int) -> None:
        """Put ``element`` in its group; a group that becomes full starts being reduced."""
        op = self.op
        try:
            value = call_with_element(op.key_func, element)
        except Exception as e:
            raise wrap_user_error(op.name, position, e) from e
        key = _key(value, op.name, position)
        size = self._window_size(key, position)
        group = self.groups.setdefault(key, [])
        group.append(element)
        if len(group) >= size:
            del self.groups[key]
            self._start_reduce(key, group, None)

    def __next__(self) -> Any:
        while True:
            if self.current is not None:
                try:
                    element = next(self.current)
                except StopIteration:
                    self.current.close()
                    self.current = None
                    self.current_window = []
                else:
                    if self.check is not None and not self.check.fits(element):
                        raise self.check.error(element, None)
                    return element
            if not self.input_done:
                try:
                    element = next(self.input)
                except StopIteration:
                    self.input_done = True
                    continue
                self.position += 1
                self._add(element, self.position - 1)
            elif self.groups:
                key = min(self.groups)
                self._start_reduce(key, self.groups.pop(key), None)
            else:
                raise StopIteration

    def get_state(self) -> State:
        current = None
        if self.current is not None:
            current = {
                "key": self.current_key,
                "window": encode_elements(self.current_window),
                "state": self.current.get_state(),
            }
        return {
            "input": self.input.get_state(),
            "groups": [[k, encode_elements(g)] for k, g in self.groups.items()],
            "sizes": [[k, s] for k, s in self.sizes.items()],
            "input_done": self.input_done,
            "position": self.position,
            "current": current,
        }

    def close(self) -> None:
        self.input.close()
        if self.current is not None:
            self.current.close()


class Bucketing:
    """bucket_by_sequence_length as tf.data builds it: a group_by_window keyed by the bucket
    of each element's length, reducing every bucket with a (padded) batch of that bucket's
    batch size."""

    def __init__(
        self,
        element_length_func: Callable[..., Any],
        bucket_boundaries: Sequence[int],
        bucket_batch_sizes: Sequence[int],
        padded_shapes: Any,
        padding_values: Any,
        pad_to_bucket_boundary: bool,
        no_padding: bool,
        drop_remainder: bool,
    ) -> None:
        self.element_length_func = element_length_func
        self.boundaries = list(bucket_boundaries)
        self.batch_sizes = list(bucket_batch_sizes)
        self.padded_shapes = padded_shapes
        self.padding_values = padding_values
        self.pad_to_bucket_boundary = pad_to_bucket_boundary
        self.no_padding = no_padding
        self.drop_remainder = drop_remainder
        self.bucket_min = [_INT32_MIN, *self.boundaries]
        self.bucket_max = [*self.boundaries, _INT32_MAX]

    def bucket(self, *parts: Any) -> np.int64:
        """The first bucket ``[min, max)`` holding the element's length (tf.data's rule, even
        for unsorted boundaries)."""
        length = self.element_length_func(*parts)
        arr = np.asarray(length)
        if arr.shape != () or arr.dtype.kind not in "iu":
            raise TypeError(
                "element_length_func must return an integer scalar, "
                f"got {arr.dtype.name} with shape {arr.shape}"
            )
        n = int(arr)
        for i, (low, high) in enumerate(zip(self.bucket_min, self.bucket_max)):
            if low <= n < high:
                return np.int64(i)
        raise ValueError(f"element length {n} is in no bucket of {self.boundaries}")

    def window_size(self, bucket: Any) -> np.int64:
        return np.int64(self.batch_sizes[int(bucket)])

    def reduce(self, bucket: Any, window: Dataset) -> Dataset:
        i = int(bucket)
        filler = None
        if self.pad_to_bucket_boundary:
            if i == len(self.boundaries):
                raise ValueError(
                    "When pad_to_bucket_boundary=True, elements must have length < "
                    "max(bucket_boundaries)."
                )
            filler = self.boundaries[i] - 1
        return self.batch(window, self.batch_sizes[i], self.drop_remainder, filler)

    def spec_reduce(self, window: Dataset) -> Dataset:
        """What tf.data's tracing sees: batch size and boundary unknown, so neither the batch
        dimension nor a padded dimension left to the bucket is static."""
        return self.batch(window, 1, False, None)

    def batch(self, window: Dataset, size: int, drop: bool, filler: int | None) -> Dataset:
        if self.no_padding:
            return window.batch(size, drop_remainder=drop)
        shapes = self.padded_shapes
        if filler is not None:
            # The shapes padded_batch would pad to, with each open dimension set to the filler.
            padded = window.padded_batch(1, shapes).element_spec
            shapes = map_structure(lambda s: _filled(s, filler), padded)
        return window.padded_batch(size, shapes, self.padding_values, drop_remainder=drop)


def _filled(spec: TensorSpec, filler: int) -> list[int | None] | None:
    if spec.shape is None:
        return None
    return [filler if d is None else d for d in spec.shape[1:]]


class UniqueOp(UnaryOp):
    """Drops elements equal to an earlier one; tf.data allows a single int32, int64 or string
    component of any shape."""

    def __init__(self, input_op: Op) -> None:
        super().__init__(input_op)
        self.name = "unique"
        try:
            specs = flatten(input_op.element_spec())
        except UnobservableSpec:
            return  # an empty input: nothing to check, and nothing will come out
        if len(specs) != 1:
            raise TypeError(
                "unique only supports datasets whose elements have a single component, "
                f"got {input_op.element_spec()}"
            )
        dtype = specs[0].dtype
        if dtype not in (np.dtype(np.int32), np.dtype(np.int64), STRING_DTYPE):
            name = "string" if dtype == STRING_DTYPE else dtype.name
            raise TypeError(
                f"unique does not support type {name}: only int32, int64 and string are supported"
            )

    def cardinality(self) -> int:
        return UNKNOWN  # tf.data's answer, even over an infinite input

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return UniqueIterator(self, ctx, state)


def _identity(leaf: Any) -> Any:
    """A hashable value equal for equal tensors (same shape and values)."""
    if isinstance(leaf, bytes):
        return leaf
    arr = np.asarray(leaf)
    if arr.dtype == STRING_DTYPE:
        return (arr.shape, tuple(arr.flat))
    return (arr.shape, arr.tobytes())


class UniqueIterator(UnaryIterator, ChunkedIterator):
    """State: the input's position and every distinct element seen so far, in order."""

    def __init__(self, op: UniqueOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.seen_elements: list[Any] = []
        if state is not None:
            spec = op.input.element_spec
            self.seen_elements = state_elements(state, "seen", op.name, spec)
        self.seen = {_identity(flatten(e)[0]) for e in self.seen_elements}
        super().__init__(op, ctx, state)

    def next_chunk(self, max_n: int) -> list[Any]:
        while True:
            chunk = self.input.next_chunk(max_n)
            if not chunk:
                return []
            out = []
            for element in chunk:
                identity = _identity(flatten(element)[0])
                if identity not in self.seen:
                    self.seen.add(identity)
                    self.seen_elements.append(element)
                    out.append(element)
            if out:
                return out

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "seen": encode_elements(self.seen_elements)}
