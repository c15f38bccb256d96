"""Datasets read from files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from feedline.dataset import Dataset
from feedline.io.text import TextLineOp, as_path


def TextLineDataset(
    filenames: Any,
    compression_type: str | None = None,
    buffer_size: int | None = None,
    num_parallel_reads: int | None = None,
    name: str | None = None,
) -> Dataset:
    """Lines of text files as bytes, without line endings, file after file.

    ``filenames`` is a path, a list of paths, or a Dataset of paths. With
    ``num_parallel_reads`` files are read ``num_parallel_reads`` at a time, interleaving lines.
    """
    compression = (compression_type or "").upper()
    if isinstance(filenames, Dataset):
        cycle = num_parallel_reads or 1
        return filenames.interleave(
            lambda f: Dataset(TextLineOp([as_path(f)], compression)),
            cycle_length=cycle,
            block_length=1,
        )
    paths: Sequence[Any] = (
        [filenames]
        if isinstance(filenames, str | bytes) or hasattr(filenames, "__fspath__")
        else list(filenames)
    )
    if num_parallel_reads and num_parallel_reads > 1 and len(paths) > 1:
        return TextLineDataset(
            Dataset.from_tensor_slices([as_path(p) for p in paths]),
            compression_type,
            buffer_size,
            num_parallel_reads,
        )
    return Dataset(TextLineOp([as_path(p) for p in paths], compression))
