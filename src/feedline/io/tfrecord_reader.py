"""The records of one TFRecord stream, checked: what ``TFRecordDataset`` (and a tf.data save's
reader) read through. TensorFlow's counterpart is ``core/lib/io/record_reader.cc``.

Each record is ``uint64 length | uint32 masked_crc32c(length) | data | uint32
masked_crc32c(data)``. Where the time goes (measured on 1 KiB records, 2 cores): not in the
checks but in Python calls per record and in fresh memory. So:

- one ``bytearray`` block is read into again and again (``readinto``): a fresh ``bytes`` per
  block, and the leftovers joined onto the next, cost a page fault per 8 KiB read (glibc hands
  the freed blocks back to the kernel), more than the walk over the records itself;
- the walk makes one C call per record: a ``Struct("<{length}sIQI")`` (cached per length)
  that copies the data out as ``bytes`` and reads its stored CRC and the next record's header;
  a length's own CRC is a function of the length, so it is computed once per distinct length
  and compared by ``!=`` after;
- the data CRCs are computed by one ``map`` over the block's records and compared in numpy;
- records from 32 KiB on are read from an uncompressed file straight into their own ``bytes``
  (one copy, not two through the block), and the block then reads just the bytes after one.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from feedline.errors import DataLossError, InvalidStateError
from feedline.io.compressed import WBITS, Inflated
from feedline.io.crc32c import crc32c_function, mask, masked_crc32c
from feedline.io.fs import open_binary

COMPRESSIONS: dict[str, int | None] = {"": None, **WBITS}  # name -> zlib window bits
# The most one read() asks for: a record's length is trusted only once its CRC passed, and
# even then a record of gigabytes is read in pieces rather than by one huge allocation.
_MAX_READ = 64 * 1024 * 1024
# Records from this size on are read from an uncompressed file straight into their own bytes.
_DIRECT = 32 * 1024
# The smallest block: a header and a record's CRC (buffer_size may be 0, as in tf.data).
_MIN_BLOCK = 16
# Distinct record lengths whose checked format is kept (files of Examples have a few hundred).
_FORMATS_KEPT = 4096
_HEADER = struct.Struct("<QI")
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")

# (buffer, offset) -> (data, its stored CRC, the next length, its CRC)
Unpack = Callable[[Any, int], tuple[Any, ...]]


@functools.lru_cache(maxsize=_FORMATS_KEPT)
def _length_ok(length: int, length_crc: int) -> bool:
    """Whether a header's length CRC holds (kept: a run of large records shares lengths)."""
    return masked_crc32c(_LENGTH.pack(length)) == length_crc


