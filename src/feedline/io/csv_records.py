"""The records of CSV files as tf.data reads them, and their fields' conversions.

Records follow TensorFlow's ``csv_dataset_op.cc`` rather than Python's ``csv`` module, whose
rules differ where tf.data's matter: a record ends at ``\\n``, ``\\r\\n`` or a lone ``\\r``; a
quoted field may span lines and holds ``""`` for a quote; a quote inside an unquoted field, or
a closing quote followed by anything but a delimiter or a line end, makes the record an error
(after reading it to its end, so the next record is read correctly: ``ignore_errors()`` goes
on from there). The format is a few rules whose every corner tf.data fixes, so they are
written here, checked against TensorFlow case by case. Lines without quotes or ``\\r``,
nearly all of numeric data, take a fast path: a run of them split at once, then each line at
its delimiters. Fields convert as tf.data's ``strtof``/``strto64`` do: surrounding spaces
allowed, ``nan``/``inf``/hexadecimal floats read, an overflowing float is ``inf``, an
overflowing or malformed integer an error; a chunk of records converts a column at a time
(``convert_column``), falling back to field by field for anything unusual.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from feedline.errors import DataLossError
from feedline.io.compressed import WBITS, Inflated
from feedline.io.fs import open_binary
from feedline.structure import STRING_DTYPE, to_array

# Doubles at or past this round to float32 infinity (FLT_MAX plus half its last unit).
_F32_OVERFLOW = float(np.finfo(np.float32).max) * (1 + 2.0**-25)


def open_stream(name: str, compression: str, block: int) -> Any:
    """File ``name`` opened for reading its bytes, decompressed ("GZIP", "ZLIB") a block at a
    time."""
    raw = open_binary(name)
    return Inflated(raw, WBITS[compression], block) if compression else raw


def seek_record(stream: Any, offset: int) -> bool:
    """Move ``stream`` (from ``open_stream``) to ``offset`` > 0; False unless a line ends just
    before it, as before every record but a file's first. A compressed stream decompresses
    its way there, a block at a time."""
    if isinstance(stream, Inflated):
        reached = stream.skip(offset - 1)
    else:
        reached = min(stream.seek(0, 2), offset - 1)
        stream.seek(reached)
    return bool(reached == offset - 1 and stream.read(1) in (b"\n", b"\r"))


# A record: its start offset, its raw fields, and its first quoting error (field, message).
Record = tuple[int, list[bytes], "tuple[int, str] | None"]


class BadField(ValueError):
    """A field that does not convert; the record's reader adds which field and where."""


# -- fields ---------------------------------------------------------------------------------


def _parse_int(dtype: type[np.integer]) -> Callable[[bytes], Any]:
    info = np.iinfo(dtype)
    what = f"not a valid {dtype.__name__}"

    def parse(text: bytes) -> Any:
        # Python's int() also takes "1_000"; TensorFlow's strto64 does not.
        if b"_" not in text:
            try:
                value = int(text)
            except ValueError:
                pass
            else:
                if info.min <= value <= info.max:
                    return dtype(value)
        raise BadField(what)

    return parse


def _float(text: bytes) -> float | None:
    if b"_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    if b"0x" not in text.lower():
        return None
    try:  # TensorFlow's strtod reads hexadecimal floats ("0x1p3"), float() does not
        return float.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


def _parse_float64(text: bytes) -> Any:
    value = _float(text)
    if value is None:
        raise BadField("not a valid double")
    return np.float64(value)


def _parse_float32(text: bytes) -> Any:
    value = _float(text)
    if value is None:
        raise BadField("not a valid float")
    if abs(value) >= _F32_OVERFLOW:
        return np.float32(math.copysign(math.inf, value))
    single = np.float32(value)
    # Decimal -> double -> float32 rounds twice, which can differ from TensorFlow's direct
    # decimal -> float32 only when the double lands exactly halfway between two float32s,
    # and only a text of more than 17 digits can do that.
    if len(text) > 17 and float(single) != value and math.isfinite(value):
        single = _nearest_float32(text, value, single)
    return single


def _nearest_float32(text: bytes, value: float, single: np.float32) -> np.float32:
    other = np.nextafter(single, np.float32(math.copysign(math.inf, value - float(single))))
    middle = (float(single) + float(other)) / 2
    if value != middle or b"x" in text.lower():
        return single
    exact = Fraction(text.decode("ascii").strip())
    if exact == Fraction(middle):
        return single  # a true tie: to even, as numpy rounded it
    return other if (exact > Fraction(middle)) == (float(other) > float(single)) else single


def _parse_string(text: bytes) -> Any:
    return text


