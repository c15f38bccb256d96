"""Elements in feedline's own files, as data: a binary record codec (cache files), element
specs as JSON (cache files, saved datasets), the checks that an element has the nesting, leaf
types, dtypes and ranks its spec says, and what identifies the pipeline that wrote a file.

A file feedline reads may be damaged, crafted, or written by another pipeline. Decoding runs
no code (no pickle), takes no length, count, dtype or rank from the bytes without checking it
against the spec and the bytes at hand, and raises ``RecordError`` (the caller names the file
and the place) for anything the encoder could not have written.

Sizes are not checked against a spec, only ranks: feedline finds a function's output spec by
running it on the first elements, and that spec may fix a size later elements do not have.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import re
import struct
import types
import zlib
from typing import Any

import numpy as np

from feedline.ops.base import Op
from feedline.ops.in_memory import DatasetSpec
from feedline.structure import STRING_DTYPE, TensorSpec, flatten, is_namedtuple, same_structure


class RecordError(ValueError):
    """Bytes or JSON that feedline's encoders could not have written for the spec at hand."""


# numpy kinds whose values are plain bytes: booleans, integers, floats, complex, datetimes.
_DATA_KINDS = frozenset("biufcmM")


def _is_data_dtype(dtype: np.dtype) -> bool:
    """A dtype whose values are their bytes: no objects, records or sub-arrays."""
    return dtype.kind in _DATA_KINDS


def _kind(leaf: Any) -> str:
    if isinstance(leaf, np.ndarray | np.generic):
        return f"{type(leaf).__name__} of {leaf.dtype}"
    return type(leaf).__name__


# -- checks -----------------------------------------------------------------------------------


def _leaf_problem(leaf: Any, spec: TensorSpec) -> str | None:
    """Why ``leaf`` is not a value of ``spec`` (type, dtype, rank), or None."""
    if spec.dtype == STRING_DTYPE:
        if isinstance(leaf, bytes):
            rank = 0
        elif isinstance(leaf, np.ndarray) and leaf.dtype == STRING_DTYPE:
            if not all(isinstance(s, bytes) for s in leaf.flat):
                return "an array of objects other than bytes, where strings belong"
            rank = leaf.ndim
        else:
            return f"a {_kind(leaf)} where strings belong"
    elif isinstance(leaf, np.ndarray | np.generic) and leaf.dtype == spec.dtype:
        rank = leaf.ndim
    else:
        return f"a {_kind(leaf)} where {spec.dtype} belongs"
    if spec.shape is not None and rank != len(spec.shape):
        return f"a value of rank {rank} where the shape is {spec.shape}"
    return None


def leaves_of(element: Any, spec: Any, leaf_specs: list[Any]) -> list[Any]:
    """The leaves of ``element``, which must have the nesting of ``spec`` and leaves of
    ``leaf_specs`` (the leaves of ``spec``); a TypeError saying where it does not."""
    if not same_structure(spec, element):
        raise TypeError("its nesting is not the element spec's")
    leaves = flatten(element)
    for i, (leaf, leaf_spec) in enumerate(zip(leaves, leaf_specs)):
        problem = _leaf_problem(leaf, leaf_spec)
        if problem is not None:
            raise TypeError(f"leaf {i} is {problem}")
    return leaves


# -- binary records ---------------------------------------------------------------------------
#
# A record: u32 leaf count, then each leaf: a kind byte and its header, then its bytes.
#   array:   dtype (u8 length + ASCII ``dtype.str``), rank (u8), sizes (u64 each), zero padding
#            to a multiple of 16 in the record, raw bytes (C order)
#   scalar:  dtype, zero padding, raw bytes
#   bytes:   length (u64), the bytes
#   strings: rank, sizes, one u64 length per string, the strings one after another

_ARRAY, _SCALAR, _BYTES, _STRINGS = range(4)
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Array data starts at a multiple of this in the record, so a record read into a fresh
# (aligned) buffer gives aligned arrays.
_ALIGN = 16
_MAX_RANK = 64
# More values than any array holds (numpy's bound is 2**63 bytes; an item has up to 32).
_MAX_SIZE = 2**57


# Arrays and strings of at least this many bytes are written from their own memory; the
# smaller parts of a record are copied together, which costs less than writing each.
_BIG = 1 << 14


