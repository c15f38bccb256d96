"""``Dataset``: an immutable, lazy description of an input pipeline, with tf.data's API.

Every method validates its arguments, wraps the current op node in a new one and returns a new
``Dataset``; nothing runs until the dataset is iterated. Each iteration is an independent pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from feedline.io.paths import match_files
from feedline.ops.base import (
    AUTOTUNE,
    INFINITE,
    UNKNOWN,
    Op,
    function_name,
    require_callable,
    require_positive_int,
    snapshot,
)
from feedline.ops.batching import BatchOp, PaddedBatchOp, RebatchOp, UnbatchOp
from feedline.ops.cache import CacheOp
from feedline.ops.combine import ConcatenateOp, InterleaveOp, ZipOp, zip_structure
from feedline.ops.mapping import FilterOp, IgnoreErrorsOp, MapOp, TakeWhileOp
from feedline.ops.prefetch import PrefetchOp
from feedline.ops.shuffle import ShuffleOp
from feedline.ops.slicing import EnumerateOp, RepeatOp, ShardOp, SkipOp, TakeOp
from feedline.ops.sources import GeneratorOp, RangeOp, TensorSlicesOp, TensorsOp
from feedline.options import Options
from feedline.runtime.pipeline import DatasetIterator
from feedline.structure import (
    STRING_DTYPE,
    TensorSpec,
    flatten,
    map_structure,
    normalize_output,
)

INFINITE_CARDINALITY = INFINITE
UNKNOWN_CARDINALITY = UNKNOWN


def _parallelism(value: Any, what: str) -> int | None:
    """``None`` (sequential), ``AUTOTUNE``, or a positive int."""
    if value is None or value == AUTOTUNE:
        return None if value is None else AUTOTUNE
    return require_positive_int(value, what)


def _count(value: Any, what: str) -> int:
    """A count where any negative value means "all" (-1 by convention), as in tf.data."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return max(int(value), -1)


# Python types as tf.data reads them in a signature (tf.as_dtype): 32-bit numbers.
_PYTHON_DTYPES = {int: np.dtype(np.int32), float: np.dtype(np.float32), bool: np.dtype(np.bool_)}


def _as_dtype(dtype: Any) -> np.dtype:
    if dtype in (str, bytes, "string", "str", "bytes", object):
        return STRING_DTYPE
    if dtype in _PYTHON_DTYPES:
        return _PYTHON_DTYPES[dtype]
    name = getattr(dtype, "name", None)
    if name == "string":
        return STRING_DTYPE
    if isinstance(name, str) and not isinstance(dtype, np.dtype):
        # tf.DType and similar objects: go by their name ("float32", "int64", ...).
        return np.dtype(name)
    resolved = np.dtype(dtype)
    # numpy's string types (np.str_, np.bytes_, "U5") are tf.data's one string type.
    return STRING_DTYPE if resolved.kind in "US" else resolved


def _signature(output_types: Any, output_shapes: Any, output_signature: Any) -> Any:
    if output_signature is not None:
        if output_types is not None or output_shapes is not None:
            raise TypeError("pass output_signature or output_types/output_shapes, not both")
        return map_structure(
            lambda s: TensorSpec(tuple(s.shape), _as_dtype(s.dtype)), output_signature
        )
    if output_types is None:
        if output_shapes is not None:
            raise TypeError("output_shapes needs output_types")
        return None
    return _specs_along(output_types, output_shapes)


def _specs_along(types: Any, shapes: Any) -> Any:
    """Specs nested like ``types``; ``shapes`` follows that nesting down to each leaf, where a
    shape is one item (a tuple or list of dims) and a missing shape means any shape."""
    if isinstance(types, tuple):
        parts = shapes if shapes is not None else [None] * len(types)
        if not isinstance(parts, list | tuple) or len(parts) != len(types):
            raise ValueError(f"output_shapes {shapes!r} does not match output_types {types!r}")
        specs = [_specs_along(t, s) for t, s in zip(types, parts)]
        return type(types)(*specs) if hasattr(type(types), "_fields") else tuple(specs)
    if isinstance(types, dict):
        parts = shapes if shapes is not None else dict.fromkeys(types)
        if not isinstance(parts, dict) or parts.keys() != types.keys():
            raise ValueError(f"output_shapes {shapes!r} does not match output_types {types!r}")
        return {k: _specs_along(types[k], parts[k]) for k in types}
    if shapes is not None and not isinstance(shapes, list | tuple):
        raise ValueError(f"a shape must be a list or tuple of dimensions, got {shapes!r}")
    dims = None if shapes is None else tuple(None if d in (None, -1) else int(d) for d in shapes)
    return TensorSpec(dims, _as_dtype(types))