PARSERS: dict[np.dtype, Callable[[bytes], Any]] = {
    np.dtype(np.int32): _parse_int(np.int32),
    np.dtype(np.int64): _parse_int(np.int64),
    np.dtype(np.float32): _parse_float32,
    np.dtype(np.float64): _parse_float64,
    STRING_DTYPE: _parse_string,
}


def convert_column(dtype: np.dtype, default: Any, na_value: bytes, texts: tuple[bytes, ...]) -> Any:
    """A column of a chunk of records converted at once: an array (whose items are the
    numpy scalars a record holds) or the bytes. Raises on anything but plain, present
    values; the caller then converts record by record, which says what is wrong and where."""
    if dtype == STRING_DTYPE:
        if b"" in texts or na_value in texts:
            if default is None:
                raise BadField("required")
            return [default if not t or t == na_value else t for t in texts]
        return texts
    if b"" in texts or na_value in texts or b"_" in b"".join(texts):
        raise BadField("not plain")  # "_": Python's int() and float() take "1_0", tf.data not
    if dtype.kind == "i":
        values = np.array([int(t) for t in texts], dtype=np.int64)  # OverflowError past int64
        if (
            dtype == np.int32
            and len(values)
            and not (-(2**31) <= values.min() <= values.max() < 2**31)
        ):
            raise BadField("out of range")
        return values.astype(dtype, copy=False)
    values = np.array([float(t) for t in texts])
    if dtype == np.float64:
        return values
    with np.errstate(over="ignore"):  # as tf.data, a float32 overflow is infinity
        singles = values.astype(np.float32)
    if max(map(len, texts)) > 17:  # see _parse_float32
        singles = np.array([_parse_float32(t) for t in texts], dtype=np.float32)
    return singles


def _named_dtype(kind: Any) -> np.dtype | None:
    """The dtype ``kind`` names when it is a type (np.float32, str, tf.int64...), else None."""
    if any(kind is t for t in (str, bytes, object)):
        return STRING_DTYPE
    if hasattr(kind, "as_numpy_dtype"):  # a tf.DType, for code ported as it is
        kind = kind.as_numpy_dtype
    if isinstance(kind, np.dtype) or (isinstance(kind, type) and issubclass(kind, np.generic)):
        dtype = np.dtype(kind)
        return STRING_DTYPE if dtype.kind in "OSU" else dtype
    return None


def as_column(default: Any, index: int) -> tuple[np.dtype, Any]:
    """A record default as (dtype, default value or None when the field is required)."""
    dtype = _named_dtype(default)
    value = None
    if dtype is None:
        array = to_array(default)  # Python ints are int32, floats float32, as in tf.constant
        dtype = array.dtype
        if array.size > 1:
            raise ValueError(f"record_defaults[{index}] must hold one value, got {default!r}")
        if array.size == 1:
            value = array.reshape(-1)[0]
    if dtype not in PARSERS:
        raise TypeError(
            f"record_defaults[{index}] must be of float32, float64, int32, int64 or string, "
            f"got {dtype}"
        )
    return dtype, value


# -- records --------------------------------------------------------------------------------


