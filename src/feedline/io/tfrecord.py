"""TFRecord files: ``TFRecordDataset`` and ``TFRecordWriter`` (tf.data's and tf.io's).

The format (TensorFlow's ``core/lib/io/record_writer.cc``), one record after another::

    uint64 length (little-endian) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

where ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8`` (mod 2**32). A "GZIP" or
"ZLIB" file is that stream compressed as a whole (gzip or zlib framing). The layout is four
lines, so it is written here rather than taken from a library (the ``tfrecord`` package reads
it, but checks no CRC, cannot resume at an offset, and its protobuf module cannot be loaded
beside TensorFlow's); the checksums come from ``crc32c.py`` (``google-crc32c``, the
``feedline[tfrecord]`` extra, or numpy).
"""

from __future__ import annotations

import functools
import struct
import zlib
from typing import IO, Any

import numpy as np

from feedline.dataset import Dataset
from feedline.errors import DataLossError, InvalidStateError
from feedline.io.compressed import compression_name
from feedline.io.crc32c import masked_crc32c
from feedline.io.files import parallel_reads, read_files
from feedline.io.fs import as_name, as_names, create_binary
from feedline.io.tfrecord_reader import COMPRESSIONS, RecordReader, open_records
from feedline.ops.base import UNKNOWN, Op, require_positive_int
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import STRING_DTYPE, TensorSpec

# tf.data's default read buffer (readers.py: _DEFAULT_READER_BUFFER_SIZE_BYTES).
DEFAULT_BUFFER_SIZE = 256 * 1024
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class TFRecordOp(Op):
    def __init__(self, paths: list[str], compression: str, block: int) -> None:
        super().__init__()
        self.paths = paths
        self.compression = compression
        self.block = block
        self.name = "tfrecord"

    def cardinality(self) -> int:
        return UNKNOWN

    def compute_spec(self) -> Any:
        return TensorSpec((), STRING_DTYPE)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return TFRecordIterator(self, state)


