"""Names tf.data keeps under ``tf.data.experimental``, so ported code finds them here too.

Each is feedline's own object, never a copy: a function or class tf.data also has outside
``experimental`` is the very same object here (``sample_from_datasets`` is
``Dataset.sample_from_datasets``, ``cardinality`` is ``Dataset.cardinality``, ``CsvDataset`` is
``feedline.io.CsvDataset``, ``AutoShardPolicy`` is ``feedline.options.AutoShardPolicy``).

tf.data's experimental *transformations* take their arguments and return a function of a
dataset, for ``dataset.apply(...)``: ``ds.apply(fl.experimental.unique())``. Those here do the
same, and each calls the ``Dataset`` method of that name (``enumerate_dataset`` ->
``Dataset.enumerate``, ``dense_to_ragged_batch`` -> ``Dataset.ragged_batch``,
``parallel_interleave`` -> ``Dataset.interleave`` with ``num_parallel_calls=cycle_length`` and
``deterministic=not sloppy``), so both spellings build the same op. ``assert_cardinality``
exists only here, as in tf.data (its op: ``ops/cardinality_check.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from feedline.dataset import AUTOTUNE, INFINITE_CARDINALITY, UNKNOWN_CARDINALITY, Dataset
from feedline.ops.base import require_positive_int
from feedline.ops.cardinality_check import AssertCardinalityOp
from feedline.options import (
    AutoShardPolicy,
    AutotuneOptions,
    DistributeOptions,
    OptimizationOptions,
    ThreadingOptions,
)

Transformation = Callable[[Dataset], Dataset]

# tf.data.experimental's plain functions, which are Dataset's own.
sample_from_datasets = Dataset.sample_from_datasets
choose_from_datasets = Dataset.choose_from_datasets
cardinality = Dataset.cardinality
get_single_element = Dataset.get_single_element
save = Dataset.save
load = Dataset.load
Counter = Dataset.counter

# Readers another module defines, imported when first used (as ``feedline.io`` does).
_LAZY = {"CsvDataset": "CsvDataset", "make_csv_dataset": "make_csv_dataset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import feedline.io

        return getattr(feedline.io, _LAZY[name])
    raise AttributeError(f"module 'feedline.experimental' has no attribute {name!r}")


def _transformation(method: Callable[..., Dataset], tf_name: str) -> Callable[..., Transformation]:
    """tf.data.experimental's ``tf_name(*args)``: a function applying ``method`` with them."""

    def transformation(*args: Any, **kwargs: Any) -> Transformation:
        return lambda dataset: method(dataset, *args, **kwargs)

    transformation.__name__ = transformation.__qualname__ = tf_name
    transformation.__doc__ = (
        f"tf.data.experimental.{tf_name}: ``dataset.apply({tf_name}(...))`` is "
        f"``dataset.{method.__name__}(...)``, with the same arguments.\n\n{method.__doc__ or ''}"
    )
    return transformation


group_by_window = _transformation(Dataset.group_by_window, "group_by_window")
bucket_by_sequence_length = _transformation(
    Dataset.bucket_by_sequence_length, "bucket_by_sequence_length"
)
ignore_errors = _transformation(Dataset.ignore_errors, "ignore_errors")
unique = _transformation(Dataset.unique, "unique")
scan = _transformation(Dataset.scan, "scan")
enumerate_dataset = _transformation(Dataset.enumerate, "enumerate_dataset")
dense_to_ragged_batch = _transformation(Dataset.ragged_batch, "dense_to_ragged_batch")
rejection_resample = _transformation(Dataset.rejection_resample, "rejection_resample")
snapshot = _transformation(Dataset.snapshot, "snapshot")
take_while = _transformation(Dataset.take_while, "take_while")
unbatch = _transformation(Dataset.unbatch, "unbatch")


def parallel_interleave(
    map_func: Callable[..., Dataset],
    cycle_length: int,
    block_length: int = 1,
    sloppy: bool | None = False,
    buffer_output_elements: int | None = None,
    prefetch_input_elements: int | None = None,
) -> Transformation:
    """tf.data.experimental's ``parallel_interleave``: ``cycle_length`` datasets read in
    parallel, in order unless ``sloppy``. The two buffer sizes are left to AUTOTUNE, which
    sizes the interleave's buffers (they never change which elements come out)."""
    return lambda dataset: dataset.interleave(
        map_func,
        cycle_length,
        block_length,
        num_parallel_calls=cycle_length,
        deterministic=not sloppy,
    )


def assert_cardinality(expected_cardinality: int) -> Transformation:
    """tf.data.experimental's ``assert_cardinality``: the dataset's ``cardinality()`` is
    ``expected_cardinality`` (a count, or ``INFINITE_CARDINALITY``), and a pass whose input
    holds fewer or more elements fails once that shows (see ``ops.cardinality_check``)."""
    expected = _count_or_infinite(expected_cardinality)
    return lambda dataset: Dataset(AssertCardinalityOp(dataset._op, expected), dataset.options())


def _count_or_infinite(value: Any) -> int:
    if value == INFINITE_CARDINALITY and not isinstance(value, bool):
        return INFINITE_CARDINALITY
    return require_positive_int(value, "expected_cardinality", allow_zero=True)


def shuffle_and_repeat(
    buffer_size: int, count: int | None = None, seed: int | None = None
) -> Transformation:
    """tf.data.experimental's ``shuffle_and_repeat``: ``shuffle`` then ``repeat``."""
    return lambda dataset: dataset.shuffle(buffer_size, seed).repeat(count)


def map_and_batch(
    map_func: Callable[..., Any],
    batch_size: int,
    num_parallel_batches: int | None = None,
    drop_remainder: bool = False,
    num_parallel_calls: int | None = None,
) -> Transformation:
    """tf.data.experimental's ``map_and_batch``: ``map`` then ``batch``; the map runs
    ``num_parallel_calls`` (or ``num_parallel_batches * batch_size``) calls at a time."""
    if num_parallel_calls is None and num_parallel_batches is not None:
        num_parallel_calls = num_parallel_batches * batch_size
    return lambda dataset: dataset.map(map_func, num_parallel_calls).batch(
        batch_size, drop_remainder
    )


__all__ = [
    "AUTOTUNE",
    "INFINITE_CARDINALITY",
    "UNKNOWN_CARDINALITY",
    "AutoShardPolicy",
    "AutotuneOptions",
    "Counter",
    "DistributeOptions",
    "OptimizationOptions",
    "ThreadingOptions",
    "assert_cardinality",
    "bucket_by_sequence_length",
    "cardinality",
    "choose_from_datasets",
    "dense_to_ragged_batch",
    "enumerate_dataset",
    "get_single_element",
    "group_by_window",
    "ignore_errors",
    "load",
    "map_and_batch",
    "parallel_interleave",
    "rejection_resample",
    "sample_from_datasets",
    "save",
    "scan",
    "shuffle_and_repeat",
    "snapshot",
    "take_while",
    "unbatch",
    "unique",
    *_LAZY,
]
