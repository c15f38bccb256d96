"""Nested element structures: flattening, packing, normalising leaves, and shape/dtype specs.

An element is a leaf or a nest of tuples, dicts and namedtuples of leaves, as in tf.data.
Lists are *leaves* (they become arrays), again as in tf.data, except when a user function
returns a list, which tf.data (and so feedline) treats as a tuple.

Leaves are normalised the way tf.data converts Python values to tensors so that code ports
unchanged and outputs compare equal element by element: Python ``int`` becomes ``int32`` (or
``int64`` when it does not fit), ``float`` becomes ``float32``, ``bool`` becomes ``bool``, ``str``
becomes UTF-8 ``bytes``. numpy arrays and scalars keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
STRING_DTYPE = np.dtype(object)


def sole_type(values: list[Any]) -> type | None:
    """The type every one of ``values`` has, or None if they differ (or there are none).

    The hot paths ask this of every chunk; counting a list of types costs about two thirds of
    building a set of them, since ``count`` compares by identity first."""
    if not values:
        return None
    types = list(map(type, values))
    first = types[0]
    return first if types.count(first) == len(types) else None


def is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def is_nest(x: Any) -> bool:
    return isinstance(x, tuple | dict)


def flatten(x: Any) -> list[Any]:
    """Leaves of ``x`` in a fixed order (dict keys sorted, as tf.nest does)."""
    if isinstance(x, tuple):
        out: list[Any] = []
        for part in x:
            out.extend(flatten(part))
        return out
    if isinstance(x, dict):
        out = []
        for key in sorted(x):
            out.extend(flatten(x[key]))
        return out
    return [x]


def pack_like(template: Any, leaves: list[Any]) -> Any:
    """Inverse of :func:`flatten`: rebuild ``template``'s nesting from ``leaves``."""
    it = iter(leaves)
    try:
        result = _pack(template, it)
    except StopIteration:
        # Never let StopIteration escape: inside an iterator it would end the pass silently.
        raise ValueError(f"too few leaves ({len(leaves)}) to pack {template!r}") from None
    if next(it, _NO_LEAF) is not _NO_LEAF:
        raise ValueError(f"too many leaves ({len(leaves)}) to pack {template!r}")
    return result


_NO_LEAF = object()


def _pack(template: Any, it: Any) -> Any:
    if isinstance(template, tuple):
        parts = [_pack(p, it) for p in template]
        return type(template)(*parts) if is_namedtuple(template) else tuple(parts)
    if isinstance(template, dict):
        # Leaves come in sorted-key order (as tf.nest flattens); the dict keeps the
        # template's own key order, as tf.data's elements do.
        packed = {k: _pack(template[k], it) for k in sorted(template)}
        return {k: packed[k] for k in template}
    return next(it)


def map_structure(fn: Callable[..., Any], *structures: Any) -> Any:
    """Apply ``fn`` leaf-wise over structures of the same nesting."""
    first = structures[0]
    if isinstance(first, tuple):
        _check_same_arity(structures, len(first))
        parts = [map_structure(fn, *(s[i] for s in structures)) for i in range(len(first))]
        return type(first)(*parts) if is_namedtuple(first) else tuple(parts)
    if isinstance(first, dict):
        keys = sorted(first)
        for s in structures[1:]:
            if not isinstance(s, dict) or sorted(s) != keys:
                raise ValueError(f"structures differ: dict keys {keys} vs {s!r}")
        mapped = {k: map_structure(fn, *(s[k] for s in structures)) for k in keys}
        return {k: mapped[k] for k in first}
    for s in structures[1:]:
        if is_nest(s):
            raise ValueError(f"structures differ: leaf {first!r} vs nest {s!r}")
    return fn(*structures)


def _check_same_arity(structures: tuple[Any, ...], n: int) -> None:
    for s in structures[1:]:
        if not isinstance(s, tuple) or len(s) != n:
            raise ValueError(f"structures differ: tuple of {n} vs {s!r}")


