"""The op and iterator of ``CsvDataset`` (``csv.py``): files read one after another, records
converted a chunk at a time, errors raised where tf.data raises them.

A pass's state is the file and the byte offset of its next record: resuming seeks there in an
uncompressed file (local or URL), and decompresses up to it in a compressed one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from feedline.errors import DataLossError, InvalidStateError
from feedline.io.csv_records import (
    PARSERS,
    BadField,
    Record,
    Records,
    convert_column,
    open_stream,
    seek_record,
)
from feedline.ops.base import UNKNOWN, Op
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import TensorSpec

_AHEAD = 64  # records converted at once when elements are taken one by one


@dataclass(frozen=True)
class CsvFormat:
    """How the files of a ``CsvDataset`` are read (its arguments, checked)."""

    compression: str
    block: int  # bytes read at a time
    header: bool
    delim: bytes
    quote: bool
    na_value: bytes
    wanted: list[int]  # the column read into each output, in order
    total: int | None  # the exact number of fields a record has, where it is known


class CsvOp(Op):
    def __init__(
        self, paths: list[str], columns: list[tuple[np.dtype, Any]], fmt: CsvFormat
    ) -> None:
        super().__init__()
        self.paths = paths
        self.columns = columns
        self.fmt = fmt
        self.name = "csv"

    def cardinality(self) -> int:
        return 0 if not self.paths else UNKNOWN

    def compute_spec(self) -> Any:
        return tuple(TensorSpec((), dtype) for dtype, _ in self.columns)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return CsvIterator(self, state)


class CsvIterator(StageIterator):
    def __init__(self, op: CsvOp, state: State | None) -> None:
        self.op = op
        self.file_index = 0
        self.start = 0  # where the next file opened starts reading
        self.records: Records | None = None
        # Elements converted ahead of __next__, and the (file, offset) of each one's record.
        self.ahead: list[Any] = []
        self.ahead_starts: list[tuple[int, int]] = []
        self.ahead_index = 0
        self.then_next_file = False  # the deferred error ends the current file
        self.parsers = [PARSERS[dtype] for dtype, _ in op.columns]
        self.defaults = [default for _, default in op.columns]
        self.dtypes = [dtype for dtype, _ in op.columns]
        self.plain = op.fmt.total == len(op.columns)  # every field is an output, none skipped
        if state is not None:
            self.file_index = state_int(state, "file", op.name, 0, len(op.paths))
            self.start = state_int(state, "offset", op.name)
            if self.file_index == len(op.paths) and self.start:
                raise InvalidStateError(op.name, "offset", f"is {self.start}, after every file")
            if self.file_index < len(op.paths) and self.start:
                self._open()

    def _open(self) -> str | None:
        """Open the current file where ``start`` says; what is wrong with its header, if it
        has one and it was read now (tf.data reads it as a record: missing or malformed, it
        is an error, and reading goes on after it)."""
        name = self.op.paths[self.file_index]
        stream = open_stream(name, self.op.fmt.compression, self.op.fmt.block)
        self.records = Records(
            stream, self.op.fmt.delim, self.op.fmt.quote, self.op.fmt.block, self.start
        )
        try:
            if self.start and not seek_record(stream, self.start):
                raise InvalidStateError(
                    self.op.name, "offset", f"is {self.start}: no record of {name} starts there"
                )
            if self.start or not self.op.fmt.header:
                return None
            header = self.records.next()
        except BaseException:
            self.close()
            raise
        if header is None:
            return "it is empty"
        return None if header[1] is None else header[1][1]

    def _element(self, fields: list[bytes], error: tuple[int, str] | None) -> tuple[Any, ...]:
        """One record's element, field by field; a ValueError with tf.data's message for the
        first thing wrong, in tf.data's order (fields left to right, then the count)."""
        out: list[Any] = []
        wanted = self.op.fmt.wanted
        for column, text in enumerate(fields):
            if error is not None and error[0] == column:
                raise ValueError(error[1])
            index = len(out)
            if index < len(wanted) and wanted[index] == column:
                if not text or text == self.op.fmt.na_value:
                    out.append(self._default(index))
                    continue
                try:
                    out.append(self.parsers[index](text))
                except BadField as bad:
                    shown = text.decode("utf-8", "replace")
                    raise ValueError(f"Field {index} in record is {bad}: {shown}") from None
        if self.op.fmt.total is not None and len(fields) > self.op.fmt.total:
            raise ValueError(f"Expect {len(wanted)} fields but have more in record")
        if error is not None:
            raise ValueError(error[1])
        if len(out) < len(wanted):
            raise ValueError(f"Expect {len(wanted)} fields but have {len(out)} in record")
        return tuple(out)

    def _default(self, index: int) -> Any:
        value = self.defaults[index]
        if value is None:
            raise ValueError(f"Field {index} is required but missing in record!")
        return value

    def next_chunk(self, max_n: int) -> list[Any]:
        if self.ahead_index < len(self.ahead):
            out = self.ahead[self.ahead_index : self.ahead_index + max_n]
            self.ahead_index += len(out)
            return out
        return self._fill(max_n, None)

    def __next__(self) -> Any:
        # One element at a time, records are still converted a chunk at a time (what makes
        # them fast), each remembering where it starts for get_state.
        if self.ahead_index >= len(self.ahead):
            self.ahead_starts = []
            self.ahead, self.ahead_index = self._fill(_AHEAD, self.ahead_starts), 0
            if not self.ahead:
                raise StopIteration
        self.ahead_index += 1
        return self.ahead[self.ahead_index - 1]

    def _fill(self, max_n: int, starts: list[tuple[int, int]] | None) -> list[Any]:
        """Up to ``max_n`` elements (``starts``: where each one's record is, if given)."""
        out: list[Any] = []
        if self._deferred_error is not None:
            pending, self._deferred_error = self._deferred_error, None
            if self.then_next_file:
                self.then_next_file = False
                self._next_file()
            raise pending
        while len(out) < max_n and self.file_index < len(self.op.paths):
            name = self.op.paths[self.file_index]
            try:
                problem = self._open() if self.records is None else None
            except (OSError, DataLossError) as error:
                # Missing, or damaged in its header: as in tf.data, an error, then the next file.
                return self._fail(self._named(error, name, 0), out, next_file=True)
            if problem is not None:
                return self._fail(ValueError(f"Can't read header of file {name}: {problem}"), out)
            assert self.records is not None
            records, damage, ended = self.records.batch(max_n - len(out))
            if not self._convert(records, out, starts):
                break  # a bad record: the next call raises its error
            if damage is not None:
                # As in tf.data: the records before the damage, the error, the next file.
                lost = self._named(damage, name, self.records.offset)
                return self._fail(lost, out, next_file=True)
            if ended:
                self._next_file()
        return out

    def _convert(
        self, records: list[Record], out: list[Any], starts: list[tuple[int, int]] | None
    ) -> bool:
        """Append the elements of ``records`` to ``out``; False if one is bad, then read
        again from there (an error only once the elements before it are out)."""
        if not records:
            return True
        if self.plain and all(e is None and len(f) == len(self.parsers) for _, f, e in records):
            try:
                columns = zip(*(fields for _, fields, _ in records))
                nas = itertools.repeat(self.op.fmt.na_value)
                out.extend(zip(*map(convert_column, self.dtypes, self.defaults, nas, columns)))
                if starts is not None:
                    starts.extend((self.file_index, record[0]) for record in records)
                return True
            except (ValueError, OverflowError):
                pass  # record by record, to say which field of which record
        assert self.records is not None
        for i, (start, fields, error) in enumerate(records):
            try:
                out.append(self._element(fields, error))
                if starts is not None:
                    starts.append((self.file_index, start))
            except ValueError as bad:
                if out:
                    self.records.rewind(start)
                    return False
                # Nothing to give out first: the error now, reading on after it.
                self.records.rewind(
                    records[i + 1][0] if i + 1 < len(records) else self.records.offset
                )
                name = self.op.paths[self.file_index]
                raise ValueError(f"{bad} ({name}, the record at byte {start})") from None
        return True

    @staticmethod
    def _named(error: BaseException, name: str, offset: int) -> BaseException:
        """A ``DataLossError`` of a decompressing stream (which knows no file) with the file
        and the (decompressed) offset of the record it spoiled; other errors as they are."""
        if not isinstance(error, DataLossError):
            return error
        return DataLossError(f"{name}: {error} (in the record at byte {offset} or after)")

    def _fail(self, error: BaseException, out: list[Any], next_file: bool = False) -> list[Any]:
        """``out`` now and ``error`` at the next call, or ``error`` now if ``out`` is empty;
        with ``next_file``, reading goes on with the next file once it is raised (until then
        a state resumes where the error is met again)."""
        if not out:
            if next_file:
                self._next_file()
            raise error
        self._deferred_error = error
        self.then_next_file = next_file
        return out

    def _next_file(self) -> None:
        self.close()
        self.file_index += 1
        self.start = 0

    def get_state(self) -> State:
        if self.ahead_index < len(self.ahead):
            file_index, offset = self.ahead_starts[self.ahead_index]
            return {"file": file_index, "offset": offset}
        offset = self.start if self.records is None else self.records.offset
        return {"file": self.file_index, "offset": offset}

    def close(self) -> None:
        if self.records is not None:
            self.records.stream.close()
            self.records = None
