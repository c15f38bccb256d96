"""Sources: range, in-memory tensors and slices, Python generators."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from feedline.errors import InvalidStateError, StageError, wrap_user_error
from feedline.ops.base import UNKNOWN, Op
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_bool, state_int
from feedline.structure import (
    STRING_DTYPE,
    TensorSpec,
    flatten,
    is_namedtuple,
    is_nest,
    leaf_spec,
    map_structure,
    normalize,
    normalize_leaf,
    pack_like,
    scalar_if_0d,
    spec_of,
    to_array,
)


class RangeOp(Op):
    def __init__(self, start: int, stop: int, step: int, dtype: Any = np.int64) -> None:
        super().__init__()
        if step == 0:
            raise ValueError("range step must not be zero")
        self.start, self.stop, self.step = int(start), int(stop), int(step)
        self.dtype = np.dtype(dtype)
        self.name = f"range({self.start}, {self.stop}, {self.step})"

    def cardinality(self) -> int:
        return len(range(self.start, self.stop, self.step))

    def compute_spec(self) -> Any:
        return TensorSpec((), self.dtype)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        # The index of the next value: at most the count, where the pass has ended.
        index = 0 if state is None else state_int(state, "index", self.name, 0, self.cardinality())
        return RangeIterator(self, index)


class RangeIterator(StageIterator):
    def __init__(self, op: RangeOp, index: int) -> None:
        self.op = op
        self.index = index
        self.count = op.cardinality()

    def __next__(self) -> Any:
        if self.index >= self.count:
            raise StopIteration
        value = self.op.dtype.type(self.op.start + self.index * self.op.step)
        self.index += 1
        return value

    def next_chunk(self, max_n: int) -> list[Any]:
        n = min(max_n, self.count - self.index)
        if n <= 0:
            return []
        first = self.op.start + self.index * self.op.step
        self.index += n
        # Iterating an array yields numpy scalars of its dtype, far faster than one call each.
        return list(np.arange(first, first + n * self.op.step, self.op.step, dtype=self.op.dtype))

    def get_state(self) -> State:
        return {"index": self.index}


def owned_array(x: Any) -> np.ndarray:
    """``to_array(x)`` as an array nobody else can change: a copy of the user's array unless it
    is read-only all the way down (e.g. ``np.load(..., mmap_mode="r")``, which stays mapped
    instead of being read into memory), marked read-only like the arrays tf.data hands out, so
    neither the user's later writes nor a consumer's in-place edits of an element (a view of
    it) can change what the dataset yields."""
    arr = _faithful(to_array(x))
    if arr is x and _writable_somewhere(arr):
        arr = arr.copy()
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr


def _faithful(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a tensor tf.data would make: an object array is one of strings (its ``str``
    encoded as UTF-8 bytes, as tf.data does), never of other objects (rows of different
    lengths, records, images, missing values), which no tensor holds."""
    if arr.dtype != object:
        return arr
    values = arr.reshape(-1).tolist()
    if all(isinstance(v, bytes) for v in values):
        return arr
    if all(isinstance(v, str | bytes) for v in values):
        out = np.empty(len(values), dtype=object)
        out[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        return out.reshape(arr.shape)
    # Rows that are arrays (pyarrow's list columns): one tensor if they share a shape.
    if (
        values
        and all(isinstance(v, np.ndarray) for v in values)
        and len({(v.shape, v.dtype) for v in values}) == 1
    ):
        return _faithful(to_array(np.stack(values).reshape(arr.shape + values[0].shape)))
    kinds = sorted({type(v).__name__ for v in values if not isinstance(v, str | bytes)})
    raise TypeError(
        f"cannot make a tensor of values of type {', '.join(kinds)} (e.g. rows of different "
        "lengths, nested records, or missing values): give arrays of one shape and dtype, or "
        "use Dataset.from_generator with an output_signature"
    )


def _writable_somewhere(arr: Any) -> bool:
    while isinstance(arr, np.ndarray):
        if arr.flags.writeable:
            return True
        arr = arr.base
    return False


class TensorSlicesOp(Op):
    """Slices of arrays (or nests of arrays) along their first axis, converted once up front."""

    def __init__(self, tensors: Any) -> None:
        super().__init__()
        if isinstance(tensors, list) and any(_is_record(t) for t in tensors):
            # A list of tuples of numbers is one tensor to tf.data (rows of a matrix), but rows
            # holding dicts or strings are records, which tf.data cannot convert either.
            raise TypeError(
                "from_tensor_slices got a list of records (dicts, or tuples holding strings); "
                "pass a tuple/dict of lists (one per component) instead, as in tf.data"
            )
        try:
            self.structure = map_structure(owned_array, _by_items(tensors))
        except (TypeError, ValueError) as e:
            raise type(e)(f"from_tensor_slices cannot slice its input faithfully: {e}") from e
        leaves = flatten(self.structure)
        if not leaves:
            raise ValueError("from_tensor_slices needs at least one component")
        lengths = []
        for leaf in leaves:
            if leaf.ndim == 0:
                raise ValueError(
                    "from_tensor_slices needs every component to have a first dimension; "
                    f"got a scalar {leaf!r}"
                )
            lengths.append(leaf.shape[0])
        if len(set(lengths)) > 1:
            shapes = [leaf.shape for leaf in leaves]
            raise ValueError(
                "from_tensor_slices needs all components to have the same first dimension; "
                f"got shapes {shapes}"
            )
        self.length = lengths[0]
        self.leaves = leaves
        self.name = "from_tensor_slices"

    def cardinality(self) -> int:
        return self.length

    def compute_spec(self) -> Any:
        return map_structure(lambda a: leaf_spec(a).without_leading(), self.structure)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        index = 0 if state is None else state_int(state, "index", self.name, 0, self.length)
        return SlicesIterator(self, index)


class SlicesIterator(StageIterator):
    def __init__(self, op: TensorSlicesOp, index: int) -> None:
        self.op = op
        self.index = index
        self.single = op.leaves[0] if len(op.leaves) == 1 and not is_nest(op.structure) else None

    def __next__(self) -> Any:
        if self.index >= self.op.length:
            raise StopIteration
        i = self.index
        self.index += 1
        if self.single is not None:
            return self.single[i]
        return pack_like(self.op.structure, [leaf[i] for leaf in self.op.leaves])

    def next_chunk(self, max_n: int) -> list[Any]:
        start = self.index
        stop = min(self.op.length, start + max_n)
        if stop <= start:
            return []
        self.index = stop
        if self.single is not None:
            return list(self.single[start:stop])
        columns = [list(leaf[start:stop]) for leaf in self.op.leaves]
        structure = self.op.structure
        return [pack_like(structure, list(row)) for row in zip(*columns)]

    def get_state(self) -> State:
        return {"index": self.index}


def _by_items(tensors: Any) -> Any:
    """Mapping-like inputs as the dict of their items, as tf.data reads a dict: a ``Mapping``
    that is not a dict (``np.load``'s ``NpzFile``, a ``MappingProxyType``), and a table of
    named columns (a Hugging Face ``datasets.Dataset``, a ``pyarrow.Table``: anything with
    ``column_names`` and a column per name), whose rows would otherwise be sliced as objects
    (an NpzFile iterates its keys, a Hugging Face dataset its rows as dicts of ``str``)."""
    if isinstance(tensors, Mapping) and not isinstance(tensors, dict):
        return dict(tensors.items())
    names = getattr(tensors, "column_names", None)
    if names is not None and not isinstance(tensors, np.ndarray):
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"from_tensor_slices got a {type(tensors).__name__} whose column_names "
                f"{names!r:.80} are not a list of names"
            )
        return {name: _column(tensors[name]) for name in names}
    return tensors


