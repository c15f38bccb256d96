"""``tf.train.Example``: parsing (``tf.io.parse_single_example`` / ``parse_example``) and
encoding, on numpy values, with no protobuf runtime.

The wire format is decoded by hand: an Example is a map of feature name -> one of three
lists. A batch of 64 or more is walked all at once in numpy (``example_fast.py``); smaller
ones Example by Example in Python, each feature's values then converted in one numpy call per
batch. Measured (``python -m benchmarks.formats_tfrecord``, 10 features, 2 cores shared with
other work, two runs): batches of 256, 264-272k Examples/s against 230-274k for tf.data's
``map(tf.io.parse_example)`` and 80k for the ``protobuf`` package (upb) building Python
objects per value; batches of 32, 86-90k against 87-94k and 76-80k. So no protobuf
dependency for ``feedline[tfrecord]``.

Schema (``tensorflow/core/example/{example,feature}.proto``), every field number 1 unless
said: Example.features -> Features.feature (map entries: key 1, value 2) -> Feature, a oneof
of bytes_list 1, float_list 2, int64_list 3, each with repeated ``value`` (floats as fixed32,
ints as varints; packed or not).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from feedline.errors import DataLossError
from feedline.io.example_encode import as_bytes

# Encoding lives in example_encode.py; its public name stays here, where fl.io finds it.
from feedline.io.example_encode import encode_example as encode_example
from feedline.io.example_fast import Irregular, decode_varints, parse_batch, split_rows

_KINDS = {"string": 1, "float32": 2, "int64": 3}  # dtype -> Feature's field number
_TF_NAMES = {1: "string", 2: "float", 3: "int64"}  # as TensorFlow's messages name them
_OUT_DTYPES = {1: np.dtype(object), 2: np.dtype(np.float32), 3: np.dtype(np.int64)}
_LOW_BYTES = bytes(range(128))  # deleting these from a varint run leaves its continuations
_LEN = 2  # wire type of length-delimited fields
_NOTHING: tuple[int, list[bytes]] = (0, [])  # a feature missing from an Example
# From this many Examples on, a batch is walked all at once (example_fast.py); below, its
# fixed cost in numpy calls (~0.4 ms) is more than walking them one by one (~5 us each with
# 10 features; measured: the two cost the same at 64).
_BATCH_PATH = 64


def _kind(dtype: Any) -> int:
    """The Feature list a dtype reads: "int64", "float32", "string" or their numpy dtypes."""
    if isinstance(dtype, str) and dtype in _KINDS:
        return _KINDS[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is not None:
        if dt == np.int64:
            return 3
        if dt == np.float32:
            return 2
        if dt.kind in "OSU":
            return 1
    raise TypeError(f"an Example feature's dtype is int64, float32 or string, not {dtype!r}")


class FixedLenFeature(NamedTuple):
    """tf.io.FixedLenFeature: exactly ``prod(shape)`` values, or ``default_value`` (reshaped to
    ``shape``) when the feature is missing; without a default a missing feature is an error."""

    shape: Sequence[int]
    dtype: Any
    default_value: Any = None


class VarLenFeature(NamedTuple):
    """tf.io.VarLenFeature: any number of values. tf.data gives a SparseTensor; here a 1-D
    array per example (``parse_example``: a list of them)."""

    dtype: Any


# -- decoding -------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos + 1
        shift += 7
        if shift > 63:
            raise DataLossError("a varint longer than 10 bytes")


def _skip(buf: bytes, pos: int, tag: int) -> int:
    """Past the value of a field this parser does not read."""
    wire = tag & 7
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == _LEN:
        length, pos = _varint(buf, pos)
        return pos + length
    if wire == 5:
        return pos + 4
    raise DataLossError(f"wire type {wire}")


def _fields(buf: bytes, start: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(tag, start, end) of each length-delimited field in buf[start:end] (others skipped)."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        if tag & 7 != _LEN:
            after = _skip(buf, pos, tag)
            yield tag, pos, after
            pos = after
            continue
        length, pos = _varint(buf, pos)
        yield tag, pos, pos + length
        pos += length
    if pos != end:
        raise DataLossError("a field runs past its message")


def _wanted_features(buf: bytes, wanted: Mapping[bytes, int]) -> dict[int, tuple[int, int]]:
    """Where each wanted feature's Feature message is: index -> (start, end)."""
    found: dict[int, tuple[int, int]] = {}
    for tag, start, end in _fields(buf, 0, len(buf)):
        if tag != 0x0A:  # Example.features
            continue
        for entry_tag, entry_start, entry_end in _fields(buf, start, end):
            if entry_tag != 0x0A:  # Features.feature
                continue
            key, value = b"", (entry_end, entry_end)
            for field, s, e in _fields(buf, entry_start, entry_end):
                if field == 0x0A:
                    key = buf[s:e]
                elif field == 0x12:
                    value = (s, e)
            index = wanted.get(key)
            if index is not None:  # a map: the last entry of a key wins
                found[index] = value
    return found


