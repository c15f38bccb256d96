"""Compressed files read as streams: decompressed a block at a time, never whole.

For the record formats that compress a whole file (TFRecord's "GZIP" and "ZLIB", as
TensorFlow writes them): a reader resumes by decompressing up to its offset and dropping it.
"""

from __future__ import annotations

import zlib
from typing import IO

from feedline.errors import DataLossError

WBITS = {"GZIP": 31, "ZLIB": 15}  # zlib's window bits for each framing (31: gzip's)


def compression_name(value: str | None) -> str:
    """``compression_type`` as tf.data's readers take it: None or "" (none), "GZIP" or
    "ZLIB", in any case; "" for none."""
    name = (value or "").upper()
    if name and name not in WBITS:
        raise ValueError(f"compression_type must be None, '', 'GZIP' or 'ZLIB', got {value!r}")
    return name


# What skipping forward decompresses and drops at a time.
_SKIP_READ = 1024 * 1024


class Inflated:
    """A compressed stream read decompressed, a block at a time (never the whole file).
    Its ``DataLossError``s name no place: the record reader adds it.

    Concatenated members (``cat a.gz b.gz``) read as one stream, as gzip does.
    """

    def __init__(self, raw: IO[bytes], wbits: int, block: int) -> None:
        self.raw = raw
        self.wbits = wbits
        self.block = max(block, 4096)
        self.inflater = zlib.decompressobj(wbits)
        self.pending = b""  # compressed bytes read, not yet given to the inflater
        self.started = False
        # Damage met after bytes still to give out: raised by the next read.
        self.error: DataLossError | None = None

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes; fewer only at the stream's end or before damage
        (``DataLossError``, raised once the bytes before it are out)."""
        if self.error is not None:
            raise self.error
        parts: list[bytes] = []
        try:
            self._inflate(n, parts)
        except DataLossError as error:
            if not parts:
                raise
            self.error = error
        return b"".join(parts)

    def _inflate(self, n: int, parts: list[bytes]) -> None:
        wanted = n
        while wanted > 0:
            if self.inflater.eof:
                self.pending = self.pending or self.raw.read(self.block)
                if not self.pending:
                    break
                self.inflater = zlib.decompressobj(self.wbits)
            if not self.pending:
                self.pending = self.raw.read(self.block)
                if not self.pending:
                    if not self.started:
                        break  # an empty file: no records, as TensorFlow reads it
                    # TensorFlow reads a stream cut at a record's end (a writer flushed, not
                    # closed) as complete; records may be missing: here it is damage.
                    raise DataLossError("the compressed stream is truncated")
            self.started = True
            try:
                piece = self.inflater.decompress(self.pending, wanted)
            except zlib.error as error:
                raise DataLossError(f"the compressed stream is damaged ({error})") from None
            self.pending = self.inflater.unconsumed_tail or self.inflater.unused_data
            parts.append(piece)
            wanted -= len(piece)

    def readinto(self, view: memoryview) -> int:
        """``read`` into a buffer, as binary files do: how many bytes it holds."""
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def skip(self, n: int) -> int:
        """Decompress and drop ``n`` bytes, a block at a time; how many there were."""
        skipped = 0
        while skipped < n:
            got = len(self.read(min(n - skipped, _SKIP_READ)))
            if not got:
                break
            skipped += got
        return skipped

    def close(self) -> None:
        self.raw.close()