def _column(column: Any) -> Any:
    """One column of a table as numpy reads it: pyarrow's through ``to_numpy`` (which refuses
    no type), others (lists, Hugging Face columns) as they come."""
    if type(column).__module__.startswith("pyarrow"):
        if column.null_count:
            # pyarrow would fill them in (NaN in a float copy of an int column): refused.
            raise TypeError(f"a column holds {column.null_count} missing values")
        return column.to_numpy()
    return list(column) if not isinstance(column, list | np.ndarray) else column


def _is_record(row: Any) -> bool:
    if isinstance(row, dict):
        return True
    return isinstance(row, tuple) and any(
        isinstance(leaf, str | bytes | dict) or _is_record(leaf) for leaf in row
    )


class TensorsOp(Op):
    """One element: the whole value."""

    def __init__(self, tensors: Any) -> None:
        super().__init__()
        self.value = map_structure(lambda a: scalar_if_0d(owned_array(a)), normalize(tensors))
        self.name = "from_tensors"

    def cardinality(self) -> int:
        return 1

    def compute_spec(self) -> Any:
        return spec_of(self.value)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        done = state is not None and state_bool(state, "done", self.name)
        return SingleElementIterator(self.value, done)


class SingleElementIterator(StageIterator):
    def __init__(self, value: Any, done: bool) -> None:
        self.value = value
        self.done = done

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        self.done = True
        return self.value

    def get_state(self) -> State:
        return {"done": self.done}


