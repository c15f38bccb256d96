"""Element specs of what a user function returns, found by running it, and the check of a
stage's outputs against that spec.

tf.data knows a function's output spec by tracing it on symbolic tensors. feedline runs the
function instead: on the first two real input elements, and on three synthetic inputs whose
values (0, 1, 2; strings of those lengths) and open dimensions (sizes 1, 2, 3) differ. An output
dimension earns a static size only by having it on every one of those calls: one that depends
on the input's sizes or values (``np.zeros(x)``, ``np.full(x % 3 + 1, x)``) differs between
them and is open (``None``), as tf.data's tracing would find. A function that fails on
synthetic input just contributes nothing.

Running is not proving: a function may still give a size or a dtype on later elements that the
traced calls did not show. ``OutputCheck`` finds that where it happens, as tf.data's checks of a
function's outputs do: a ``StageError`` naming the stage, the element and both specs, instead of
a spec that lies to what follows (a batch stacking float32 with float64 makes float64).
"""

from __future__ import annotations

import functools
import itertools
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from feedline.errors import StageError
from feedline.ops.base import Op, UnobservableSpec
from feedline.ops.in_memory import DatasetSpec
from feedline.runtime.chunks import Failed
from feedline.runtime.context import IterContext
from feedline.structure import (
    STRING_DTYPE,
    NotATensor,
    TensorSpec,
    format_structure,
    is_namedtuple,
    map_structure,
    merge_specs,
    sole_type,
    spec_of,
)

# The synthetic inputs: the value of every entry of the k-th (strings of that length), and the
# size of its open dimensions. Three, all different, so that an output size depending on the
# input's values or sizes shows up as different.
SYNTHETIC_VALUES = (0, 1, 2)
SYNTHETIC_SIZES = (1, 2, 3)
# Real elements a function is run on: two, so that an output shape depending on the input's
# values (np.zeros(x)) shows up as different too.
REAL_ELEMENTS = 2


def first_elements(op: Op, n: int) -> list[Any]:
    """Up to ``n`` first elements of a probe pass over ``op``."""
    it = op.make_iterator(IterContext(probe=True), None)
    try:
        return it.next_chunk(n)
    finally:
        it.close()


def synthetic_element(spec: Any, size: int, value: int = 0) -> Any:
    """An element matching ``spec``, with every open dimension of length ``size`` and every
    entry ``value`` (a string of ``value`` characters; booleans: odd is True)."""

    def make(s: Any) -> Any:
        if isinstance(s, DatasetSpec):  # a window: an empty dataset of its element spec
            from feedline.dataset import Dataset

            return Dataset.from_generator(lambda: iter(()), output_signature=s.element_spec)
        shape = () if s.shape is None else tuple(size if d is None else d for d in s.shape)
        if s.dtype == STRING_DTYPE:
            text = b"1" * value
            if not shape:
                return text
            out = np.empty(shape, dtype=object)
            out.fill(text)
            return out
        filled = np.full(shape, value % 2 if s.dtype == np.bool_ else value, dtype=s.dtype)
        return filled[()] if not shape else filled

    return map_structure(make, spec)


def traced_spec(input_op: Op, output_spec_of: Callable[[Any], Any], name: str) -> Any:
    """The spec of ``output_spec_of(element)`` over every element ``input_op`` may produce."""
    try:
        real = first_elements(input_op, REAL_ELEMENTS)
    except Exception:  # an upstream error: this is only a look at the data, not a pass
        real = []
    try:
        input_spec = input_op.element_spec()
    except UnobservableSpec:
        input_spec = None
    synthetic = []
    if input_spec is not None:
        # Even after real elements: they may agree by chance (two lines of one length) where
        # the output's shape depends on the input's values.
        synthetic = [
            synthetic_element(input_spec, size, value)
            for size, value in zip(SYNTHETIC_SIZES, SYNTHETIC_VALUES)
        ]
    specs = []
    failures: list[Exception] = []

    def run_on(element: Any) -> None:
        try:
            specs.append(output_spec_of(element))
        except Exception as e:  # a function may fail on some input: that element says nothing
            failures.append(e)

    for element in real:
        run_on(element)
    from_real = len(specs)
    # What zeros make a function warn about (1 / x) is not the user's data: no warnings.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for element in synthetic:
            run_on(element)
    # Input of open sizes (batches whose last one is smaller, lines) seen only at the sizes
    # the first real elements happen to have: nothing shows which output sizes follow the
    # input's, so none is static (a parser of synthetic bytes fails; two batches of 32 agree).
    opened = len(specs) - from_real < 2 and _has_open_size(input_spec)
    failure = failures[0] if failures else None
    not_tensors = [e for e in failures if isinstance(e, NotATensor)]
    if not specs and not_tensors:
        raise NotATensor(f"{name}: {not_tensors[0]}") from not_tensors[0]
    if not specs:
        raise UnobservableSpec(
            f"cannot infer the element spec of {name}: the function produced no output on the "
            "first input elements nor on synthetic ones"
        ) from failure
    merged = specs[0]
    for spec in itertools.islice(specs, 1, None):
        try:
            merged = merge_specs(merged, spec)
        except TypeError:
            continue  # a synthetic input took the function down another branch: ignore it
    return map_structure(_open_sizes, merged) if opened else merged


