"""Datasets read from files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from feedline.dataset import Dataset
from feedline.io.compressed import compression_name
from feedline.io.fs import as_name
from feedline.io.text import TextLineInterleaveOp, TextLineOp
from feedline.ops.base import AUTOTUNE


def _parallel_reads(value: Any) -> int | None:
    """``None`` (one file after another), ``AUTOTUNE`` (one per core), or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"num_parallel_reads must be an int, got {type(value).__name__} {value!r}")
    if value == AUTOTUNE:
        return os.cpu_count() or 1
    if value < 1:
        raise ValueError(f"num_parallel_reads must be >= 1 or AUTOTUNE, got {value}")
    return int(value)


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