class TFRecordIterator(StageIterator):
    """State: the file's index and the byte offset of the next record in it (decompressed).
    A restore seeks there (compressed: decompresses up to it, without keeping it).

    Records are read a block at a time into ``ready`` (in reverse: ``pop()`` hands out the
    next one and lets it go, so that a consumer done with it frees memory the next block's
    records reuse) and handed out from there: one call into the reader per block.
    """

    def __init__(self, op: TFRecordOp, state: State | None) -> None:
        self.op = op
        self.file_index = 0
        self.reader: RecordReader | None = None
        self.ready: list[bytes] = []  # the next records, last first
        self.ready_end = 0  # the offset after the records of ``ready``
        self.file_ended = False  # the reader is at the end of the file
        self.failure: BaseException | None = None  # met after the records in ``ready``
        if state is not None:
            self.file_index = state_int(state, "file", op.name, 0, len(op.paths))
            offset = state_int(state, "offset", op.name)
            if offset and self.file_index == len(op.paths):
                raise InvalidStateError(op.name, "offset", f"is {offset}, past the last file")
            if offset:
                self.reader = self._open(offset)
                self.ready_end = offset

    def _open(self, offset: int) -> RecordReader:
        path = self.op.paths[self.file_index]
        return open_records(path, self.op.compression, self.op.block, offset)

    def _next_file(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.file_index += 1
        self.ready_end = 0
        self.file_ended = False

    def _refill(self) -> bool:
        """The next records into ``ready``; False after the last file. Damage is raised once
        the records before it are handed out; then, as tf.data's reader does, reading goes on
        with the next file (so that ignore_errors() does not meet the same damage forever)."""
        if self.failure is not None:
            error, self.failure = self.failure, None
            self._next_file()
            raise error
        while self.file_index < len(self.op.paths):
            if self.file_ended:
                self._next_file()
                continue
            out: list[bytes] = []
            try:
                if self.reader is None:
                    self.reader = self._open(0)
                self.file_ended = self.reader.read(out)
            except (OSError, DataLossError) as error:
                if not out:
                    self._next_file()
                    raise
                self.failure = error
            if out:
                out.reverse()
                self.ready = out
                self.ready_end = self.reader.offset if self.reader is not None else 0
                return True
        return False

    def __next__(self) -> Any:
        try:
            return self.ready.pop()
        except IndexError:
            if not self._refill():
                raise StopIteration from None
            return self.ready.pop()

    def ready_list(self) -> list[Any]:
        return self.ready

    def next_chunk(self, max_n: int) -> list[Any]:
        if not self.ready and not self._refill():
            return []
        ready = self.ready
        if max_n >= len(ready):
            chunk, self.ready = ready, []
        else:
            chunk = ready[-max_n:]
            del ready[-max_n:]
        chunk.reverse()
        return chunk

    def get_state(self) -> State:
        # The records not handed out yet lie just before ``ready_end``.
        offset = self.ready_end - sum(16 + len(record) for record in self.ready)
        return {"file": self.file_index, "offset": offset}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


def _read_one_file(compression: str, block: int, filename: Any) -> Dataset:
    return Dataset(TFRecordOp([as_name(filename)], compression, block))


def TFRecordDataset(
    filenames: Any,
    compression_type: str | None = None,
    buffer_size: int | None = None,
    num_parallel_reads: int | None = None,
    name: str | None = None,
) -> Dataset:
    """tf.data.TFRecordDataset: the records of TFRecord files, each a scalar ``bytes``.

    ``filenames``: a path or URL, a list of them, or a Dataset of them. Each record's length
    and data CRC32C are checked: damage is a ``DataLossError`` naming the file and the byte
    offset, after the records before it (then, as in tf.data, reading goes on with the next
    file, which ``ignore_errors()`` uses). ``buffer_size``: bytes read at a time (256 KiB).
    ``num_parallel_reads``: files read at once on threads, interleaved one record from each
    in turn, in tf.data's order; ``AUTOTUNE``: ``interleave(num_parallel_calls=AUTOTUNE)``
    as tf.data does, the tuner setting how many are read at once.
    """
    compression = compression_name(compression_type)
    block = (
        DEFAULT_BUFFER_SIZE
        if buffer_size is None
        else require_positive_int(buffer_size, "buffer_size", allow_zero=True)
    )
    reads = parallel_reads(num_parallel_reads)
    if isinstance(filenames, Dataset):
        names = filenames
    elif reads is None:
        return Dataset(TFRecordOp(as_names(filenames), compression, block))
    else:
        names = Dataset.from_tensor_slices(np.array(as_names(filenames), dtype=object))
    read = functools.partial(_read_one_file, compression, block)
    return read_files(names, read, reads, name or "tfrecord")


# -- writing --------------------------------------------------------------------------------


class TFRecordWriter:
    """tf.io.TFRecordWriter: ``write(record)``, ``flush()``, ``close()``; a context manager.

    Uncompressed files are byte-identical to TensorFlow's; "GZIP" and "ZLIB" files read in
    TensorFlow (the compressed bytes may differ: the format fixes the stream, not the deflate
    choices).
    """

    def __init__(self, path: Any, compression_type: str | None = None) -> None:
        wbits = COMPRESSIONS[compression_name(compression_type)]
        self.path = as_name(path)
        self._deflate = None if wbits is None else zlib.compressobj(wbits=wbits)
        self._file: IO[bytes] | None = create_binary(self.path)

    def _put(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        self._file.write(data if self._deflate is None else self._deflate.compress(data))

    def write(self, record: bytes | str) -> None:
        """Append one record (``str`` is written as UTF-8, as TensorFlow does)."""
        data = record.encode("utf-8") if isinstance(record, str) else bytes(record)
        length = _LENGTH.pack(len(data))
        self._put(length + _CRC.pack(masked_crc32c(length)) + data + _CRC.pack(masked_crc32c(data)))

    def flush(self) -> None:
        """Push what was written to the file (compressed: to a point a reader can decode)."""
        if self._file is None:
            return
        if self._deflate is not None:
            self._file.write(self._deflate.flush(zlib.Z_SYNC_FLUSH))
        self._file.flush()

    def close(self) -> None:
        if self._file is None:
            return
        try:
            if self._deflate is not None:
                self._file.write(self._deflate.flush())
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