class Dataset:
    """A lazy, immutable pipeline description. Iterate it (``for x in ds``) to run it."""

    __slots__ = ("_op", "_options")

    def __init__(self, op: Op, options: Options | None = None) -> None:
        self._op = op
        self._options = options or Options()

    def _wrap(self, op: Op) -> Dataset:
        return Dataset(op, self._options)

    # -- constructors -----------------------------------------------------------------------

    @staticmethod
    def range(*args: int, output_type: Any = np.int64) -> Dataset:
        """``range(stop)`` or ``range(start, stop[, step])``; elements are int64 scalars."""
        if not 1 <= len(args) <= 3:
            raise TypeError(f"range takes 1 to 3 positional arguments, got {len(args)}")
        for a in args:
            if isinstance(a, bool) or not isinstance(a, int | np.integer):
                raise TypeError(f"range arguments must be ints, got {a!r}")
        start, stop, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
        return Dataset(RangeOp(start, stop, step, _as_dtype(output_type)))

    @staticmethod
    def from_tensor_slices(tensors: Any) -> Dataset:
        """One element per row (first axis) of ``tensors``, an array or a nest of arrays."""
        return Dataset(TensorSlicesOp(tensors))

    @staticmethod
    def from_tensors(tensors: Any) -> Dataset:
        """A dataset of exactly one element: ``tensors``."""
        return Dataset(TensorsOp(tensors))

    @staticmethod
    def from_generator(
        generator: Callable[..., Iterable[Any]],
        output_types: Any = None,
        output_shapes: Any = None,
        args: Sequence[Any] | None = None,
        output_signature: Any = None,
    ) -> Dataset:
        """Elements of ``generator(*args)``, which is called afresh for every pass."""
        require_callable(generator, "from_generator's generator")
        signature = _signature(output_types, output_shapes, output_signature)
        return Dataset(GeneratorOp(generator, tuple(args or ()), signature))

    @staticmethod
    def list_files(
        file_pattern: str | Sequence[str], shuffle: bool | None = None, seed: int | None = None
    ) -> Dataset:
        """Paths (as bytes) matching the glob pattern(s), matched now; shuffled by default."""
        patterns = [file_pattern] if isinstance(file_pattern, str | bytes) else list(file_pattern)
        files = match_files([os.fsdecode(p) for p in patterns])
        if not files:
            raise FileNotFoundError(f"no files matched pattern(s): {patterns}")
        ds = Dataset.from_tensor_slices(files)
        if shuffle is None or shuffle:
            ds = ds.shuffle(len(files), seed=seed)
        return ds

    @staticmethod
    def zip(*datasets: Any) -> Dataset:
        """Elements of several datasets side by side; stops at the shortest.

        ``zip(a, b)`` and ``zip((a, b))`` give tuples; ``zip({"x": a, "y": b})`` gives dicts.
        """
        if not datasets:
            raise TypeError("zip needs at least one dataset")
        nest = datasets[0] if len(datasets) == 1 else datasets
        structure, ops = zip_structure(nest)
        options = Options()
        for d in _flatten_datasets(nest):
            options = options.merge(d._options)
        return Dataset(ZipOp(structure, ops), options)

    # -- transformations --------------------------------------------------------------------

    def map(
        self,
        map_func: Callable[..., Any],
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Apply ``map_func`` to every element (a tuple's parts are separate arguments)."""
        map_func = snapshot(require_callable(map_func, "map_func"))
        calls = _parallelism(num_parallel_calls, "num_parallel_calls")
        op_name = f"map({name})" if name else None
        return self._wrap(MapOp(self._op, map_func, op_name, calls, deterministic))

    def random_map(
        self,
        map_func: Callable[..., Any],
        seed: int | None = None,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Like ``map``, but ``map_func(element, rng)`` also gets a ``numpy.random.Generator``.

        The generator is derived from (seed, pass number, element position), so random
        augmentation gives the same result at any parallelism and after a restore; each new
        pass (iterator, or epoch under ``repeat``) gets new numbers. With no seed, every pass
        draws a fresh one.
        """
        map_func = snapshot(require_callable(map_func, "map_func"))
        calls = _parallelism(num_parallel_calls, "num_parallel_calls")
        op_name = f"random_map({name})" if name else None
        return self._wrap(
            MapOp(self._op, map_func, op_name, calls, deterministic, random=True, seed=seed)
        )

    def filter(self, predicate: Callable[..., Any], name: str | None = None) -> Dataset:
        """Keep the elements for which ``predicate`` returns True."""
        predicate = snapshot(require_callable(predicate, "predicate"))
        return self._wrap(FilterOp(self._op, predicate))

    def flat_map(self, map_func: Callable[..., Any], name: str | None = None) -> Dataset:
        """``map_func`` returns a Dataset per element; their elements are chained in order."""
        map_func = snapshot(require_callable(map_func, "map_func"))
        return self._wrap(
            InterleaveOp(self._op, map_func, 1, 1, name=f"flat_map({function_name(map_func)})")
        )

    def interleave(
        self,
        map_func: Callable[..., Any],
        cycle_length: int | None = None,
        block_length: int | None = None,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Round-robin ``block_length`` elements from ``cycle_length`` datasets at a time."""
        map_func = snapshot(require_callable(map_func, "map_func"))
        cycle = _parallelism(cycle_length, "cycle_length")
        if cycle is None or cycle == AUTOTUNE:
            cycle = os.cpu_count() or 1
        block = 1 if block_length is None else require_positive_int(block_length, "block_length")
        calls = _parallelism(num_parallel_calls, "num_parallel_calls")
        return self._wrap(
            InterleaveOp(
                self._op,
                map_func,
                cycle,
                block,
                num_parallel_calls=calls,
                deterministic=deterministic,
            )
        )

    def batch(
        self,
        batch_size: int,
        drop_remainder: bool = False,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Stack ``batch_size`` consecutive elements; the last batch may be smaller."""
        size = require_positive_int(batch_size, "batch_size")
        _parallelism(num_parallel_calls, "num_parallel_calls")
        return self._wrap(BatchOp(self._op, size, drop_remainder))

    def padded_batch(
        self,
        batch_size: int,
        padded_shapes: Any = None,
        padding_values: Any = None,
        drop_remainder: bool = False,
        name: str | None = None,
    ) -> Dataset:
        """Batch elements of different shapes, padding each component to a common shape."""
        size = require_positive_int(batch_size, "batch_size")
        return self._wrap(
            PaddedBatchOp(self._op, size, padded_shapes, padding_values, drop_remainder)
        )

    def unbatch(self, name: str | None = None) -> Dataset:
        """Split every element along its first axis into separate elements."""
        return self._wrap(UnbatchOp(self._op))

    def rebatch(
        self, batch_size: int | Sequence[int], drop_remainder: bool = False, name: str | None = None
    ) -> Dataset:
        """Re-slice batches into batches of ``batch_size`` rows (a list of sizes cycles)."""
        given = list(batch_size) if isinstance(batch_size, list | tuple) else [batch_size]
        if not given:
            raise ValueError("rebatch needs at least one batch size")
        sizes = [require_positive_int(s, "batch_size") for s in given]
        return self._wrap(RebatchOp(self._op, sizes, drop_remainder))

    def shuffle(
        self,
        buffer_size: int,
        seed: int | None = None,
        reshuffle_each_iteration: bool | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Randomly shuffle through a buffer of ``buffer_size`` elements."""
        size = require_positive_int(buffer_size, "buffer_size")
        reshuffle = True if reshuffle_each_iteration is None else reshuffle_each_iteration
        return self._wrap(ShuffleOp(self._op, size, seed, reshuffle))

    def repeat(self, count: int | None = None, name: str | None = None) -> Dataset:
        """Repeat ``count`` times (``None`` or -1: forever); each repetition is a new pass."""
        n = None if count is None else _count(count, "count")
        return self._wrap(RepeatOp(self._op, n))

    def take(self, count: int, name: str | None = None) -> Dataset:
        return self._wrap(TakeOp(self._op, _count(count, "count")))

    def skip(self, count: int, name: str | None = None) -> Dataset:
        return self._wrap(SkipOp(self._op, _count(count, "count")))

    def take_while(self, predicate: Callable[..., Any], name: str | None = None) -> Dataset:
        predicate = snapshot(require_callable(predicate, "predicate"))
        return self._wrap(TakeWhileOp(self._op, predicate))

    def shard(self, num_shards: int, index: int, name: str | None = None) -> Dataset:
        """Every ``num_shards``-th element, starting at ``index``."""
        n = require_positive_int(num_shards, "num_shards")
        i = require_positive_int(index, "index", allow_zero=True)
        if i >= n:
            raise ValueError(f"index must be < num_shards ({n}), got {i}")
        return self._wrap(ShardOp(self._op, n, i))

    def enumerate(self, start: int = 0, name: str | None = None) -> Dataset:
        """Pairs ``(index, element)``, counting from ``start``."""
        if isinstance(start, bool) or not isinstance(start, int | np.integer):
            raise TypeError(f"start must be an int, got {start!r}")
        return self._wrap(EnumerateOp(self._op, int(start)))

    def concatenate(self, dataset: Dataset, name: str | None = None) -> Dataset:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"concatenate takes a Dataset, got {type(dataset).__name__}")
        return Dataset(ConcatenateOp(self._op, dataset._op), self._options.merge(dataset._options))

    def cache(self, filename: str | os.PathLike[str] = "", name: str | None = None) -> Dataset:
        """Keep the first complete pass in memory (or in ``filename``) and replay it after."""
        return self._wrap(CacheOp(self._op, os.fspath(filename)))

    def prefetch(self, buffer_size: int, name: str | None = None) -> Dataset:
        """Produce up to ``buffer_size`` elements ahead of the consumer (``AUTOTUNE``: tuned)."""
        if buffer_size == 0:
            return self  # tf.data accepts prefetch(0): no read-ahead at all
        size = _parallelism(buffer_size, "buffer_size")
        return self._wrap(PrefetchOp(self._op, None if size == AUTOTUNE else size))

    def apply(self, transformation_func: Callable[[Dataset], Dataset]) -> Dataset:
        result = transformation_func(self)
        if not isinstance(result, Dataset):
            raise TypeError(f"apply's function must return a Dataset, got {type(result).__name__}")
        return result

    def ignore_errors(self, log_warning: bool = False, name: str | None = None) -> Dataset:
        """Drop elements whose production raised an error (the iterator's stats count them)."""
        return self._wrap(IgnoreErrorsOp(self._op, log_warning))

    def with_options(self, options: Options) -> Dataset:
        """A dataset with ``options`` merged in (a copy: later changes to it have no effect)."""
        if not isinstance(options, Options):
            raise TypeError(f"with_options takes an Options, got {type(options).__name__}")
        return Dataset(self._op, self._options.merge(options))

    def options(self) -> Options:
        return self._options.merge(Options())

    # -- running ----------------------------------------------------------------------------

    def iterator(self, state: dict[str, Any] | None = None) -> DatasetIterator:
        """A new pass over the dataset, resumed from ``state`` (from ``get_state()``) if given."""
        return DatasetIterator(self._op, self._options, state)

    def __iter__(self) -> DatasetIterator:
        return self.iterator()

    def as_numpy_iterator(self) -> DatasetIterator:
        """Elements are already numpy values; kept for tf.data compatibility."""
        return self.iterator()

    def reduce(self, initial_state: Any, reduce_func: Callable[[Any, Any], Any]) -> Any:
        """Fold every element into a state: ``state = reduce_func(state, element)``."""
        require_callable(reduce_func, "reduce_func")
        state = normalize_output(initial_state)
        with self.iterator() as it:
            for element in it:
                state = normalize_output(reduce_func(state, element))
        return state

    # -- introspection ----------------------------------------------------------------------

    def cardinality(self) -> int:
        """The number of elements, or ``INFINITE_CARDINALITY`` / ``UNKNOWN_CARDINALITY``."""
        return self._op.cardinality()

    @property
    def element_spec(self) -> Any:
        """A ``TensorSpec`` (shape, dtype) per component, in the element's nesting."""
        return self._op.element_spec()

    def __len__(self) -> int:
        n = self.cardinality()
        if n == INFINITE:
            raise TypeError("the dataset is infinite, so it has no len()")
        if n == UNKNOWN:
            raise TypeError(
                "the dataset's length is unknown (e.g. after filter); "
                "use cardinality(), or iterate to count"
            )
        return n

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<Dataset {' -> '.join(op.name for op in _chain(self._op))}>"


def _flatten_datasets(nest: Any) -> list[Dataset]:
    return [d for d in flatten(nest) if isinstance(d, Dataset)]


def _chain(op: Op) -> list[Op]:
    """The ops from the source to ``op`` along first inputs, for a readable repr."""
    chain = [op]
    while chain[-1].inputs:
        chain.append(chain[-1].inputs[0])
    return chain[::-1]
