"""``FixedLengthRecordDataset``: files of records that all have the same number of bytes
(tf.data's ``tf.data.FixedLengthRecordDataset``), such as CIFAR-10's binary batches.

Each file is ``header_bytes``, then records of ``record_bytes`` each, then ``footer_bytes``;
every record is one element, a ``bytes`` scalar. ``compression_type`` "GZIP" or "ZLIB" reads
compressed files, whose decompressed bytes have that layout. As in tf.data, an uncompressed
file whose body is not a whole number of records fails before its first record, and a
compressed one after its last whole record, both with a ``DataLossError`` naming the file.

A pass's state is the file and the record in it: resuming seeks straight there in an
uncompressed file, and decompresses up to it in a compressed one.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from typing import IO, Any

from feedline.dataset import Dataset
from feedline.errors import DataLossError, InvalidStateError
from feedline.io.compressed import compression_name
from feedline.io.files import _parallel_reads
from feedline.io.fs import as_name, as_names, file_size, open_binary
from feedline.ops.base import UNKNOWN, Op, require_positive_int
from feedline.ops.interleave import InterleaveOp
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import STRING_DTYPE, TensorSpec

# Bytes read from a file at once when the user gives no buffer_size (tf.data reads 256 KiB).
_DEFAULT_BUFFER = 256 * 1024


class FixedLengthOp(Op):
    """The records of ``paths``, one file after another."""

    def __init__(
        self,
        paths: list[str],
        record_bytes: int,
        header_bytes: int,
        footer_bytes: int,
        compression: str,
        buffer_size: int,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.record_bytes = record_bytes
        self.header_bytes = header_bytes
        self.footer_bytes = footer_bytes
        self.compression = compression
        self.buffer_size = buffer_size
        self.name = "fixed_length_records"

    def cardinality(self) -> int:
        return 0 if not self.paths else UNKNOWN

    def compute_spec(self) -> Any:
        return TensorSpec((), STRING_DTYPE)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return FixedLengthIterator(self, state)

    def body_error(self, path: str, body: int) -> DataLossError:
        return DataLossError(
            f"excluding the header ({self.header_bytes} bytes) and footer "
            f"({self.footer_bytes} bytes), {path!r} has a body of {body} bytes, which is not a "
            f"whole number of {self.record_bytes}-byte records"
        )


class FixedLengthIterator(ChunkedIterator):
    """State: the index of the file and of the next record in it."""

    def __init__(self, op: FixedLengthOp, state: State | None) -> None:
        self.op = op
        self.file_index = 0
        self.record = 0
        self.handle: IO[bytes] | None = None
        self.chunks: Iterator[bytes] | None = None
        # Decompressed bytes read but not yet made into records (the footer stays here).
        self.pending = b""
        if state is not None:
            self._restore(state)

    def _restore(self, state: State) -> None:
        name = self.op.name
        self.file_index = state_int(state, "file", name, 0, len(self.op.paths))
        record = state_int(state, "record", name)
        if self.file_index == len(self.op.paths):
            if record:
                raise InvalidStateError(name, "record", f"is {record}, past the last file")
            return
        self._open()
        try:
            self._skip(record)
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        path = self.op.paths[self.file_index]
        self.record = 0
        self.pending = b""
        if self.op.compression == "":
            body = file_size(path) - self.op.header_bytes - self.op.footer_bytes
            # tf.data checks the size first: such a file yields no record at all.
            if body < 0 or body % self.op.record_bytes:
                raise self.op.body_error(path, body)
            self.records_left: int | None = body // self.op.record_bytes
        else:
            self.records_left = None
        self.handle = open_binary(path)
        if self.op.compression == "":
            self.handle.seek(self.op.header_bytes)
        else:
            self.chunks = self._decompressed(self.handle)
            self._drop_header()

    def _decompressed(self, handle: IO[bytes]) -> Iterator[bytes]:
        """The decompressed bytes of a compressed file, in pieces of about ``buffer_size``."""
        size = self.op.buffer_size
        if self.op.compression == "GZIP":
            handle = gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[assignment]
        decompressor = zlib.decompressobj() if self.op.compression == "ZLIB" else None
        while True:
            try:
                raw = handle.read(size)
                if decompressor is None:
                    piece = raw
                else:
                    piece = decompressor.decompress(raw) if raw else decompressor.flush()
            except (OSError, EOFError, zlib.error) as e:
                path = self.op.paths[self.file_index]
                raise DataLossError(f"{path!r} is not valid {self.op.compression}: {e}") from e
            if piece:
                yield piece
            if not raw:
                return

    def _fill(self, need: int) -> bool:
        """Read until ``pending`` holds ``need`` bytes; False where the file ends first."""
        assert self.chunks is not None
        pieces = [self.pending]
        have = len(self.pending)
        for piece in self.chunks:
            pieces.append(piece)
            have += len(piece)
            if have >= need:
                break
        self.pending = b"".join(pieces)
        return have >= need

    def _drop_header(self) -> None:
        header = self.op.header_bytes
        if not self._fill(header + self.op.footer_bytes):
            raise self.op.body_error(self.op.paths[self.file_index], len(self.pending) - header)
        self.pending = self.pending[header:]

    def _skip(self, records: int) -> None:
        """Pass ``records`` records of the open file (a restore's position)."""
        path = self.op.paths[self.file_index]
        if self.records_left is not None:  # uncompressed: seek
            if records > self.records_left:
                raise InvalidStateError(
                    self.op.name, "record", f"is {records}: {path!r} has {self.records_left}"
                )
            assert self.handle is not None
            self.handle.seek(self.op.header_bytes + records * self.op.record_bytes)
            self.records_left -= records
            self.record = records
            return
        while self.record < records:
            batch = self._records(records - self.record)
            if not batch:
                raise InvalidStateError(
                    self.op.name, "record", f"is {records}: {path!r} has {self.record}"
                )

    def _records(self, max_n: int) -> list[bytes]:
        """Up to ``max_n`` records of the open file; ``[]`` at its end."""
        size = self.op.record_bytes
        if self.records_left is not None:
            n = min(max_n, self.records_left)
            if n == 0:
                return []
            assert self.handle is not None
            data = self.handle.read(n * size)
            if len(data) != n * size:
                raise DataLossError(f"{self.op.paths[self.file_index]!r} ended early")
        else:
            footer = self.op.footer_bytes
            self._fill(max_n * size + footer)
            n = min(max_n, (len(self.pending) - footer) // size)
            if n <= 0:
                body = len(self.pending) - footer
                if body:  # the file ended with a part of a record before the footer
                    whole = self.record * size + body
                    raise self.op.body_error(self.op.paths[self.file_index], whole)
                return []
            data, self.pending = self.pending[: n * size], self.pending[n * size :]
        if self.records_left is not None:
            self.records_left -= n
        self.record += n
        return [data[i * size : (i + 1) * size] for i in range(n)]

    def next_chunk(self, max_n: int) -> list[Any]:
        while True:
            if self.handle is None:
                if self.file_index >= len(self.op.paths):
                    return []
                self._open()
            records = self._records(max_n)
            if records:
                return records
            self.close()
            self.file_index += 1
            self.record = 0

    def get_state(self) -> State:
        return {"file": self.file_index, "record": self.record}

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
            self.chunks = None


class FixedLengthInterleaveOp(InterleaveOp):
    """Records of the files a dataset of filenames names, ``cycle_length`` files at a time,
    one record from each in turn (with a spec known without reading a record)."""

    def __init__(self, filenames: Op, make: Any, cycle_length: int) -> None:
        super().__init__(filenames, make, cycle_length, 1, name="fixed_length_records")

    def compute_spec(self) -> Any:
        return TensorSpec((), STRING_DTYPE)


def FixedLengthRecordDataset(
    filenames: Any,
    record_bytes: int,
    header_bytes: int | None = None,
    footer_bytes: int | None = None,
    buffer_size: int | None = None,
    compression_type: str | None = None,
    num_parallel_reads: int | None = None,
    name: str | None = None,
) -> Dataset:
    """Records of ``record_bytes`` bytes from files (tf.data's ``FixedLengthRecordDataset``,
    same arguments): ``filenames`` is a path, a list of paths, or a Dataset of paths; local
    paths or fsspec URLs. Each file skips ``header_bytes`` and ``footer_bytes``. With
    ``num_parallel_reads`` files are read that many at a time, a record from each in turn, in
    tf.data's order; ``buffer_size`` is the bytes read from a file at once."""
    size = require_positive_int(record_bytes, "record_bytes")
    header = require_positive_int(header_bytes or 0, "header_bytes", allow_zero=True)
    footer = require_positive_int(footer_bytes or 0, "footer_bytes", allow_zero=True)
    buffer = require_positive_int(buffer_size or _DEFAULT_BUFFER, "buffer_size")
    compression = compression_name(compression_type)
    cycle = _parallel_reads(num_parallel_reads)

    def reader(paths: list[str]) -> FixedLengthOp:
        return FixedLengthOp(paths, size, header, footer, compression, buffer)

    if isinstance(filenames, Dataset):

        def one_file(path: Any) -> Dataset:
            return Dataset(reader([as_name(path)]))

        op = FixedLengthInterleaveOp(filenames._op, one_file, cycle or 1)
        return Dataset(op, filenames.options())
    paths = as_names(filenames)
    if cycle is not None and cycle > 1 and len(paths) > 1:
        return FixedLengthRecordDataset(
            Dataset.from_tensor_slices(paths), size, header, footer, buffer, compression, cycle
        )
    return Dataset(reader(paths))