class _Record:
    """The buffers of one record, in order, and their total size."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.small = bytearray()
        self.size = 0

    def add(self, data: bytes | memoryview) -> None:
        """Add ``data`` (bytes, or a flat memoryview of bytes)."""
        if len(data) >= _BIG:
            if self.small:
                self.buffers.append(self.small)
                self.small = bytearray()
            self.buffers.append(data)
        else:
            self.small += data
        self.size += len(data)

    def pad(self) -> None:
        self.add(bytes(-self.size % _ALIGN))


def encode_leaves(leaves: list[Any]) -> tuple[list[Any], int]:
    """One record holding ``leaves``: buffers to write in order (large arrays are not
    copied) and their size. A TypeError for a leaf that is not data: check elements with
    :func:`leaves_of` first, for a message that says where."""
    record = _Record()
    record.add(_U32.pack(len(leaves)))
    for leaf in leaves:
        _encode_leaf(record, leaf)
    if record.small:
        record.buffers.append(record.small)
    return record.buffers, record.size


# A framed record (cache files, saved datasets): index u64, payload length u64, CRC32 u32 of
# the index, the length and the payload; then the payload.
FRAME = struct.Struct("<QQI")
_FRAME_HEAD = struct.Struct("<QQ")


def framed_record(index: int, leaves: list[Any]) -> list[Any]:
    """The buffers of record ``index`` holding ``leaves``, in order: its header, its payload."""
    buffers, size = encode_leaves(leaves)
    head = _FRAME_HEAD.pack(index, size)
    crc = zlib.crc32(head)
    for buffer in buffers:
        crc = zlib.crc32(buffer, crc)
    return [head + _U32.pack(crc), *buffers]


def frame_intact(header: bytes, payload: Any) -> bool:
    """Whether a record's ``payload`` (bytes-like) passes the CRC in its ``header``."""
    _, _, crc = FRAME.unpack(header)
    return zlib.crc32(payload, zlib.crc32(header[: _FRAME_HEAD.size])) == crc


def _sizes(shape: tuple[int, ...]) -> bytes:
    return _U8.pack(len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)


def _encode_leaf(record: _Record, leaf: Any) -> None:
    if isinstance(leaf, bytes):
        record.add(_U8.pack(_BYTES) + _U64.pack(len(leaf)))
        record.add(leaf)
    elif isinstance(leaf, np.ndarray) and leaf.dtype == STRING_DTYPE:
        strings = leaf.reshape(-1).tolist()
        if not all(isinstance(s, bytes) for s in strings):
            raise TypeError("an array of objects other than bytes cannot be stored")
        record.add(_U8.pack(_STRINGS) + _sizes(leaf.shape))
        record.add(np.fromiter(map(len, strings), dtype="<u8", count=len(strings)).tobytes())
        record.add(b"".join(strings))
    elif isinstance(leaf, np.ndarray | np.generic) and _is_data_dtype(leaf.dtype):
        code = leaf.dtype.str.encode("ascii")
        if isinstance(leaf, np.generic):
            record.add(_U8.pack(_SCALAR) + _U8.pack(len(code)) + code)
            record.pad()
            record.add(leaf.tobytes())
        else:
            record.add(_U8.pack(_ARRAY) + _U8.pack(len(code)) + code + _sizes(leaf.shape))
            record.pad()
            record.add(np.ascontiguousarray(leaf).reshape(-1).view(np.uint8).data)
    else:
        raise TypeError(
            f"a {_kind(leaf)} cannot be stored: leaves must be numpy arrays or scalars of "
            "numbers, booleans or datetimes, bytes, or arrays of bytes"
        )


