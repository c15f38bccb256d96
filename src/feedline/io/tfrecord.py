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
import io
import struct
import zlib
from typing import IO, Any

import numpy as np

from feedline.dataset import Dataset
from feedline.errors import DataLossError, InvalidStateError
from feedline.io.compressed import WBITS, Inflated, compression_name
from feedline.io.crc32c import MASK_DELTA, crc32c_function, masked_crc32c, masked_crc32c_rows
from feedline.io.fs import as_name, as_names, create_binary, open_binary
from feedline.ops.base import AUTOTUNE, UNKNOWN, Op, require_positive_int
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import STRING_DTYPE, TensorSpec

COMPRESSIONS: dict[str, int | None] = {"": None, **WBITS}  # name -> zlib window bits
# tf.data's default read buffer (readers.py: _DEFAULT_READER_BUFFER_SIZE_BYTES).
DEFAULT_BUFFER_SIZE = 256 * 1024
# The most one read() asks for: a record's length is trusted only once its CRC passed, and
# even then a record of gigabytes is read in pieces rather than by one huge allocation.
_MAX_READ = 64 * 1024 * 1024
# Records from this size on are read from an uncompressed file straight into their own bytes.
_DIRECT = 32 * 1024
_HEADER = struct.Struct("<QI")
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEAD_BYTES = np.arange(12)


def _uint32s(rows: np.ndarray) -> np.ndarray:
    """Rows of 4 bytes as little-endian uint32s."""
    return np.ascontiguousarray(rows).view("<u4").ravel()


# -- reading --------------------------------------------------------------------------------


