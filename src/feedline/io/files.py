"""Datasets read from files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from feedline.dataset import Dataset
from feedline.io.compressed import compression_name
from feedline.io.fs import as_name
from feedline.io.text import TextLineInterleaveOp, TextLineOp
from feedline.ops.base import AUTOTUNE


def parallel_reads(value: Any) -> int | None:
    """``num_parallel_reads`` checked: ``None`` (one file after another), ``AUTOTUNE``, or a
    positive int, returned as given."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"num_parallel_reads must be an int, got {type(value).__name__} {value!r}")
    if value != AUTOTUNE and value < 1:
        raise ValueError(f"num_parallel_reads must be >= 1 or AUTOTUNE, got {value}")
    return int(value)


def _parallel_reads(value: Any) -> int | None:
    """The cycle length of text and fixed-length reads: ``AUTOTUNE`` is one file per core."""
    reads = parallel_reads(value)
    return (os.cpu_count() or 1) if reads == AUTOTUNE else reads


def read_files(
    names: Dataset, read: Callable[[Any], Dataset], num_parallel_reads: int | None, name: str
) -> Dataset:
    """The elements of ``read(path)`` for each path of ``names``, in the shapes of tf.data's
    ``_create_dataset_reader`` (readers.py): ``None``, file after file; an int ``n``, ``n``
    files at once on threads, one element from each in turn (``cycle_length=n,
    block_length=1``); ``AUTOTUNE``, ``interleave(num_parallel_calls=AUTOTUNE)``, the tuner
    setting how many of the next files are read ahead. ``num_parallel_reads`` as
    ``parallel_reads`` gives it."""
    if num_parallel_reads is None:
        return names.flat_map(read, name=name)
    if num_parallel_reads == AUTOTUNE:
        return names.interleave(read, num_parallel_calls=AUTOTUNE, name=name)
    return names.interleave(
        read,
        cycle_length=num_parallel_reads,
        block_length=1,
        num_parallel_calls=num_parallel_reads,
        name=name,
    )


def TextLineDataset(
    filenames: Any,
    compression_type: str | None = None,
    buffer_size: int | None = None,
    num_parallel_reads: int | None = None,
    name: str | None = None,
) -> Dataset:
    """Lines of text files as bytes, without line endings, file after file.

    ``filenames`` is a path, a list of paths, or a Dataset of paths. With
    ``num_parallel_reads`` files are read ``num_parallel_reads`` at a time, interleaving lines
    (one line from each in turn), in the order tf.data gives.
    """
    compression = compression_name(compression_type)
    cycle = _parallel_reads(num_parallel_reads)
    if isinstance(filenames, Dataset):
        op = TextLineInterleaveOp(filenames._op, compression, cycle or 1)
        return Dataset(op, filenames.options())
    paths: Sequence[Any] = (
        [filenames]
        if isinstance(filenames, str | bytes) or hasattr(filenames, "__fspath__")
        else list(filenames)
    )
    if cycle is not None and cycle > 1 and len(paths) > 1:
        names = Dataset.from_tensor_slices([as_name(p) for p in paths])
        return TextLineDataset(names, compression, buffer_size, cycle)
    return Dataset(TextLineOp([as_name(p) for p in paths], compression))