class GeneratorOp(Op):
    """Elements of ``generator(*args)``, called afresh for every pass.

    Resuming from a saved state calls the generator again and skips what was already produced,
    so it is exact only when the generator yields the same sequence every time it is called.
    """

    def __init__(
        self,
        generator: Callable[..., Iterable[Any]],
        args: tuple[Any, ...],
        output_signature: Any,
    ) -> None:
        super().__init__()
        self.generator = generator
        # tf.data hands args to the generator as numpy values: 3 -> int32, "a" -> b"a".
        self.args = tuple(normalize(a) for a in args)
        self.signature = output_signature
        self.name = f"from_generator({getattr(generator, '__name__', 'generator')})"

    def cardinality(self) -> int:
        return UNKNOWN

    def compute_spec(self) -> Any:
        if self.signature is not None:
            return self.signature
        return self.observed_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        if state is None:
            return GeneratorIterator(self, 0)
        produced = state_int(state, "produced", self.name)
        it = GeneratorIterator(self, produced)
        if produced:
            # Replayed now, so a state that does not fit this generator fails where it is
            # given (raised at a first next(), ignore_errors would take it for an element's).
            it.start()
        return it


class GeneratorIterator(StageIterator):
    def __init__(self, op: GeneratorOp, skip: int) -> None:
        self.op = op
        self.produced = 0
        # Created on the first request of a fresh pass, as tf.data does, so a failing call to
        # the generator function is reported like any other error of the pass.
        self._source: Iterator[Any] | None = None
        self._skip = skip

    def start(self) -> Iterator[Any]:
        try:
            source = iter(self.op.generator(*self.op.args))
        except Exception as e:
            raise wrap_user_error(self.op.name, 0, e) from e
        self._source = source
        # Resuming replays the raw values only: they were delivered (or failed) already.
        while self.produced < self._skip:
            try:
                next(source)
            except StopIteration:
                # The state counts values this generator does not have: a state of another
                # pipeline (or generator), which must not pass for the end of this one.
                raise InvalidStateError(
                    self.op.name,
                    "produced",
                    f"is {self._skip}: the generator yields only {self.produced} values",
                ) from None
            except Exception as e:
                raise wrap_user_error(self.op.name, self.produced, e) from e
            self.produced += 1
        return source

    def __next__(self) -> Any:
        source = self._source if self._source is not None else self.start()
        try:
            value = next(source)
        except StopIteration:
            raise
        except Exception as e:
            raise wrap_user_error(self.op.name, self.produced, e) from e
        position = self.produced
        # Counted before checking it, so a value that fails the check is not replayed on resume.
        self.produced += 1
        if self.op.signature is None:
            return normalize(value)
        return _conform(value, self.op.signature, self.op.name, position)

    def get_state(self) -> State:
        return {"produced": max(self.produced, self._skip)}

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


def _conform(value: Any, signature: Any, stage: str, position: int) -> Any:
    """``value`` as the declared structure, dtypes and shapes, like tf.data's from_generator:
    values are cast (from the raw Python value, so a float declared float64 keeps its
    precision) and a mismatch is an error of this element."""

    def conform(spec: Any, part: Any) -> Any:
        # Walks the signature, not the value: where the signature has a leaf, the value there
        # is one tensor whatever it is (tf.data converts a yielded tuple to an array there).
        if isinstance(spec, tuple):
            if not isinstance(part, tuple) or len(part) != len(spec):
                raise mismatch()
            parts = [conform(s, p) for s, p in zip(spec, part)]
            return type(spec)(*parts) if is_namedtuple(spec) else tuple(parts)
        if isinstance(spec, dict):
            if not isinstance(part, dict) or part.keys() != spec.keys():
                raise mismatch()
            return {k: conform(spec[k], part[k]) for k in spec}
        return cast(spec, part)

    def mismatch() -> StageError:
        return StageError(
            stage,
            position,
            f"the generator yielded {value!r}, which does not match the declared structure "
            f"{signature}",
        )

    def cast(spec: TensorSpec, leaf: Any) -> Any:
        try:
            arr = _as_declared_dtype(leaf, spec.dtype)
        except (TypeError, ValueError, OverflowError) as e:
            raise StageError(
                stage, position, f"the generator yielded {leaf!r}, which is not {spec!r}: {e}"
            ) from e
        if spec.shape is not None and (
            len(arr.shape) != len(spec.shape)
            or any(want is not None and want != got for want, got in zip(spec.shape, arr.shape))
        ):
            raise StageError(
                stage,
                position,
                f"the generator yielded an element of shape {arr.shape} where {spec!r} was "
                "declared",
            )
        return arr[()] if arr.ndim == 0 else arr

    return conform(signature, value)


def _as_declared_dtype(leaf: Any, dtype: np.dtype) -> np.ndarray:
    if dtype != STRING_DTYPE:
        arr = np.asarray(leaf)
        if arr.dtype == object or arr.dtype.kind in "SU":
            raise TypeError(f"cannot convert {arr.dtype.name} values to {dtype.name}")
        return np.asarray(arr, dtype=dtype)
    arr = to_array(normalize_leaf(leaf))
    if arr.size == 0:
        return np.empty(arr.shape, dtype=STRING_DTYPE)
    if arr.dtype != STRING_DTYPE or not all(isinstance(v, bytes) for v in arr.flat):
        raise TypeError("expected strings (str or bytes)")
    return arr