class _Cursor:
    """Reads a record front to back; every read is checked against the bytes left."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.view = buffer.data
        self.pos = 0

    def _need(self, n: int) -> int:
        """The position of the next ``n`` bytes, which are then passed."""
        pos, left = self.pos, len(self.buffer) - self.pos
        if n > left:
            raise RecordError(f"a leaf needs {n} bytes at byte {pos}, {left} are left")
        self.pos += n
        return pos

    def number(self, fmt: struct.Struct) -> int:
        value: int = fmt.unpack_from(self.view, self._need(fmt.size))[0]
        return value

    def raw(self, n: int) -> bytes:
        pos = self._need(n)
        return self.view[pos : pos + n].tobytes()

    def array(self, n: int, dtype: np.dtype) -> np.ndarray:
        """The next ``n`` bytes as a flat array of ``dtype``: a view of the record."""
        pos = self._need(n)
        return self.buffer[pos : pos + n].view(dtype)

    def shape(self) -> tuple[int, ...]:
        rank = self.number(_U8)
        if rank > _MAX_RANK:
            raise RecordError(f"rank {rank} at byte {self.pos - 1}")
        shape: tuple[int, ...] = struct.unpack_from(f"<{rank}Q", self.view, self._need(8 * rank))
        # An empty array's other sizes are not bounded by the bytes at hand: by numpy's.
        if math.prod(d for d in shape if d) >= _MAX_SIZE:
            raise RecordError(f"shape {shape} at byte {self.pos - 8 * rank}: no array has it")
        return shape

    def align(self) -> None:
        missing = -self.pos % _ALIGN
        if self.raw(missing) != bytes(missing):
            raise RecordError(f"padding before byte {self.pos} is not zero")


def decode_leaves(buffer: np.ndarray, specs: list[TensorSpec]) -> list[Any]:
    """The leaves of one record (a uint8 array), one per spec of ``specs`` and checked
    against it. Arrays are views of ``buffer``."""
    cursor = _Cursor(buffer)
    count = cursor.number(_U32)
    if count != len(specs):
        raise RecordError(f"it has {count} leaves, the element spec {len(specs)}")
    leaves = []
    for i, spec in enumerate(specs):
        try:
            leaves.append(_decode_leaf(cursor, spec))
        except RecordError as e:
            raise RecordError(f"leaf {i}: {e}") from None
    if cursor.pos != len(buffer):
        raise RecordError(f"{len(buffer) - cursor.pos} bytes follow the last leaf")
    return leaves


def _decode_leaf(cursor: _Cursor, spec: TensorSpec) -> Any:
    kind = cursor.number(_U8)
    strings = spec.dtype == STRING_DTYPE
    value: Any
    shape: tuple[int, ...]
    if strings and kind == _BYTES:
        value, shape = cursor.raw(cursor.number(_U64)), ()
    elif strings and kind == _STRINGS:
        shape = cursor.shape()
        lengths = cursor.array(8 * math.prod(shape), np.dtype("<u8")).tolist()
        data = cursor.raw(sum(lengths))
        value = np.empty(len(lengths), dtype=STRING_DTYPE)
        start = 0
        for j, length in enumerate(lengths):
            value[j] = data[start : start + length]
            start += length
        value = value.reshape(shape)
    elif not strings and kind in (_ARRAY, _SCALAR):
        if cursor.raw(cursor.number(_U8)) != spec.dtype.str.encode("ascii"):
            raise RecordError(f"a dtype other than {spec.dtype}")
        shape = () if kind == _SCALAR else cursor.shape()
        cursor.align()
        flat = cursor.array(math.prod(shape) * spec.dtype.itemsize, spec.dtype)
        value = flat[0] if kind == _SCALAR else flat.reshape(shape)
    else:
        raise RecordError(f"kind {kind} where a value of {spec} belongs")
    if spec.shape is not None and len(shape) != len(spec.shape):
        raise RecordError(f"a value of rank {len(shape)} where the shape is {spec.shape}")
    return value


# -- element specs as JSON --------------------------------------------------------------------


def spec_to_json(spec: Any, what: str) -> Any:
    """``spec`` as JSON; a TypeError naming ``what`` if its elements cannot be stored."""
    if isinstance(spec, TensorSpec):
        if spec.dtype != STRING_DTYPE and not _is_data_dtype(spec.dtype):
            raise _refusal(spec, what)
        dtype = "string" if spec.dtype == STRING_DTYPE else spec.dtype.str
        return {"shape": None if spec.shape is None else list(spec.shape), "dtype": dtype}
    if is_namedtuple(spec):
        fields = list(type(spec)._fields)
        items = [spec_to_json(part, what) for part in spec]
        return {"namedtuple": type(spec).__name__, "fields": fields, "items": items}
    if isinstance(spec, tuple):
        return {"tuple": [spec_to_json(part, what) for part in spec]}
    if isinstance(spec, dict):
        return {"dict": [[key, spec_to_json(value, what)] for key, value in spec.items()]}
    raise _refusal(spec, what)


def _refusal(spec: Any, what: str) -> TypeError:
    if isinstance(spec, DatasetSpec):
        return TypeError(f"{what} cannot store elements that are datasets (from window)")
    return TypeError(f"{what} cannot store elements of spec {spec!r}")


# A dtype as ``dtype.str`` writes it: byte order, kind, size, and a datetime's unit.
_DTYPE_TEXT = re.compile(r"[<>|][a-zA-Z][0-9]{1,2}(\[[0-9]*[a-zA-Z]+\])?")
# Deeper nests than any real element spec: refused before they exhaust the stack.
_MAX_DEPTH = 64


def spec_from_json(encoded: Any, depth: int = 0) -> Any:
    """Inverse of :func:`spec_to_json`, for JSON read from a file; a RecordError for anything
    it could not have written. A namedtuple is made anew from its saved names (the writing
    program's class may not exist here)."""
    if depth > _MAX_DEPTH:
        raise RecordError(f"the element spec nests deeper than {_MAX_DEPTH} levels")
    keys = set(encoded) if isinstance(encoded, dict) else set()
    if keys == {"shape", "dtype"}:
        return TensorSpec(_shape_from_json(encoded["shape"]), _dtype_from_json(encoded["dtype"]))
    if keys == {"namedtuple", "fields", "items"}:
        name, fields, items = encoded["namedtuple"], encoded["fields"], _list(encoded["items"])
        if (
            not isinstance(name, str)
            or not isinstance(fields, list)
            or not all(isinstance(f, str) for f in fields)
            or len(fields) != len(items)
        ):
            raise RecordError(f"a bad namedtuple in the element spec: {_short(encoded)}")
        try:
            cls = collections.namedtuple(name, fields)  # type: ignore[misc]
        except ValueError as e:  # names that are not identifiers, repeated fields
            raise RecordError(f"a bad namedtuple in the element spec: {e}") from None
        return cls(*(spec_from_json(part, depth + 1) for part in items))
    if keys == {"tuple"}:
        return tuple(spec_from_json(part, depth + 1) for part in _list(encoded["tuple"]))
    if keys == {"dict"}:
        pairs = _list(encoded["dict"])
        if not all(
            isinstance(p, list) and len(p) == 2 and type(p[0]) in (str, int) for p in pairs
        ) or len({p[0] for p in pairs}) != len(pairs):
            raise RecordError(f"a bad dict in the element spec: {_short(encoded)}")
        return {key: spec_from_json(value, depth + 1) for key, value in pairs}
    raise RecordError(f"not an element spec: {_short(encoded)}")


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise RecordError(f"a list belongs in the element spec where {_short(value)} is")
    return value


def _shape_from_json(value: Any) -> tuple[int | None, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > _MAX_RANK
        or not all(d is None or (type(d) is int and d >= 0) for d in value)
    ):
        raise RecordError(f"not a shape: {_short(value)}")
    return tuple(value)


def _dtype_from_json(value: Any) -> np.dtype:
    if value == "string":
        return STRING_DTYPE
    if isinstance(value, str) and _DTYPE_TEXT.fullmatch(value):
        try:
            dtype = np.dtype(value)
        except TypeError:
            dtype = None
        if dtype is not None and _is_data_dtype(dtype) and dtype.str == value:
            return dtype
    raise RecordError(f"not a dtype feedline stores: {_short(value)}")


def spec_outline(encoded: Any) -> Any:
    """A JSON spec with each shape reduced to its rank: what two specs of one pipeline share
    even where one was found on other elements (see the module's note on sizes)."""
    if isinstance(encoded, dict):
        return {
            key: (None if value is None else len(value)) if key == "shape" else spec_outline(value)
            for key, value in encoded.items()
        }
    if isinstance(encoded, list):
        return [spec_outline(value) for value in encoded]
    return encoded


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the pipeline that wrote a file -----------------------------------------------------------


def pipeline_identity(op: Op) -> dict[str, Any]:
    """What identifies the pipeline ending in ``op`` to a file it wrote: the names of its ops,
    a digest of their functions' code (not of the values that code reads), its cardinality."""
    ops = _upstream(op)
    return {
        "pipeline": [o.name for o in ops],
        "code": _code_digest(ops),
        "cardinality": op.cardinality(),
    }


def _upstream(op: Op) -> list[Op]:
    """``op`` and every op it reads, each once, depth first in input order."""
    seen: set[int] = set()
    order: list[Op] = []
    stack = [op]
    while stack:
        current = stack.pop()
        if id(current) not in seen:
            seen.add(id(current))
            order.append(current)
            stack.extend(reversed(current.inputs))
    return order


def _code_digest(ops: list[Op]) -> str:
    """A digest of the code of the functions the ops hold (their bytecode and constants, not
    where they are in a file, so that editing other code does not invalidate a cache)."""
    digest = hashlib.sha256()
    for op in ops:
        for field, value in sorted(vars(op).items()):
            code = _code_of(value)
            if code is not None:
                digest.update(field.encode("utf-8"))
                _feed_code(digest, code)
    return digest.hexdigest()


def _code_of(value: Any) -> types.CodeType | None:
    if isinstance(value, Op | type) or not callable(value):
        return None
    while isinstance(value, functools.partial):
        value = value.func
    value = getattr(value, "__func__", value)  # a bound method's function
    code = getattr(value, "__code__", None)
    if code is None:  # a callable object: its class's __call__
        code = getattr(type(value).__call__, "__code__", None)
    return code if isinstance(code, types.CodeType) else None


def _feed_code(digest: Any, code: types.CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode("utf-8"))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(digest, const)
        elif isinstance(const, frozenset):  # its order changes with the process's hash seed
            digest.update(repr(sorted(map(repr, const))).encode("utf-8"))
        else:
            digest.update(repr(const).encode("utf-8"))
