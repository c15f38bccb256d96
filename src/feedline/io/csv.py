"""CSV files: tf.data's ``tf.data.experimental.CsvDataset`` and ``make_csv_dataset``.

Here: the arguments, checked, and ``make_csv_dataset``'s inference of names and types.
``csv_iterator.py``: the op and its iterator (state, errors); ``csv_records.py``: records and
fields as tf.data reads them.
"""

from __future__ import annotations

import codecs
import csv
import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from feedline.dataset import Dataset
from feedline.io.compressed import compression_name
from feedline.io.csv_iterator import CsvFormat, CsvOp
from feedline.io.csv_records import as_column, open_stream
from feedline.io.fs import as_names, glob
from feedline.ops.base import AUTOTUNE
from feedline.structure import STRING_DTYPE

_DEFAULT_BLOCK = 1024 * 1024


def _delimiter(field_delim: Any) -> bytes:
    delim = field_delim.encode("utf-8") if isinstance(field_delim, str) else bytes(field_delim)
    if len(delim) != 1 or delim in b'\n\r"':
        raise ValueError(f"field_delim must be one character, not a quote or a line end: {delim!r}")
    return delim


def _columns_read(
    count: int, select_cols: Sequence[int] | None, exclude_cols: Sequence[int] | None
) -> tuple[list[int], int | None]:
    """The column read into each of ``count`` outputs, and the exact number of fields a
    record must have (None with ``select_cols``: tf.data skips fields past the last one)."""
    if select_cols is not None and exclude_cols is not None:
        raise ValueError("Either select_cols or exclude_cols should be empty")
    chosen = [int(c) for c in (select_cols if select_cols is not None else exclude_cols or [])]
    if any(c < 0 for c in chosen) or any(a >= b for a, b in itertools.pairwise(chosen)):
        raise ValueError(f"columns must be sorted, unique and non-negative, got {chosen}")
    if select_cols is not None:
        if len(chosen) != count:
            raise ValueError(
                f"record_defaults has {count} values but select_cols {len(chosen)} columns: "
                "they must be as many"
            )
        return chosen, None
    total = count + len(chosen)
    if chosen and chosen[-1] >= total:
        raise ValueError(f"exclude_cols {chosen} name columns past the {total} a record has")
    excluded = set(chosen)
    return [c for c in range(total) if c not in excluded], total


def CsvDataset(
    filenames: Any,
    record_defaults: Sequence[Any],
    compression_type: str | None = None,
    buffer_size: int | None = None,
    header: bool = False,
    field_delim: str = ",",
    use_quote_delim: bool = True,
    na_value: str = "",
    select_cols: Sequence[int] | None = None,
    exclude_cols: Sequence[int] | None = None,
) -> Dataset:
    """tf.data.experimental.CsvDataset: one tuple of scalars per record of CSV files.

    ``record_defaults``, one per output column: a type (``np.float32``, ``np.float64``,
    ``np.int32``, ``np.int64``, ``str``/``bytes``; a ``tf.DType`` too) or an empty list for
    a required field, or a default value for an optional one (a Python int is int32 and a
    float float32, as in tf.data; ``np.int64(0)`` or ``[b""]`` say the type). Empty fields and
    ``na_value`` take the default. Strings come out as ``bytes``. ``header``: skip each file's
    first record. ``select_cols`` / ``exclude_cols``: sorted column indices to read / to
    skip. ``filenames``: a path or fsspec URL, or a list of them; ``compression_type``:
    ``None``/"", "GZIP" or "ZLIB"; ``buffer_size``: bytes read at a time (1 MiB).

    A record that does not fit (a field that does not convert, a required field missing, too
    few or too many fields, a stray quote) raises ``ValueError`` with tf.data's message, the
    file and the byte offset; the records before it come out first, and reading goes on after
    it, so ``ignore_errors()`` skips exactly that record, as in tf.data.
    """
    columns = [as_column(default, i) for i, default in enumerate(record_defaults)]
    if not columns:
        raise ValueError("record_defaults must name at least one column")
    wanted, total = _columns_read(len(columns), select_cols, exclude_cols)
    if buffer_size is not None and (isinstance(buffer_size, bool) or int(buffer_size) < 1):
        raise ValueError(f"buffer_size must be a positive number of bytes, got {buffer_size!r}")
    na = na_value.encode("utf-8") if isinstance(na_value, str) else bytes(na_value)
    fmt = CsvFormat(
        compression=compression_name(compression_type),
        block=int(buffer_size or _DEFAULT_BLOCK),
        header=bool(header),
        delim=_delimiter(field_delim),
        quote=bool(use_quote_delim),
        na_value=na,
        wanted=wanted,
        total=total,
    )
    return Dataset(CsvOp(as_names(filenames), columns, fmt))