class Records:
    """The records of one CSV stream, each as its raw fields, read a block at a time.

    ``pos`` indexes ``buf``, whose first byte is at ``base`` in the stream; bytes before the
    current record's start may be dropped, never those after it, so a record can be re-read.
    """

    def __init__(self, stream: Any, delim: bytes, quote: bool, block: int, offset: int) -> None:
        self.stream = stream
        self.delim = delim[0]
        self.split_on = delim
        self.quote = quote
        self.block = block
        self.buf = b""
        self.pos = 0
        self.base = offset
        self.mark = offset  # where the records a caller may still rewind to start
        # Lines ahead without quotes or '\r', split at once; ``line`` indexes the next one.
        self.lines: list[bytes] = []
        self.line = 0
        self.specials = (b'"', b"\r") if quote else (b"\r",)
        self.eof = False
        ends = re.escape(delim) + rb"\n\r" + (b'"' if quote else b"")
        self.stops = re.compile(b"[" + ends + b"]")

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def rewind(self, offset: int) -> None:
        self.pos = offset - self.base
        self.lines, self.line = [], 0

    def _plain_lines(self) -> bool:
        """Split, at once, the whole lines ahead in the buffer up to the first quote or
        '\\r' (records that need the full rules); False if there is none."""
        stop = len(self.buf)
        for special in self.specials:
            found = self.buf.find(special, self.pos, stop)
            stop = stop if found < 0 else found
        last = self.buf.rfind(b"\n", self.pos, stop)
        if last < 0:
            return False
        self.lines, self.line = self.buf[self.pos : last].split(b"\n"), 0
        return True

    def _grow(self, drop: bool = False) -> bool:
        """Append a block (dropping what is before ``mark`` if ``drop``); False at the end."""
        if self.eof:
            return False
        data = self.stream.read(self.block)
        if not data:
            self.eof = True
            return False
        if drop:
            keep = self.mark - self.base
            self.buf, self.base, self.pos = self.buf[keep:] + data, self.mark, self.pos - keep
        else:
            self.buf += data
        return True

    def batch(self, n: int) -> tuple[list[Record], BaseException | None, bool]:
        """Up to ``n`` records, each with its start offset; the damage that stopped reading
        (a ``DataLossError``) if any; and whether the stream ended. Until the next call, any
        of these records can be read again from its start (``rewind``)."""
        self.mark = self.offset
        records: list[Record] = []
        try:
            while len(records) < n:
                if self.line < len(self.lines) or self._plain_lines():
                    # The fast path: one split per line, no byte looked at twice in Python.
                    lines = self.lines[self.line : self.line + n - len(records)]
                    self.line += len(lines)
                    for line in lines:
                        records.append((self.base + self.pos, line.split(self.split_on), None))
                        self.pos += len(line) + 1
                    continue
                start = self.offset
                record = self.next()
                if record is None:
                    return records, None, True
                records.append((start, *record))
        except DataLossError as damage:
            return records, damage, True
        return records, None, False

    def next(self) -> tuple[list[bytes], tuple[int, str] | None] | None:
        """The next record's fields and its first quoting error (field index, message)."""
        end = self.buf.find(b"\n", self.pos)
        while end < 0:
            if not self._grow(drop=True):
                if self.pos >= len(self.buf):
                    return None
                end = len(self.buf)
                break
            end = self.buf.find(b"\n", self.pos)
        line = self.buf[self.pos : end]
        if not (self.quote and b'"' in line):
            cr = line.find(b"\r")
            if cr < 0 or (cr == len(line) - 1 and end < len(self.buf)):
                self.pos = end + 1
                return (line[:cr] if cr >= 0 else line).split(self.split_on), None
        return self._record()

    def _record(self) -> tuple[list[bytes], tuple[int, str] | None]:
        fields: list[bytes] = []
        error: tuple[int, str] | None = None
        at = self.pos
        while True:
            if at >= len(self.buf) and not self._grow():
                fields.append(b"")  # the stream ends just after a delimiter
                break
            read = self._quoted if self.quote and self.buf[at] == 0x22 else self._unquoted
            field, at, last, problem = read(at)
            if problem is not None and error is None:
                error = (len(fields), problem)
            fields.append(field)
            if last:
                break
        self.pos = at
        return fields, error

    def _line_end(self, at: int) -> int:
        """Past a '\\r' at ``at - 1``: also past a '\\n' right after it."""
        if (at < len(self.buf) or self._grow()) and self.buf[at] == 0x0A:
            return at + 1
        return at

    def _unquoted(self, start: int) -> tuple[bytes, int, bool, str | None]:
        problem = None
        at = start
        while True:
            stop = self.stops.search(self.buf, at)
            if stop is None:
                at = len(self.buf)
                if not self._grow():
                    return self.buf[start:], at, True, problem
                continue
            at = stop.start()
            char = self.buf[at]
            if char == self.delim:
                return self.buf[start:at], at + 1, False, problem
            if char == 0x0A:
                return self.buf[start:at], at + 1, True, problem
            if char == 0x0D:
                return self.buf[start:at], self._line_end(at + 1), True, problem
            problem = problem or "Unquoted fields cannot have quotes inside"
            at += 1

    def _quoted(self, start: int) -> tuple[bytes, int, bool, str | None]:
        problem = None
        at = start + 1
        while True:
            close = self.buf.find(b'"', at)
            if close < 0:
                at = len(self.buf)
                if not self._grow():
                    # tf.data gives this error in place of any noted before it in the field.
                    return (
                        b"",
                        at,
                        True,
                        "Reached end of file without closing quoted field in record",
                    )
                continue
            value = self.buf[start + 1 : close]
            if close + 1 >= len(self.buf) and not self._grow():
                return value.replace(b'""', b'"'), close + 1, True, problem
            after = self.buf[close + 1]
            if after == 0x22:
                at = close + 2
                continue
            if after == self.delim:
                return value.replace(b'""', b'"'), close + 2, False, problem
            if after in (0x0A, 0x0D):
                end = close + 2 if after == 0x0A else self._line_end(close + 2)
                return value.replace(b'""', b'"'), end, True, problem
            # As tf.data: note it, and read on to where the field ends.
            problem = problem or "Quote inside a string has to be escaped by another quote"
            at = close + 1
