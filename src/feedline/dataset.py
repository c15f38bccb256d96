"""``Dataset``: an immutable, lazy description of an input pipeline, with tf.data's API.

Every method validates its arguments, wraps the current op node in a new one and returns a new
``Dataset``; nothing runs until the dataset is iterated. Each iteration is an independent pass.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from feedline.io.fs import glob as glob_files
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
from feedline.ops.batching import BatchOp, RebatchOp, UnbatchOp
from feedline.ops.cache import CacheOp
from feedline.ops.combine import ConcatenateOp, ZipOp, zip_structure
from feedline.ops.grouping import Bucketing, GroupByWindowOp, UniqueOp
from feedline.ops.interleave import InterleaveOp, default_cycle_length
from feedline.ops.mapping import FilterOp, IgnoreErrorsOp, MapOp, TakeWhileOp
from feedline.ops.padding import PaddedBatchOp
from feedline.ops.prefetch import PrefetchOp
from feedline.ops.ragged import RaggedBatchOp
from feedline.ops.resample import rejection_resample
from feedline.ops.sampling import (
    CategoricalOp,
    DirectedInterleaveOp,
    RandomOp,
    sampling_weights,
)
from feedline.ops.saving import LoadOp, check_compression, save_elements
from feedline.ops.scan import ScanOp, counter_scan
from feedline.ops.shuffle import ShuffleOp
from feedline.ops.slicing import EnumerateOp, RepeatOp, ShardOp, SkipOp, TakeOp
from feedline.ops.snapshot import SnapshotOp
from feedline.ops.sources import GeneratorOp, RangeOp, TensorSlicesOp, TensorsOp
from feedline.ops.windowing import WindowOp
from feedline.options import Options, check_executor
from feedline.pipeline import DatasetIterator
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


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"timeout must be None or a number of seconds > 0, got {value!r}")
    return float(value)


def _executor(value: Any) -> str | None:
    """``None`` (the pipeline's ``Options.executor``) or a valid executor name; "process"
    needs cloudpickle, which is checked now rather than at the first element."""
    if value is None:
        return None
    executor = check_executor(value)
    if executor == "process":
        from feedline.runtime.process import require_cloudpickle

        require_cloudpickle()
    return executor


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
        """Paths (as bytes) matching the glob pattern(s), matched now; shuffled by default.
        URLs (``s3://bucket/train-*.tfrecord``) are matched by fsspec (``feedline[cloud]``)."""
        patterns = [file_pattern] if isinstance(file_pattern, str | bytes) else list(file_pattern)
        files = glob_files([os.fsdecode(p) for p in patterns])
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
        executor: str | None = None,
        timeout: float | None = None,
    ) -> Dataset:
        """Apply ``map_func`` to every element (a tuple's parts are separate arguments).

        ``executor`` says where ``map_func`` runs: "thread", "process" (worker processes, for
        pure-Python work that holds the GIL) or "auto"; None
        takes ``Options.executor``.

        ``timeout``: seconds one call may take; a call that takes longer fails its element
        (a ``StageError`` naming it, caused by ``CallTimeout``), which ``ignore_errors`` can
        skip. In worker processes the call is stopped then (a worker stuck in native code
        is killed); on a thread it cannot be, so it fails once it returns, with a warning.
        """
        return self._map(map_func, None, num_parallel_calls, deterministic, name, executor, timeout)

    def random_map(
        self,
        map_func: Callable[..., Any],
        seed: int | None = None,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        name: str | None = None,
        executor: str | None = None,
        timeout: float | None = None,
    ) -> Dataset:
        """Like ``map``, but ``map_func(element, rng)`` also gets a ``numpy.random.Generator``.

        The generator is derived from (seed, pass number, element position), so random
        augmentation gives the same result at any parallelism and after a restore; each new
        pass (iterator, or epoch under ``repeat``) gets new numbers. With no seed, every pass
        draws a fresh one. ``executor`` as for ``map``: the numbers do not depend on it.
        """
        return self._map(
            map_func, seed, num_parallel_calls, deterministic, name, executor, timeout, True
        )

    def _map(
        self,
        map_func: Callable[..., Any],
        seed: int | None,
        num_parallel_calls: int | None,
        deterministic: bool | None,
        name: str | None,
        executor: str | None,
        timeout: float | None,
        random: bool = False,
    ) -> Dataset:
        map_func = snapshot(require_callable(map_func, "map_func"))
        calls = _parallelism(num_parallel_calls, "num_parallel_calls")
        kind = "random_map" if random else "map"
        return self._wrap(
            MapOp(
                self._op,
                map_func,
                f"{kind}({name})" if name else None,
                calls,
                deterministic,
                random=random,
                seed=seed,
                executor=_executor(executor),
                timeout=_timeout(timeout),
            )
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
        executor: str | None = None,
    ) -> Dataset:
        """Round-robin ``block_length`` elements from ``cycle_length`` datasets at a time.

        Without ``cycle_length``: tf.data's default for a 2-core machine, on every machine
        (``num_parallel_calls`` when fixed, 1 with AUTOTUNE, 2 sequential; see
        ``ops.interleave.default_cycle_length``), so the order never depends on the machine.

        ``executor`` says where the datasets are made and read. "process" runs ``map_func`` and
        the iteration of the dataset it returns in worker processes (for per-file parsing in
        pure Python); only the elements come back. There are as many workers as slots read
        at once (``num_parallel_calls``; AUTOTUNE: ``cycle_length``; None: one), up to the
        usable cores. ``map_func`` must pickle (cloudpickle), and the datasets run untuned in
        the workers: AUTOTUNE inside them runs inline, maps on threads. "thread" and "auto" run
        on threads ("auto" does not move an interleave to processes). ``None`` takes
        ``Options.executor``.
        """
        map_func = snapshot(require_callable(map_func, "map_func"))
        cycle = _parallelism(cycle_length, "cycle_length")
        block = 1 if block_length is None else require_positive_int(block_length, "block_length")
        calls = _parallelism(num_parallel_calls, "num_parallel_calls")
        if cycle is None or cycle == AUTOTUNE:
            cycle = default_cycle_length(calls)
        if calls not in (None, AUTOTUNE) and cycle_length not in (None, AUTOTUNE) and calls > cycle:
            raise ValueError(
                f"num_parallel_calls ({calls}) must be AUTOTUNE or at most cycle_length ({cycle}): "
                "each call reads one of the cycle's datasets"
            )
        return self._wrap(
            InterleaveOp(
                self._op,
                map_func,
                cycle,
                block,
                name=name,
                num_parallel_calls=calls,
                deterministic=deterministic,
                executor=_executor(executor),
            )
        )

    def batch(
        self,
        batch_size: int,
        drop_remainder: bool = False,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        name: str | None = None,
        schedule: Any = None,
    ) -> Dataset:
        """Stack ``batch_size`` consecutive elements; the last batch may be smaller.

        ``schedule`` (beyond tf.data): batch sizes that change with the elements seen, for a
        batch-size ramp. A list of ``(elements_seen, batch_size)`` steps (``batch_size``
        holds before the first), or a function ``elements_seen -> batch_size``; each batch's
        size is that of the elements batched before it. Part of the description: the same on
        every pass and after a restore, never changed by AUTOTUNE; the batch dimension of
        ``element_spec`` is unknown.
        """
        size = require_positive_int(batch_size, "batch_size")
        _parallelism(num_parallel_calls, "num_parallel_calls")
        if schedule is not None:
            # (Imported here: this method is its only user, and the imports above are shared.)
            from feedline.ops.scheduled_batch import ScheduledBatchOp

            if callable(schedule):
                schedule = snapshot(schedule)
            return self._wrap(ScheduledBatchOp(self._op, size, drop_remainder, schedule))
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

    def ragged_batch(
        self,
        batch_size: int,
        drop_remainder: bool = False,
        row_splits_dtype: Any = np.int64,
        name: str | None = None,
    ) -> Dataset:
        """Batch elements whose first dimension varies (tf.data's ``ragged_batch``). Each such
        component becomes a ``RaggedBatch(values, row_lengths)``: the elements concatenated
        along their first axis, and their lengths (``row_splits_dtype``); ``.rows()`` gives
        the elements back. Components of fully known shape are stacked as by ``batch``. See
        ``feedline.ops.ragged``."""
        size = require_positive_int(batch_size, "batch_size")
        return self._wrap(RaggedBatchOp(self._op, size, bool(drop_remainder), row_splits_dtype))

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

    def snapshot(
        self,
        path: str | os.PathLike[str],
        compression: str | None = "AUTO",
        reader_func: Callable[[Dataset], Dataset] | None = None,
        shard_func: Callable[..., Any] | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Write the elements under ``path`` on the first complete pass and read them from
        there on every later one, in this run or the next (tf.data's ``snapshot``; feedline's
        own files, which tf.data's snapshots are not: see ``feedline.ops.snapshot``).
        ``shard_func(element)`` picks each element's shard file; ``reader_func(datasets)``
        turns the Dataset of shard Datasets into the one read."""
        if reader_func is not None:
            reader_func = snapshot(require_callable(reader_func, "reader_func"))
        if shard_func is not None:
            shard_func = snapshot(require_callable(shard_func, "shard_func"))
        op = SnapshotOp(self._op, os.fspath(path), compression, reader_func, shard_func)
        return self._wrap(op)

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

    # -- windows, scans, grouping and sampling -----------------------------------------------

    def window(
        self,
        size: int,
        shift: int | None = None,
        stride: int = 1,
        drop_remainder: bool = False,
        name: str | None = None,
    ) -> Dataset:
        """Windows of up to ``size`` elements, each yielded as a Dataset (a nest of Datasets,
        one per component, for nested elements). A window starts every ``shift`` elements
        (default: ``size``) and takes every ``stride``-th one; the last windows are shorter
        unless ``drop_remainder``."""
        n = require_positive_int(size, "size")
        step = n if shift is None else require_positive_int(shift, "shift")
        every = require_positive_int(stride, "stride")
        return self._wrap(WindowOp(self._op, n, step, every, bool(drop_remainder)))

    def scan(
        self, initial_state: Any, scan_func: Callable[[Any, Any], Any], name: str | None = None
    ) -> Dataset:
        """Thread a state through the elements: ``scan_func(state, element)`` returns
        ``(new_state, output)``; the outputs are the elements. The new state must keep the
        initial state's components and dtypes."""
        scan_func = snapshot(require_callable(scan_func, "scan_func"))
        return self._wrap(ScanOp(self._op, initial_state, scan_func))

    def unique(self, name: str | None = None) -> Dataset:
        """Drop every element equal to an earlier one (elements of one int32, int64 or string
        component, as in tf.data)."""
        return self._wrap(UniqueOp(self._op))

    def get_single_element(self, name: str | None = None) -> Any:
        """The dataset's only element; ``ValueError`` if it has none or more than one."""
        with self.iterator() as it:
            elements = list(itertools.islice(it, 2))
        if not elements:
            raise ValueError("Dataset was empty.")
        if len(elements) > 1:
            raise ValueError("Dataset had more than one element.")
        return elements[0]

    def group_by_window(
        self,
        key_func: Callable[..., Any],
        reduce_func: Callable[[Any, Dataset], Dataset],
        window_size: int | None = None,
        window_size_func: Callable[[Any], Any] | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Group elements by the integer ``key_func(element)``; every group of
        ``window_size`` (or ``window_size_func(key)``) elements goes, as a Dataset, to
        ``reduce_func(key, window)``, whose elements are yielded. Groups still open at the
        end follow, by increasing key."""
        if (window_size is None) == (window_size_func is None):
            raise ValueError("pass exactly one of window_size and window_size_func")
        key_func = snapshot(require_callable(key_func, "key_func"))
        reduce_func = snapshot(require_callable(reduce_func, "reduce_func"))
        if window_size_func is None:
            size = np.int64(require_positive_int(window_size, "window_size"))

            def window_size_func(key: Any) -> np.int64:
                return size

        else:
            window_size_func = snapshot(require_callable(window_size_func, "window_size_func"))

        def spec_reduce(window: Dataset) -> Any:
            return reduce_func(np.int64(0), window)

        return self._wrap(
            GroupByWindowOp(self._op, key_func, reduce_func, window_size_func, spec_reduce)
        )

    def rejection_resample(
        self,
        class_func: Callable[..., Any],
        target_dist: Sequence[float] | np.ndarray,
        initial_dist: Sequence[float] | np.ndarray | None = None,
        seed: int | None = None,
        name: str | None = None,
    ) -> Dataset:
        """``(class, element)`` pairs resampled so that the classes ``class_func(element)``
        follow ``target_dist`` (tf.data's ``rejection_resample``, built as tf.data builds it:
        see ``feedline.ops.resample``); ``initial_dist`` is estimated from the data if not
        given. Reproducible with a seed, but not tf.data's draws."""
        class_func = snapshot(require_callable(class_func, "class_func"))
        return rejection_resample(self, class_func, target_dist, initial_dist, seed)

    def bucket_by_sequence_length(
        self,
        element_length_func: Callable[..., Any],
        bucket_boundaries: Sequence[int],
        bucket_batch_sizes: Sequence[int],
        padded_shapes: Any = None,
        padding_values: Any = None,
        pad_to_bucket_boundary: bool = False,
        no_padding: bool = False,
        drop_remainder: bool = False,
        name: str | None = None,
    ) -> Dataset:
        """Batch elements of similar length together: bucket ``i`` holds lengths in
        ``[bucket_boundaries[i-1], bucket_boundaries[i])`` and is (padded-)batched by
        ``bucket_batch_sizes[i]``."""
        boundaries = [require_positive_int(b, "bucket boundary", True) for b in bucket_boundaries]
        sizes = [require_positive_int(s, "bucket batch size") for s in bucket_batch_sizes]
        if len(sizes) != len(boundaries) + 1:
            raise ValueError(
                "len(bucket_batch_sizes) must equal len(bucket_boundaries) + 1, got "
                f"{len(sizes)} and {len(boundaries)}"
            )
        bucketing = Bucketing(
            snapshot(require_callable(element_length_func, "element_length_func")),
            boundaries,
            sizes,
            padded_shapes,
            padding_values,
            bool(pad_to_bucket_boundary),
            bool(no_padding),
            bool(drop_remainder),
        )
        return self._wrap(
            GroupByWindowOp(
                self._op,
                bucketing.bucket,
                bucketing.reduce,
                bucketing.window_size,
                bucketing.spec_reduce,
                name="bucket_by_sequence_length",
            )
        )

    @staticmethod
    def counter(
        start: float = 0, step: float = 1, dtype: Any = np.int64, name: str | None = None
    ) -> Dataset:
        """``start, start + step, ...`` forever, as ``dtype``. Built as tf.data builds it (a
        scan adding ``step``), so floats accumulate rounding and integers wrap around."""
        first, count = counter_scan(start, step, _as_dtype(dtype))
        return Dataset.from_tensors(0).repeat().scan(first, count)

    @staticmethod
    def random(
        seed: int | None = None,
        rerandomize_each_iteration: bool | None = None,
        name: str | None = None,
    ) -> Dataset:
        """Random int64 values in ``[0, 2**32)``, forever. Reproducible with a seed, but not
        tf.data's numbers."""
        return Dataset(RandomOp(seed, bool(rerandomize_each_iteration)))

    @staticmethod
    def sample_from_datasets(
        datasets: Sequence[Dataset],
        weights: Sequence[float] | np.ndarray | Dataset | None = None,
        seed: int | None = None,
        stop_on_empty_dataset: bool = False,
        rerandomize_each_iteration: bool | None = None,
    ) -> Dataset:
        """Elements of randomly picked ``datasets``, each picked with probability
        proportional to its weight (``weights`` may be a Dataset of weight vectors, one per
        pick). Reproducible with a seed, but not tf.data's picks."""
        chosen = Dataset._input_datasets(datasets)
        rerandomize = bool(rerandomize_each_iteration)
        if isinstance(weights, Dataset):
            selector = CategoricalOp(len(chosen), None, weights._op, seed, rerandomize)
            return Dataset._directed_interleave(
                selector, [weights], chosen, stop_on_empty_dataset, "sample_from_datasets"
            )
        fixed = np.ones(len(chosen))
        if weights is not None:
            # As in tf.data, a dataset of weight zero (or less) is left out altogether.
            fixed = sampling_weights(weights, len(chosen))
            keep = [i for i, w in enumerate(fixed) if w > 0]
            if not keep:
                return chosen[0].take(0)
            chosen, fixed = [chosen[i] for i in keep], fixed[keep]
        if len(chosen) == 1:
            return chosen[0]
        selector = CategoricalOp(len(chosen), fixed, None, seed, rerandomize)
        return Dataset._directed_interleave(
            selector, [], chosen, stop_on_empty_dataset, "sample_from_datasets"
        )

    @staticmethod
    def choose_from_datasets(
        datasets: Sequence[Dataset], choice_dataset: Dataset, stop_on_empty_dataset: bool = True
    ) -> Dataset:
        """Elements of ``datasets[i]`` for each index ``i`` in ``choice_dataset`` (int64
        scalars)."""
        chosen = Dataset._input_datasets(datasets)
        if not isinstance(choice_dataset, Dataset):
            raise TypeError(
                f"choice_dataset must be a Dataset, got {type(choice_dataset).__name__}"
            )
        spec = choice_dataset.element_spec
        if not (
            isinstance(spec, TensorSpec)
            and spec.dtype == np.int64
            and (spec.shape is None or spec.shape == ())
        ):
            raise TypeError(f"choice_dataset's elements must be int64 scalars, got {spec}")
        return Dataset._directed_interleave(
            choice_dataset._op,
            [choice_dataset],
            chosen,
            stop_on_empty_dataset,
            "choose_from_datasets",
        )

    @staticmethod
    def _input_datasets(datasets: Any) -> list[Dataset]:
        if isinstance(datasets, Dataset) or not isinstance(datasets, Sequence):
            raise TypeError(f"datasets must be a list of Datasets, got {type(datasets).__name__}")
        if not datasets:
            raise ValueError("datasets must not be empty")
        for d in datasets:
            if not isinstance(d, Dataset):
                raise TypeError(f"datasets must be a list of Datasets, got a {type(d).__name__}")
        return list(datasets)

    @staticmethod
    def _directed_interleave(
        selector: Op, others: list[Dataset], datasets: list[Dataset], stop: bool, name: str
    ) -> Dataset:
        """Elements of ``datasets`` in the order ``selector`` picks them; the options of all
        (and of ``others``, the datasets ``selector`` reads) are merged."""
        options = Options()
        for d in [*others, *datasets]:
            options = options.merge(d._options)
        op = DirectedInterleaveOp(selector, [d._op for d in datasets], bool(stop), name)
        return Dataset(op, options)

    def save(self, path: str | os.PathLike[str], compression: str | None = None) -> None:
        """Write every element to the directory ``path`` (feedline's own format, with the
        element spec), replacing what a previous save wrote there; ``compression``: None or
        ``"GZIP"``. Read it back with ``Dataset.load``."""
        chosen = check_compression(compression)
        with self.iterator() as it:
            save_elements(it, self.element_spec, os.fspath(path), chosen)

    @staticmethod
    def load(
        path: str | os.PathLike[str], element_spec: Any = None, compression: str | None = None
    ) -> Dataset:
        """The dataset ``save`` (feedline's, or ``tf.data.Dataset.save``'s) wrote to
        ``path``; its elements are read lazily, as it is iterated. The cardinality is the
        number of saved elements. tf.data's shards come in file order (see
        ``ops/tf_snapshot.py``)."""
        return Dataset(LoadOp(os.fspath(path), element_spec, check_compression(compression)))


def _flatten_datasets(nest: Any) -> list[Dataset]:
    return [d for d in flatten(nest) if isinstance(d, Dataset)]


def _chain(op: Op) -> list[Op]:
    """The ops from the source to ``op`` along first inputs, for a readable repr."""
    chain = [op]
    while chain[-1].inputs:
        chain.append(chain[-1].inputs[0])
    return chain[::-1]
