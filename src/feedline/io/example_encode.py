"""``tf.train.Example`` encoding: ``encode_example``, what
``tf.train.Example(...).SerializeToString()`` writes, on numpy and Python values. The wire
format is in ``example.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from feedline.io.example_fast import put_varint


def as_bytes(value: Any) -> bytes:
    """A string value as bytes (``str`` as UTF-8), as TensorFlow takes it."""
    if isinstance(value, str | np.str_):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a string feature's value must be bytes or str, not {type(value).__name__}")


def _length_delimited(tag: int, payload: bytes | bytearray, out: bytearray) -> None:
    out.append(tag)
    put_varint(len(payload), out)
    out += payload


_TEXT = (bytes, str, np.bytes_, np.str_)
_INTS = (bool, int, np.integer, np.bool_)
_NUMBERS = (*_INTS, float, np.floating)


def _feature_bytes(name: str, value: Any) -> bytes:
    """A Feature message for a value: ints (and bools) -> int64_list, floats -> float_list,
    bytes and str -> bytes_list; a scalar, a list, or an array (flattened). A Python list's
    items decide its kind (numpy would turn ``[1, b"x"]`` into strings): mixed kinds are
    refused, and an empty list is an empty int64_list."""
    if isinstance(value, np.ndarray | np.generic):
        items = value.ravel().tolist() if value.dtype.kind in "OSU" else None
        array = np.asarray(value)
    else:
        items = list(value) if isinstance(value, list | tuple) else [value]
        array = None
    if items is not None:
        if items and all(isinstance(v, _TEXT) for v in items):
            body = bytearray()
            for v in items:
                _length_delimited(0x0A, as_bytes(v), body)
            return bytes(_wrap(0x0A, body))
        if all(isinstance(v, _INTS) for v in items):
            array = np.asarray(items, dtype=np.int64)
        elif all(isinstance(v, _NUMBERS) for v in items):
            array = np.asarray(items, dtype=np.float32)
        elif all(isinstance(v, list | tuple | np.ndarray) for v in items):
            array = np.asarray(items)  # nested lists: a numeric array's rows
        else:
            kinds = sorted({type(v).__name__ for v in items})
            raise TypeError(f"feature {name!r}: mixed values ({', '.join(kinds)})")
    assert array is not None
    if array.dtype.kind in "biu":
        body = bytearray()
        for v in array.ravel().tolist():
            put_varint(int(v), body)
        return bytes(_wrap(0x1A, _packed(body)))
    if array.dtype.kind == "f":
        return bytes(_wrap(0x12, _packed(array.astype("<f4").tobytes())))
    raise TypeError(f"feature {name!r}: cannot encode {array.dtype} values in an Example")


def _packed(run: bytes | bytearray) -> bytearray:
    out = bytearray()
    if run:  # an empty repeated field is left out, as protobuf writes it
        _length_delimited(0x0A, run, out)
    return out


def _wrap(tag: int, payload: bytes | bytearray) -> bytearray:
    out = bytearray()
    _length_delimited(tag, payload, out)
    return out


def encode_example(features: Mapping[str, Any]) -> bytes:
    """A serialized tf.train.Example of name -> value (``Example(features=Features(feature=
    {...})).SerializeToString()``): ints (and bools) -> int64_list, floats -> float_list
    (as float32), bytes and str -> bytes_list; scalars, lists and arrays (flattened)."""
    body = bytearray()
    for name, value in features.items():
        entry = bytearray()
        _length_delimited(0x0A, str(name).encode("utf-8"), entry)
        _length_delimited(0x12, _feature_bytes(str(name), value), entry)
        _length_delimited(0x0A, entry, body)
    return bytes(_wrap(0x0A, body))