def _canonical_features(
    buf: bytes, wanted: Mapping[bytes, int]
) -> dict[int, tuple[int, list[bytes]]] | None:
    """The wanted features' kinds and values, for an Example laid out as protobuf writers
    lay it out (one Features, each entry key then value, a Feature with one list, numbers
    packed in one run); None for any other layout, which the general walk then reads.

    The general walk's results, in fewer Python steps: this is the per-example cost.
    """
    n = len(buf)
    if not n:
        return {}
    if buf[0] != 0x0A:
        return None
    length, pos = _varint(buf, 1)
    if pos + length != n:
        return None
    found: dict[int, tuple[int, list[bytes]]] = {}
    # Lengths below 128 (one byte) are read in line: a call per varint was most of the time.
    while pos < n:
        if buf[pos] != 0x0A:
            return None
        length = buf[pos + 1]
        if length < 0x80:
            pos += 2
        else:
            length, pos = _varint(buf, pos + 1)
        entry_end = pos + length
        if buf[pos] != 0x0A or buf[pos + 1] >= 0x80:
            return None
        key_end = pos + 2 + buf[pos + 1]
        index = wanted.get(buf[pos + 2 : key_end])
        pos = entry_end
        if index is None:
            continue
        if key_end == entry_end:
            found[index] = _NOTHING
            continue
        if buf[key_end] != 0x12:
            return None
        length = buf[key_end + 1]
        if length < 0x80:
            start = key_end + 2
        else:
            length, start = _varint(buf, key_end + 1)
        if start + length != entry_end:
            return None
        if start == entry_end:
            found[index] = _NOTHING
            continue
        tag = buf[start]
        kind = tag >> 3
        if tag & 7 != _LEN or not 1 <= kind <= 3:
            return None
        length = buf[start + 1]
        if length < 0x80:
            start += 2
        else:
            length, start = _varint(buf, start + 1)
        if start + length != entry_end:
            return None
        values = []
        while start < entry_end:
            if buf[start] != 0x0A:
                return None
            length = buf[start + 1]
            if length < 0x80:
                start += 2
            else:
                length, start = _varint(buf, start + 1)
            values.append(buf[start : start + length])
            start += length
        if start != entry_end or (kind != 1 and len(values) > 1):
            return None
        found[index] = (kind, values)
    return found


def _feature_values(buf: bytes, start: int, end: int) -> tuple[int, list[bytes]]:
    """A Feature's kind (0: none set) and its values: for bytes_list the values, for the
    numeric lists their raw encodings (fixed32 floats, varints) in pieces to join."""
    kind, values = 0, list[bytes]()
    for tag, s, e in _fields(buf, start, end):
        if tag not in (0x0A, 0x12, 0x1A):
            continue
        if tag >> 3 != kind:  # a oneof: the last one set wins
            kind, values = tag >> 3, []
        pos = s
        while pos < e:
            inner, pos = _varint(buf, pos)
            if inner == 0x0A:  # a value (bytes), or a packed run of values
                length, pos = _varint(buf, pos)
                values.append(buf[pos : pos + length])
                pos += length
            elif inner == 0x0D and kind == 2:  # one unpacked float
                values.append(buf[pos : pos + 4])
                pos += 4
            elif inner == 0x08 and kind == 3:  # one unpacked int
                after = _varint(buf, pos)[1]
                values.append(buf[pos:after])
                pos = after
            else:
                pos = _skip(buf, pos, inner)
        if pos != e:
            raise DataLossError("a feature list runs past its message")
    return kind, values