class RecordReader:
    """The records of one TFRecord stream, checked, from ``offset`` (a record's start).

    ``offset`` is always where the next record starts in the (decompressed) stream: what a
    state saves, and what an error names. The block holds the stream's bytes from ``offset``
    in ``block[start:end]``.
    """

    def __init__(self, name: str, stream: Any, block: int) -> None:
        self.name = name
        self.stream = stream
        self.capacity = max(block, _MIN_BLOCK)
        # 12 bytes of slack past the capacity: a record's unpacking reads the header after it
        # too, which for the block's last record is slack (and not used).
        self.block = bytearray(self.capacity + 12)
        self.view = memoryview(self.block)
        self.start = self.end = 0
        self.offset = 0
        self.crc = crc32c_function()
        # length -> (its masked CRC, the unpacker of a record of that length): checked once.
        self.formats: dict[int, tuple[int, Unpack]] = {}
        # Uncompressed: the stream's offsets are the file's, so a large record can be read
        # where it lies.
        self.seekable = not isinstance(stream, Inflated)

    def _damage(self, problem: str) -> DataLossError:
        return DataLossError(f"{self.name}: {problem} at byte {self.offset}")

    def _fill(self, need: int, greedy: bool = False) -> bool:
        """At least ``need`` bytes held from ``start``, unless the stream ends first; reading
        as much as the block takes (``greedy``) or only what is missing (after a large
        record: the next may be large too, and read where it lies)."""
        held = self.end - self.start
        if held >= need:
            return True
        if self.start and (greedy or self.start + need > self.capacity):
            # To the block's front (a copy first: the two ranges may overlap).
            self.block[:held] = self.view[self.start : self.end].tobytes()
            self.start, self.end = 0, held
        try:
            while self.end - self.start < need:
                stop = self.capacity if greedy else self.start + need
                got = self.stream.readinto(self.view[self.end : stop])
                if not got:
                    return False
                self.end += got
        except DataLossError as error:  # the decompression's: say where in the records
            raise self._damage(str(error)) from None
        return True

    def at_record(self) -> bool:
        """Whether ``offset`` is the stream's end or a record's start (its length's CRC holds)."""
        if not self._fill(12):
            return self.start == self.end
        return _length_ok(*_HEADER.unpack_from(self.block, self.start))

    def read(self, out: list[bytes]) -> bool:
        """Append the records that the block holds (reading more first if it holds none) to
        ``out``; True once the stream has ended.

        Damage raises ``DataLossError`` with the records before it already in ``out``.
        """
        if self._walk(out):
            return False
        if not self._fill(12, greedy=True):
            if self.start == self.end:
                return True
            raise self._damage("truncated record header")
        length, length_crc = _HEADER.unpack_from(self.block, self.start)
        if not _length_ok(length, length_crc):
            raise self._damage("corrupt record length (CRC mismatch)")
        if self.end - self.start >= 16 + length:
            self._walk(out)  # the block read just now holds it
        elif (self.seekable and length >= _DIRECT) or 16 + length > self.capacity:
            out.append(self._read_large(length))
        elif self._fill(16 + length, greedy=True):
            self._walk(out)
        else:
            raise self._damage(f"truncated record of {length} bytes")
        return False

    def _walk(self, out: list[bytes]) -> int:
        """Append every record wholly in the block, checked; how many. Damage is raised once
        the records before it are appended."""
        buf, pos, end = self.block, self.start, self.end
        formats = self.formats
        first = len(out)
        stored: list[int] = []
        problem = ""
        if end - pos >= 12:
            length, length_crc = _HEADER.unpack_from(buf, pos)
            # The header whose format ``unpack`` is: a run of equal lengths shares it.
            checked_length = checked_crc = -1
            unpack: Unpack = _HEADER.unpack_from
            while pos + 16 + length <= end:
                if length != checked_length or length_crc != checked_crc:
                    known = formats.get(length)
                    if known is None or known[0] != length_crc:
                        if not _length_ok(length, length_crc):
                            problem = "corrupt record length (CRC mismatch)"
                            break
                        known = self._remember(length, length_crc)
                    checked_length, checked_crc, unpack = length, length_crc, known[1]
                # The data, its CRC and the next record's header, in one call.
                data, data_crc, next_length, next_crc = unpack(buf, pos + 12)
                out.append(data)
                stored.append(data_crc)
                pos += 16 + length
                if end - pos < 12:
                    break  # that "header" was the slack's stale bytes
                length, length_crc = next_length, next_crc
        if stored:
            records = out[first:]
            crcs = np.fromiter(map(self.crc, records), dtype=np.uint32, count=len(records))
            bad = mask(crcs) != np.array(stored, dtype=np.uint32)
            if bad.any():
                good = int(bad.argmax())
                del out[first + good :]
                pos = self.start + sum(16 + len(r) for r in records[:good])
                problem = "corrupt record data (CRC mismatch)"
        self.offset += pos - self.start
        self.start = pos
        if problem:
            raise self._damage(problem)
        return len(stored)

    def _remember(self, length: int, length_crc: int) -> tuple[int, Unpack]:
        if len(self.formats) >= _FORMATS_KEPT:
            self.formats.clear()
        known = (length_crc, struct.Struct(f"<{length}sIQI").unpack_from)
        self.formats[length] = known
        return known

    def _read_large(self, length: int) -> bytes:
        """The next record, larger than the block holds: uncompressed, read where it lies
        into its own bytes; compressed, the part held joined to the rest."""
        if self.seekable:
            self.stream.seek(self.offset + 12)
            self.start = self.end = 0  # the stream goes on after the data read below
            parts, wanted = [], length
        else:
            cut = min(self.end, self.start + 12 + length)
            parts = [self.view[self.start + 12 : cut].tobytes()]
            wanted = length - len(parts[0])
            self.start = cut
        try:
            while wanted:
                part = self.stream.read(min(wanted, _MAX_READ))
                if not part:
                    break
                parts.append(part)
                wanted -= len(part)
        except DataLossError as error:
            raise self._damage(str(error)) from None
        data = parts[-1] if len(parts) == 1 else b"".join(parts)
        # Its CRC, and the next record's header if there is one (one read, not two).
        self._fill(16)
        if wanted or self.end - self.start < 4:
            raise self._damage(f"truncated record of {length} bytes")
        if masked_crc32c(data) != _CRC.unpack_from(self.block, self.start)[0]:
            raise self._damage("corrupt record data (CRC mismatch)")
        self.start += 4
        self.offset += 16 + length
        return data

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