# -- make_csv_dataset -----------------------------------------------------------------------


def _text_lines(name: str, compression: str, encoding: str) -> Iterator[str]:
    """The lines of a file as text, with their endings, read a block at a time."""
    stream = open_stream(name, compression, _DEFAULT_BLOCK)
    decoder = codecs.getincrementaldecoder(encoding)()
    pending = ""
    try:
        while True:
            data = stream.read(64 * 1024)
            pending += decoder.decode(data, final=not data)
            *lines, pending = pending.split("\n")
            yield from (line + "\n" for line in lines)
            if not data:
                break
        if pending:
            yield pending
    finally:
        stream.close()


def _csv_rows(name: str, compression: str, delim: str, quote: bool, encoding: str) -> Any:
    # tf.data reads names and types with Python's csv module, so this does too.
    lines = _text_lines(name, compression, encoding)
    return csv.reader(
        lines, delimiter=delim, quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE
    )


def _infer_names(names: list[str], *how: Any) -> list[str]:
    """Column names from the files' header rows, which must all agree (as tf.data's)."""
    first: list[str] | None = None
    for name in names:
        row = next(_csv_rows(name, *how), None)
        if row is None:
            raise ValueError(f"Failed when reading the header line of {name}. Is it an empty file?")
        if first is not None and row != first:
            raise ValueError(
                "All input CSV files should have the same column names in the header row. "
                f"File {name} has different column names."
            )
        first = first or row
    assert first is not None
    return first


def _is_int(text: str, dtype: type[np.integer]) -> bool:
    try:  # tf.data's own test: numpy's conversion, equal when converted wider
        return bool(dtype(text) == np.int64(text))
    except (ValueError, OverflowError):
        return False


def _is_float(text: str, dtype: type[np.floating]) -> bool:
    try:
        return bool(dtype(text) < np.inf)
    except ValueError:
        return False


_INFERENCE: list[tuple[Any, Callable[[str], bool]]] = [
    (np.int32, functools.partial(_is_int, dtype=np.int32)),
    (np.int64, functools.partial(_is_int, dtype=np.int64)),
    (np.float32, functools.partial(_is_float, dtype=np.float32)),
    (np.float64, functools.partial(_is_float, dtype=np.float64)),
    (STRING_DTYPE, lambda text: True),
]


def _infer_type(text: str, na_value: str, previous: Any) -> Any:
    """tf.data's ``_infer_type``: the narrowest type this value and the previous ones fit."""
    if text in ("", na_value):
        return previous
    for i, (dtype, fits) in enumerate(_INFERENCE):
        if fits(text) and (previous is None or any(previous is t for t, _ in _INFERENCE[: i + 1])):
            return dtype
    return previous


def _infer_defaults(
    names: list[str],
    width: int,
    selected: list[int],
    header: bool,
    na_value: str,
    rows_wanted: int | None,
    *how: Any,
) -> list[Any]:
    """Defaults from the first rows' values: 0 of the inferred type, or "" (tf.data's)."""
    types: list[Any] = [None] * len(selected)
    seen = 0
    for name in names:
        rows = _csv_rows(name, *how)
        if header:
            next(rows, None)
        for number, row in enumerate(rows, start=2 if header else 1):
            if rows_wanted is not None and seen >= rows_wanted:
                break
            if len(row) != width:
                raise ValueError(
                    f"Problem inferring types: CSV row {number} has {len(row)} number of "
                    f"fields. Expected: {width}."
                )
            types = [_infer_type(row[c], na_value, t) for c, t in zip(selected, types)]
            seen += 1
    return [b"" if t in (None, STRING_DTYPE) else t(0) for t in types]