def _count(kind: int, raw: list[bytes]) -> int:
    """How many numbers a numeric list's raw pieces hold."""
    data = raw[0] if len(raw) == 1 else b"".join(raw)
    if kind == 2:
        if len(data) % 4:
            raise DataLossError("a float list whose length is not a multiple of 4")
        return len(data) // 4
    # A run (or value) must end its last varint: one cut short would read on into the next
    # run, or the next Example's, and make wrong numbers of them.
    if data[-1:] >= b"\x80" if len(raw) == 1 else any(p[-1:] >= b"\x80" for p in raw):
        raise DataLossError("a truncated varint")
    return len(data) - len(data.translate(None, _LOW_BYTES))


def _decode(kind: int, pieces: list[bytes]) -> np.ndarray:
    """The values of the raw pieces (bytes values for kind 1), as one 1-D array."""
    if kind == 1:
        out = np.empty(len(pieces), dtype=object)
        out[:] = pieces
        return out
    raw = bytearray().join(pieces)  # writable: the arrays given out are the user's
    if kind == 2:
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    try:
        return decode_varints(np.frombuffer(raw, dtype=np.uint8))
    except ValueError as error:
        raise DataLossError(str(error)) from None


class _Column:
    """One wanted feature across a batch: the pieces found, decoded together at the end."""

    def __init__(self, name: str, feature: FixedLenFeature | VarLenFeature) -> None:
        self.name = name
        self.kind = _kind(feature.dtype)
        self.fixed = isinstance(feature, FixedLenFeature)
        self.shape: tuple[int, ...] = ()
        self.default: np.ndarray | None = None
        if isinstance(feature, FixedLenFeature):
            self.shape = tuple(int(d) for d in feature.shape)
            if any(d < 0 for d in self.shape):
                raise ValueError(f"{name}: a FixedLenFeature's shape must be fully defined")
            if feature.default_value is not None:
                default = feature.default_value
                if self.kind == 1:
                    default = np.vectorize(as_bytes, otypes=[object])(np.asarray(default))
                self.default = np.asarray(default, dtype=_OUT_DTYPES[self.kind]).reshape(self.shape)
        self.size = math.prod(self.shape)
        self.pieces: list[bytes] = []
        self.counts: list[int] = []
        self.missing: list[int] = []

    def add(self, row: int, kind: int, values: list[bytes]) -> None:
        if kind == self.kind:  # the common case first: this is per row and per feature
            count = len(values) if kind == 1 else _count(kind, values)
            if not self.fixed:
                self.counts.append(count)
            elif count != self.size:
                raise ValueError(
                    f"Key: {self.name}.  Number of {_TF_NAMES[kind]} values != expected.  "
                    f"Values size: {count} but output shape: {list(self.shape)}"
                )
            self.pieces += values
            return
        if kind == 0:  # a Feature with no list set reads as missing, as TensorFlow's does
            if not self.fixed:
                self.counts.append(0)
                return
            if self.default is None:
                raise ValueError(
                    f"Feature: {self.name} (data type: {_TF_NAMES[self.kind]}) is required "
                    "but could not be found."
                )
            self.missing.append(row)
            return
        raise ValueError(
            f"Key: {self.name}.  Data types don't match. Data type: {_TF_NAMES[kind]} "
            f"but expected type: {_TF_NAMES[self.kind]}"
        )

    def values(self, rows: int) -> int:
        """How many values the column holds."""
        return (rows - len(self.missing)) * self.size if self.fixed else sum(self.counts)

    def result(self, rows: int, values: np.ndarray) -> Any:
        """The column's output from its decoded ``values``."""
        if not self.fixed:
            return split_rows(values, np.array(self.counts, dtype=np.int64))
        if not self.missing:
            return values.reshape((rows, *self.shape))
        out = np.empty((rows, *self.shape), dtype=_OUT_DTYPES[self.kind])
        present = np.ones(rows, dtype=bool)
        present[self.missing] = False
        out[present] = values.reshape((-1, *self.shape))
        out[~present] = self.default
        return out