def same_nesting(a: Any, b: Any) -> bool:
    try:
        map_structure(lambda *_: None, a, b)
    except ValueError:
        return False
    return True


def same_structure(a: Any, b: Any) -> bool:
    """Same nesting with the same node types (a namedtuple is not a plain tuple) and dict keys;
    leaves are not compared. Stricter than :func:`same_nesting`, as batching needs."""
    if isinstance(a, tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(same_structure(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_structure(a[k], b[k]) for k in a)
        )
    return not is_nest(b)


# -- leaves ---------------------------------------------------------------------------------------

_PASS_THROUGH = (np.ndarray, np.generic, bytes)


def normalize_leaf(x: Any) -> Any:
    """Convert one Python value the way tf.data would convert it to a tensor."""
    if isinstance(x, _PASS_THROUGH):
        return _strings_as_bytes(x)
    if isinstance(x, bool):
        return np.bool_(x)
    if isinstance(x, int):
        return np.int32(x) if _INT32_MIN <= x <= _INT32_MAX else np.int64(x)
    if isinstance(x, float):
        return np.float32(x)
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, list):
        return to_array(x)
    if type(x).__module__ == "torch":  # a torch.Tensor: as numpy, bfloat16 included
        from feedline.torch import tensor_to_numpy

        return tensor_to_numpy(x)
    return x


def normalize(x: Any) -> Any:
    """Normalise every leaf of ``x``; a list returned at the top of a nest counts as a tuple."""
    if isinstance(x, _PASS_THROUGH):
        return _strings_as_bytes(x)
    if isinstance(x, tuple):
        parts = [normalize(p) for p in x]
        return type(x)(*parts) if is_namedtuple(x) else tuple(parts)
    if isinstance(x, dict):
        return {k: normalize(v) for k, v in x.items()}
    return normalize_leaf(x)


def normalize_output(x: Any) -> Any:
    """Normalise what a user function returned (tf.data reads a returned list as a tuple)."""
    if isinstance(x, list):
        x = tuple(x)
    return normalize(x)


def _strings_as_bytes(x: Any) -> Any:
    """numpy text (``str_``/``bytes_`` scalars, ``U``/``S`` arrays) as tf.data's strings:
    ``bytes``, or object arrays of ``bytes``. Anything else unchanged."""
    if isinstance(x, np.ndarray):
        return to_array(x) if x.dtype.kind in "US" else x
    if isinstance(x, np.str_):
        return str(x).encode("utf-8")
    if isinstance(x, np.bytes_):
        return bytes(x)
    return x


def to_array(x: Any) -> np.ndarray:
    """A whole leaf (array, list, scalar) as an ndarray with tf.data's dtype rules."""
    if isinstance(x, np.ndarray | np.generic):
        arr = np.asarray(x)
        if arr.dtype.kind not in "US":
            return arr
    elif isinstance(_first_leaf(x), bytes | str):
        # Never through numpy's fixed-width bytes: reading an item back drops its trailing
        # NUL bytes (a serialized Example ending in a zero field would lose them).
        arr = np.array(x, dtype=object)
        items = arr.reshape(-1)
        for i, v in enumerate(items):
            if isinstance(v, str):
                items[i] = v.encode("utf-8")
        return arr
    else:
        arr = np.asarray(x)
    if arr.dtype.kind in "US":
        flat = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in arr.reshape(-1)]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(arr.shape)
    if arr.dtype == object:
        return arr
    if arr.size == 0 and arr.dtype == np.float64 and isinstance(x, list | tuple):
        # An empty Python list has no values to infer from; tf.constant([]) is float32.
        return arr.astype(np.float32)
    first = _first_leaf(x)
    if isinstance(first, np.generic) and arr.dtype != first.dtype and arr.dtype.kind in "biuf":
        # tf.data converts a list by its first value's type: [np.float32(1), 2.0] is float32.
        return arr.astype(first.dtype)
    if _built_from_python(x):
        if arr.dtype == np.float64:
            return arr.astype(np.float32)
        if arr.dtype == np.int64 and (
            arr.size == 0 or (arr.min() >= _INT32_MIN and arr.max() <= _INT32_MAX)
        ):
            return arr.astype(np.int32)
    return arr