class RecordReader:
    """The records of one TFRecord stream, checked, from ``offset`` (a record's start).

    ``offset`` is always where the next record starts in the (decompressed) stream: what a
    state saves, and what an error names.
    """

    def __init__(self, name: str, stream: Any, block: int) -> None:
        self.name = name
        self.stream = stream
        self.block = block
        self.buf = b""
        self.pos = 0
        self.offset = 0
        self.crc = crc32c_function()
        # Uncompressed: the stream's offsets are the file's, so a large record can be read
        # where it lies.
        self.seekable = not isinstance(stream, Inflated)

    def _fill(self, need: int) -> bool:
        """At least ``need`` bytes from ``pos`` in the buffer, unless the stream ends first."""
        avail = len(self.buf) - self.pos
        parts = [self.buf[self.pos :]]
        try:
            while avail < need:
                chunk = self.stream.read(min(max(self.block, need - avail), _MAX_READ))
                if not chunk:
                    break
                parts.append(chunk)
                avail += len(chunk)
        except DataLossError as error:  # the decompression's: say where in the records
            raise self._damage(str(error)) from None
        finally:
            self.buf = b"".join(parts)
            self.pos = 0
        return avail >= need

    def _damage(self, problem: str) -> DataLossError:
        return DataLossError(f"{self.name}: {problem} at byte {self.offset}")

    def at_record(self) -> bool:
        """Whether ``offset`` is the stream's end or a record's start (its length's CRC holds)."""
        if not self._fill(12):
            return len(self.buf) == self.pos
        _, length_crc = _HEADER.unpack_from(self.buf, self.pos)
        return bool(masked_crc32c(self.buf[self.pos : self.pos + 8]) == length_crc)

    def read(self, out: list[bytes]) -> bool:
        """Append the records that the buffer holds (reading more first if it holds none) to
        ``out``; True once the stream has ended.

        Damage raises ``DataLossError`` with the records before it already in ``out``.
        """
        while True:
            if len(self.buf) - self.pos < 12:
                if out:
                    return False
                if not self._fill(12):
                    if len(self.buf) == self.pos:
                        return True
                    raise self._damage("truncated record header")
            if self._read_buffered(out) or out:
                return False
            self._read_one(out)

    def _read_buffered(self, out: list[bytes]) -> bool:
        """Append every record wholly in the buffer, checked together: the length CRCs in
        numpy, the data CRCs in one ``map``. False if the buffer holds no whole record."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        starts: list[int] = []
        records: list[bytes] = []
        unpack = _LENGTH.unpack_from
        end = pos
        while size - end >= 12:
            after = end + 16 + unpack(buf, end)[0]
            if after > size:
                break
            starts.append(end)
            records.append(buf[end + 12 : after - 4])
            end = after
        if not starts:
            return False
        raw = np.frombuffer(buf, dtype=np.uint8)
        first = np.array(starts)
        heads = raw[first[:, None] + _HEAD_BYTES]
        bad = masked_crc32c_rows(heads[:, :8]) != _uint32s(heads[:, 8:])
        lengths_ok = int(np.argmax(bad)) if bad.any() else len(starts)
        # A bad length CRC leaves the records after it unfound: only those before are checked.
        del records[lengths_ok:]
        crcs = np.fromiter(map(self.crc, records), dtype=np.uint32, count=len(records))
        masked = ((crcs >> np.uint32(15)) | (crcs << np.uint32(17))) + np.uint32(MASK_DELTA)
        ends = np.append(first[1:], end)[: len(records)]
        bad = masked != _uint32s(raw[ends[:, None] - 4 + _HEAD_BYTES[:4]])
        good = int(np.argmax(bad)) if bad.any() else len(records)
        out += records[:good]
        self.pos = starts[good] if good < len(starts) else end
        self.offset += self.pos - pos
        if good < len(records):
            raise self._damage("corrupt record data (CRC mismatch)")
        if good < len(starts):
            raise self._damage("corrupt record length (CRC mismatch)")
        return True

    def _read_one(self, out: list[bytes]) -> None:
        """Append the next record, which the buffer does not hold whole: read where it lies
        if it is large, else into the buffer."""
        buf, pos = self.buf, self.pos
        length, length_crc = _HEADER.unpack_from(buf, pos)
        if masked_crc32c(buf[pos : pos + 8]) != length_crc:
            raise self._damage("corrupt record length (CRC mismatch)")
        if self.seekable and length >= _DIRECT:
            data, stored = self._read_direct(length)
            end = 0  # the buffer now starts at the record's end
        elif self._fill(16 + length):
            buf, end = self.buf, 16 + length
            data, stored = buf[12 : end - 4], buf[end - 4 : end]
        else:
            raise self._damage(f"truncated record of {length} bytes")
        if masked_crc32c(data) != _CRC.unpack(stored)[0]:
            raise self._damage("corrupt record data (CRC mismatch)")
        out.append(data)
        self.pos = end
        self.offset += 16 + length

    def _read_direct(self, length: int) -> tuple[bytes, bytes]:
        """A large record read from the file straight into its own bytes (one copy, not three
        through the buffer), with its CRC and the next record's header, which stays in the
        buffer: a run of large records never reads a block of data it then copies again."""
        stream = self.stream
        stream.seek(self.offset + 12)
        parts = []
        wanted = length
        while wanted:
            part = stream.read(min(wanted, _MAX_READ))
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        tail = stream.read(16)
        if wanted or len(tail) < 4:
            self.buf, self.pos = b"", 0
            raise self._damage(f"truncated record of {length} bytes")
        self.buf, self.pos = tail[4:], 0
        return data, tail[:4]

    def close(self) -> None:
        self.stream.close()


def open_records(name: str, compression: str, block: int, offset: int = 0) -> RecordReader:
    """A reader of file ``name`` positioned at ``offset``; ``InvalidStateError`` if no record
    starts there. Compressed streams skip forward by decompressing, a block at a time."""
    try:
        raw = open_binary(name)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"TFRecord file not found: {name}") from error
    wbits = COMPRESSIONS[compression]
    stream: IO[bytes] | Inflated = raw if wbits is None else Inflated(raw, wbits, block)
    reader = RecordReader(name, stream, block)
    if offset == 0:
        return reader
    try:
        if isinstance(stream, Inflated):
            reached = stream.skip(offset)
        else:
            reached = min(offset, raw.seek(0, io.SEEK_END))
            raw.seek(reached)
        if reached < offset:
            raise InvalidStateError("tfrecord", "offset", f"is {offset}, past the end of {name}")
        reader.offset = offset
        if not reader.at_record():
            raise InvalidStateError("tfrecord", "offset", f"is {offset}: no record starts there")
    except BaseException:
        reader.close()
        raise
    return reader


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

    Records are read a buffer at a time into ``ready`` and handed out from there: one call
    into the reader per buffer, not per record.
    """

    def __init__(self, op: TFRecordOp, state: State | None) -> None:
        self.op = op
        self.file_index = 0
        self.offset = 0  # of the next record to hand out
        self.reader: RecordReader | None = None
        self.ready: list[bytes] = []
        self.index = 0  # of the next record of ``ready`` to hand out
        self.file_ended = False  # the reader is at the end of the file
        self.failure: BaseException | None = None  # met after the records in ``ready``
        if state is not None:
            self.file_index = state_int(state, "file", op.name, 0, len(op.paths))
            offset = state_int(state, "offset", op.name)
            if offset and self.file_index == len(op.paths):
                raise InvalidStateError(op.name, "offset", f"is {offset}, past the last file")
            if offset:
                self.reader = self._open(offset)
                self.offset = offset

    def _open(self, offset: int) -> RecordReader:
        path = self.op.paths[self.file_index]
        return open_records(path, self.op.compression, self.op.block, offset)

    def _next_file(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.file_index += 1
        self.offset = 0
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
                self.ready, self.index = out, 0
                return True
        return False

    def __next__(self) -> Any:
        if self.index >= len(self.ready) and not self._refill():
            raise StopIteration
        record = self.ready[self.index]
        self.index += 1
        self.offset += 16 + len(record)
        return record

    def next_chunk(self, max_n: int) -> list[Any]:
        if self.index >= len(self.ready) and not self._refill():
            return []
        start = self.index
        chunk = (
            self.ready
            if start == 0 and max_n >= len(self.ready)
            else self.ready[start : start + max_n]
        )
        self.index += len(chunk)
        self.offset += 16 * len(chunk) + sum(map(len, chunk))
        return chunk

    def get_state(self) -> State:
        return {"file": self.file_index, "offset": self.offset}

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
    if num_parallel_reads is not None and num_parallel_reads != AUTOTUNE:
        require_positive_int(num_parallel_reads, "num_parallel_reads")
    if isinstance(filenames, Dataset):
        names = filenames
    elif num_parallel_reads is None:
        return Dataset(TFRecordOp(as_names(filenames), compression, block))
    else:
        names = Dataset.from_tensor_slices(np.array(as_names(filenames), dtype=object))
    # The shapes of tf.data's readers.py (_create_dataset_reader).
    read = functools.partial(_read_one_file, compression, block)
    label = name or "tfrecord"
    if num_parallel_reads is None:
        return names.flat_map(read, name=label)
    if num_parallel_reads == AUTOTUNE:
        return names.interleave(read, num_parallel_calls=AUTOTUNE, name=label)
    calls = int(num_parallel_reads)
    return names.interleave(
        read, cycle_length=calls, block_length=1, num_parallel_calls=calls, name=label
    )


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