def _selected(select_columns: Sequence[Any], names: list[str]) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    chosen = []
    for column in select_columns:
        if isinstance(column, int | np.integer):
            if not 0 <= column < len(names):
                raise ValueError(f"select_columns: no column {column} of {len(names)}")
            chosen.append(int(column))
        elif column in index:
            chosen.append(index[column])
        else:
            raise ValueError(f"select_columns: {column!r} is none of the columns {names}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"select_columns names a column twice: {list(select_columns)}")
    return sorted(chosen)


def _as_features(names: list[str], label_name: str | None, *columns: Any) -> Any:
    features = OrderedDict(zip(names, columns))
    if label_name is None:
        return features
    label = features.pop(label_name)
    return features, label


def _one_file(read: dict[str, Any], ignore_errors: bool, filenames: Any) -> Dataset:
    records = CsvDataset(filenames, **read)
    return records.ignore_errors() if ignore_errors else records


def make_csv_dataset(
    file_pattern: str | Sequence[str],
    batch_size: int,
    column_names: Sequence[str] | None = None,
    column_defaults: Sequence[Any] | None = None,
    label_name: str | None = None,
    select_columns: Sequence[Any] | None = None,
    field_delim: str = ",",
    use_quote_delim: bool = True,
    na_value: str = "",
    header: bool = True,
    num_epochs: int | None = None,
    shuffle: bool = True,
    shuffle_buffer_size: int = 10000,
    shuffle_seed: int | None = None,
    prefetch_buffer_size: int | None = None,
    num_parallel_reads: int | None = None,
    sloppy: bool = False,
    num_rows_for_inference: int | None = 100,
    compression_type: str | None = None,
    ignore_errors: bool = False,
    encoding: str = "utf-8",
) -> Dataset:
    """tf.data.experimental.make_csv_dataset: batches of CSV records as an ``OrderedDict`` of
    columns (or ``(features, label)`` with ``label_name``), built as tf.data builds it.

    Files matching ``file_pattern`` (a glob or a list; fsspec URLs too) are read
    ``num_parallel_reads`` at a time (1), shuffled (files, then records in a buffer of
    ``shuffle_buffer_size``, with ``shuffle_seed``), repeated ``num_epochs`` times (None:
    forever, every batch full) and batched. Without ``column_names`` the header row names the
    columns; without ``column_defaults`` each column's type is inferred from the first
    ``num_rows_for_inference`` rows as tf.data infers it (int32, int64, float32, float64,
    else string; empty fields default to 0 or ""). ``select_columns``: names or indices.
    """
    patterns = [file_pattern] if isinstance(file_pattern, str | bytes) else list(file_pattern)
    if not patterns:
        raise ValueError("Argument `file_pattern` should not be empty.")
    names = glob(as_names(patterns))
    if not names:
        raise ValueError(f"No files match `file_pattern` {file_pattern}.")
    compression = compression_name(compression_type)
    how = (compression, field_delim, use_quote_delim, encoding)
    if column_names is None:
        if not header:
            raise ValueError("Expected `column_names` or `header` arguments. Neither is provided.")
        column_names = _infer_names(names, *how)
    column_names = list(column_names)
    if len(set(column_names)) != len(column_names):
        raise ValueError(f"Either `column_names` or the header repeats a name: {column_names}")
    width = len(column_names)
    selected = (
        list(range(width)) if select_columns is None else _selected(select_columns, column_names)
    )
    if column_defaults is None:
        column_defaults = _infer_defaults(
            names, width, selected, header, na_value, num_rows_for_inference, *how
        )
    if select_columns is not None:
        if len(column_defaults) != len(selected):
            raise ValueError(
                "If specified, `column_defaults` and `select_columns` must have the same length"
            )
        column_names = [column_names[i] for i in selected]
    if label_name is not None and label_name not in column_names:
        raise ValueError(f"`label_name` {label_name!r} must be one of the columns {column_names}")
    read = {
        "record_defaults": list(column_defaults),
        "compression_type": compression,
        "header": header,
        "field_delim": field_delim,
        "use_quote_delim": use_quote_delim,
        "na_value": na_value,
        "select_cols": None if select_columns is None else selected,
    }
    one_file = functools.partial(_one_file, read, ignore_errors)
    reads = 1 if num_parallel_reads is None else num_parallel_reads
    if reads == 1 and not shuffle:
        # One file after another, in order: one reader over the list reads the same records
        # (and skips the same errors), without an interleave looking at each of them.
        records = _one_file(read, ignore_errors, names)
    else:
        files = Dataset.from_tensor_slices(names)
        if shuffle:
            files = files.shuffle(len(names), shuffle_seed)
        cycle = None if reads == AUTOTUNE else int(reads)
        records = files.interleave(
            one_file,
            cycle_length=cycle,
            block_length=None if cycle is None else 1,
            num_parallel_calls=None if reads == 1 else reads,
            deterministic=not sloppy,
        )
    if shuffle:
        records = records.shuffle(shuffle_buffer_size, shuffle_seed)
    if num_epochs != 1:
        records = records.repeat(num_epochs)
    batches = records.batch(batch_size, drop_remainder=num_epochs is None)
    batches = batches.map(functools.partial(_as_features, column_names, label_name))
    return batches.prefetch(AUTOTUNE if prefetch_buffer_size is None else prefetch_buffer_size)