def scalar_if_0d(a: np.ndarray) -> Any:
    """A 0-d array as the numpy scalar (or bytes) tf.data's ``as_numpy_iterator`` would give."""
    return a[()] if a.ndim == 0 else a


def _first_leaf(x: Any) -> Any:
    while isinstance(x, list | tuple) and x:
        x = x[0]
    return x


def _built_from_python(x: Any) -> bool:
    """True when ``x`` holds Python numbers (not numpy ones), so tf.data's 32-bit defaults apply."""
    first = _first_leaf(x)
    return isinstance(first, int | float) and not isinstance(first, np.generic)


# -- specs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one leaf. ``None`` in ``shape`` is a dimension that may vary;
    ``shape=None`` means even the rank is unknown (tf.data's ``TensorShape(None)``)."""

    shape: tuple[int | None, ...] | None
    dtype: np.dtype

    def __repr__(self) -> str:
        dtype = "string" if self.dtype == STRING_DTYPE else str(self.dtype)
        shape = "<unknown>" if self.shape is None else self.shape
        return f"TensorSpec(shape={shape}, dtype={dtype})"

    def is_compatible_with(self, other: TensorSpec) -> bool:
        if self.dtype != other.dtype:
            return False
        if self.shape is None or other.shape is None:
            return True
        if len(self.shape) != len(other.shape):
            return False
        return all(a is None or b is None or a == b for a, b in zip(self.shape, other.shape))

    def most_specific_common(self, other: TensorSpec) -> TensorSpec:
        """The spec both satisfy, with ``None`` wherever the two disagree on a dimension."""
        if self.dtype != other.dtype:
            raise TypeError(f"incompatible specs {self} and {other}")
        if self.shape is None or other.shape is None or len(self.shape) != len(other.shape):
            return TensorSpec(None, self.dtype)
        shape = tuple(a if a == b else None for a, b in zip(self.shape, other.shape))
        return TensorSpec(shape, self.dtype)

    def with_leading(self, dim: int | None) -> TensorSpec:
        return TensorSpec(None if self.shape is None else (dim, *self.shape), self.dtype)

    def without_leading(self) -> TensorSpec:
        if self.shape is None:
            return self
        if not self.shape:
            raise ValueError("a scalar has no leading dimension to remove")
        return TensorSpec(self.shape[1:], self.dtype)


class NotATensor(TypeError):
    """A value no tensor holds where an element's leaf belongs (``None``): tf.data refuses a
    function returning one, and so does feedline, rather than call it a string."""


def leaf_spec(x: Any) -> TensorSpec:
    if x is None:
        raise NotATensor(
            "a function returned None where a value belongs (an element cannot hold None; "
            "did the function forget to return?)"
        )
    if isinstance(x, bytes | str):
        return TensorSpec((), STRING_DTYPE)
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind in "US":
        return TensorSpec(arr.shape, STRING_DTYPE)
    return TensorSpec(arr.shape, arr.dtype)


def spec_of(element: Any) -> Any:
    return map_structure(leaf_spec, element)


def merge_specs(a: Any, b: Any) -> Any:
    """Specs describing elements of either ``a`` or ``b`` (for concatenate, branches)."""
    try:
        return map_structure(lambda x, y: x.most_specific_common(y), a, b)
    except (ValueError, TypeError) as e:
        raise TypeError(f"element specs are incompatible: {a} vs {b}") from e


def format_structure(x: Any) -> str:
    """Short human description of an element: shapes and dtypes instead of values."""
    if isinstance(x, Mapping | tuple):
        return repr(map_structure(lambda v: leaf_spec(v), x))
    return repr(leaf_spec(x))