def _has_open_size(spec: Any) -> bool:
    leaves: list[Any] = []
    map_structure(leaves.append, spec)
    return any(isinstance(s, TensorSpec) and (s.shape is None or None in s.shape) for s in leaves)


def _open_sizes(spec: Any) -> Any:
    if not isinstance(spec, TensorSpec) or spec.shape is None:
        return spec
    return TensorSpec(tuple(None for _ in spec.shape), spec.dtype)


def outputs_spec(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``output_spec_of`` for a function returning elements."""
    return lambda element: spec_of(fn(element))


def output_check(
    op: Op, ctx: IterContext, executor: str | None, trace: bool = True
) -> OutputCheck | None:
    """The check of ``op``'s outputs against its traced spec for a pass in ``ctx``: none in a
    probe pass (which is how the spec is found), nor where no element shows a spec.

    Without ``trace``, only once the spec is known (asked for by the user or an op after
    this one): for functions returning datasets, whose tracing would open them (files, a
    pass over a window) before the pass has asked for any. On worker processes
    (``executor``) likewise: tracing runs the function in this process, which
    ``executor="process"`` keeps it out of (a decoder that may crash or hang)."""
    if ctx.probe:
        return None
    trace = trace and (executor or ctx.options.executor) != "process"
    if not trace and not op._spec_known:
        return None
    spec = spec_at_build(op)
    return None if spec is None else OutputCheck(spec, op.name)


def spec_at_build(op: Op) -> Any | None:
    """``op``'s element spec for a check made when the dataset is built (as tf.data checks
    what its traced spec shows), or None where there is no element to find it from."""
    try:
        return op.element_spec()
    except UnobservableSpec:
        return None


class OutputCheck:
    """A stage's outputs checked against its traced element ``spec``: the nesting (node types,
    tuple lengths, dict keys), each leaf's dtype and rank, and the sizes the spec fixes (open
    ones are free). tf.data checks a function's outputs against its traced signature too.

    A chunk whose elements are alike costs a few passes at C speed (``set(map(type, ...))``,
    an attrgetter over arrays); Python code runs per element only to take a nest's components
    apart (one list per component), and to find which elements are wrong once some are.
    """

    def __init__(self, spec: Any, stage: str) -> None:
        self.spec = spec
        self.stage = stage
        # The type of a scalar output that fits for sure (lines of text, numbers): one type
        # test instead of a walk where elements come one at a time.
        self.plain_type = (
            next((t for t in (bytes, *_SCALAR_TYPES) if _scalar_fits(t, spec)), None)
            if isinstance(spec, TensorSpec)
            else None
        )
        # The (dtype, shape) of arrays found to fit, which is all that decides whether an
        # array fits: outputs repeat a few, and a chunk of them is then checked by set
        # lookups (a map to np.full(4, x) ran 5% faster inline, 14% on two threads).
        self._arrays_seen: set[tuple[np.dtype, tuple[int, ...]]] = set()

    def mark(
        self, outputs: list[Any], failures: list[int], positions: Sequence[int]
    ) -> tuple[list[Any], list[int]]:
        """A transform's result with each output that does not fit the spec replaced by a
        ``Failed`` StageError at its position (``failures`` updated to match)."""
        failed = set(failures)
        values = [v for i, v in enumerate(outputs) if i not in failed] if failed else outputs
        if not values or self._seen_arrays(values):
            return outputs, failures
        if _column_fits(values, self.spec):
            if sole_type(values) is np.ndarray:
                if len(self._arrays_seen) >= _ARRAY_KINDS_KEPT:
                    self._arrays_seen.clear()
                self._arrays_seen.update(zip(map(_DTYPE, values), map(_SHAPE, values)))
            return outputs, failures
        outputs = list(outputs)
        for i, value in enumerate(outputs):
            if i not in failed and not self.fits(value):
                outputs[i] = Failed(self.error(value, positions[i]))
                failed.add(i)
        return outputs, sorted(failed)

    def _seen_arrays(self, values: list[Any]) -> bool:
        """Whether every one of ``values`` is an array of a dtype and shape found to fit."""
        seen = self._arrays_seen
        if not seen or type(values[0]) is not np.ndarray:
            return False
        return all(type(v) is np.ndarray and (v.dtype, v.shape) in seen for v in values)

    def fits(self, value: Any) -> bool:
        """Whether one output fits the spec (for stages that deliver one at a time)."""
        return type(value) is self.plain_type or _column_fits([value], self.spec)

    def error(self, value: Any, position: int | None) -> StageError:
        return StageError(
            self.stage,
            position,
            f"its output {_describe(value)} does not fit the element spec {self.spec} found "
            "by tracing the function on its first elements (tf.data raises here too): "
            "return one structure, dtype and rank for every element, or fix the dtype "
            "(np.float32(...), .astype(...))",
        )


def _describe(value: Any) -> str:
    try:
        return format_structure(value)
    except TypeError:  # None, or a nest holding it
        return f"{value!r:.80}"


# Distinct (dtype, shape) pairs of fitting arrays kept (ragged outputs have many).
_ARRAY_KINDS_KEPT = 1024
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_NDIM = operator.attrgetter("ndim")


def _all_are(values: list[Any], value: Any) -> bool:
    """Whether every one of ``values`` is ``value``: ``count`` compares by identity first, so
    this runs at C speed where they are one object (a type, a dtype, a small int)."""
    return values.count(value) == len(values)


def _column_fits(values: list[Any], spec: Any) -> bool:
    """Whether every one of ``values`` (one component of a chunk) fits ``spec``."""
    if isinstance(spec, tuple):
        if not _all_are(list(map(type, values)), type(spec)):
            return False
        if not is_namedtuple(spec) and not _all_are(list(map(len, values)), len(spec)):
            return False
        return all(
            _column_fits(list(map(operator.itemgetter(i), values)), s) for i, s in enumerate(spec)
        )
    if isinstance(spec, dict):
        if not _all_are(list(map(type, values)), dict):
            return False
        keys = spec.keys()
        if not all(v.keys() == keys for v in values):
            return False
        return all(
            _column_fits(list(map(operator.itemgetter(k), values)), s) for k, s in spec.items()
        )
    if not isinstance(spec, TensorSpec):  # a window's dataset: its own ops check its elements
        return True
    types = list(map(type, values))
    kinds = {types[0]} if _all_are(types, types[0]) else set(types)
    # Arrays, and scalars whose type does not say their whole dtype (a datetime's unit), are
    # read by their own dtype and shape.
    by_value = {t for t in kinds if t is np.ndarray or t in _UNIT_TYPES}
    if not all(t in by_value or _scalar_fits(t, spec) for t in kinds):
        return False
    if not by_value:
        return True
    arrays = values if len(kinds) == 1 else [v for v in values if type(v) in by_value]
    return _arrays_fit(arrays, spec)


_UNIT_TYPES = frozenset({np.datetime64, np.timedelta64})
_SCALAR_TYPES = (np.int64, np.int32, np.float32, np.float64, np.bool_, np.uint8)


def _arrays_fit(arrays: list[Any], spec: TensorSpec) -> bool:
    dtypes = list(map(_DTYPE, arrays))
    # An object array is a string array (STRING_DTYPE is object), and so are numpy's own
    # fixed-width bytes and unicode arrays (np.array(s.split())).
    if spec.dtype == STRING_DTYPE:
        if not all(d.kind in "OSU" for d in set(dtypes)):
            return False
    elif not _all_are(dtypes, spec.dtype) and any(d != spec.dtype for d in dtypes):
        return False
    if spec.shape is None:
        return True
    rank = len(spec.shape)
    if all(d is None for d in spec.shape):  # only the rank to check: ints, cached
        return _all_are(list(map(_NDIM, arrays)), rank)
    return all(
        len(shape) == rank and all(w is None or w == g for w, g in zip(spec.shape, shape))
        for shape in set(map(_SHAPE, arrays))
    )


@functools.lru_cache(maxsize=256)
def _scalar_fits(kind: type, spec: TensorSpec) -> bool:
    if spec.shape not in (None, ()):
        return False
    if spec.dtype == STRING_DTYPE:
        return kind is bytes
    return issubclass(kind, np.generic) and np.dtype(kind) == spec.dtype