def _check_features(features: Any) -> dict[str, FixedLenFeature | VarLenFeature]:
    if not isinstance(features, Mapping):
        raise TypeError(f"features must be a dict of name -> feature, got {type(features)}")
    for name, feature in features.items():
        if not isinstance(feature, FixedLenFeature | VarLenFeature):
            raise TypeError(
                f"feature {name!r} must be a FixedLenFeature or VarLenFeature, got {feature!r}"
            )
    return dict(features)


def parse_example(serialized: Any, features: Mapping[str, Any]) -> dict[str, Any]:
    """tf.io.parse_example: a batch of serialized Examples -> name -> values of the batch.

    A FixedLenFeature: an array ``[batch, *shape]`` (int64, float32, or object of bytes); a
    VarLenFeature: a list of 1-D arrays, one per example (tf.data: a SparseTensor).
    Schema mismatches are ``ValueError`` with TensorFlow's messages; bytes that are not an
    Example are ``DataLossError``.
    """
    checked = _check_features(features)
    columns = [_Column(name, feature) for name, feature in checked.items()]
    wanted = {name.encode("utf-8"): i for i, name in enumerate(checked)}
    items = (
        [serialized]
        if isinstance(serialized, bytes)
        else serialized.tolist()
        if isinstance(serialized, np.ndarray)
        else list(serialized)
    )
    # A batch of bytes (the common case: records) is used as it is.
    batch = items if set(map(type, items)) <= {bytes} else [as_bytes(b) for b in items]
    if len(batch) >= _BATCH_PATH:
        try:
            return parse_batch(batch, columns)
        except Irregular:
            pass  # Example by Example below: any layout, and errors named as tf names them
    for row, buf in enumerate(batch):
        try:
            found = _canonical_features(buf, wanted)
            if found is None:
                spans = _wanted_features(buf, wanted)
                found = {i: _feature_values(buf, *span) for i, span in spans.items()}
            for i, column in enumerate(columns):
                kind, values = found.get(i, _NOTHING)
                column.add(row, kind, values)
        except (IndexError, DataLossError) as error:
            raise DataLossError(
                f"could not parse Example {row} of the batch ({len(buf)} bytes): "
                f"{error or 'truncated'}"
            ) from None
    return _results(columns, len(batch))


def _results(columns: list[_Column], rows: int) -> dict[str, Any]:
    """Every column's output, the values of all the columns of a kind decoded together: a
    small batch spends numpy's cost per call (~1 us), not its bytes (every run ends its
    varints, so none runs on into the next column's)."""
    decoded: dict[int, np.ndarray] = {}
    for kind in (1, 2, 3):
        same = [i for i, column in enumerate(columns) if column.kind == kind]
        if not same:
            continue
        values = _decode(kind, [p for i in same for p in columns[i].pieces])
        bounds = np.cumsum([0] + [columns[i].values(rows) for i in same]).tolist()
        decoded.update((i, values[a:b]) for i, a, b in zip(same, bounds, bounds[1:]))
    return {column.name: column.result(rows, decoded[i]) for i, column in enumerate(columns)}


def parse_single_example(serialized: Any, features: Mapping[str, Any]) -> dict[str, Any]:
    """tf.io.parse_single_example: one serialized Example -> name -> numpy values.

    A FixedLenFeature: an array of its shape, or for shape ``[]`` a scalar as tf's
    ``.numpy()`` gives (``np.int64``, ``np.float32`` or ``bytes``); a VarLenFeature: a 1-D
    array of this example's values (tf.data: a SparseTensor).
    """
    batch = parse_example([serialized], features)
    out = {}
    for name, values in batch.items():
        value = values[0]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]
        out[name] = value
    return out
