"""Elements an op holds in memory: small datasets made of them (windows, groups), the spec of a
dataset-valued element, and the JSON-able encoding of held elements inside iterator states.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from feedline.errors import InvalidStateError
from feedline.ops.base import Op
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_dict, state_int
from feedline.structure import (
    STRING_DTYPE,
    TensorSpec,
    flatten,
    leaf_spec,
    merge_specs,
    pack_like,
)

if TYPE_CHECKING:
    from feedline.dataset import Dataset


@dataclass(frozen=True)
class DatasetSpec:
    """The spec of an element that is itself a dataset (``window`` yields them), like
    tf.data's ``DatasetSpec``: ``element_spec`` is the spec of that dataset's elements."""

    element_spec: Any
    # One dataset per element, as tf.data's DatasetSpec's dataset_shape says (a scalar).
    shape: tuple[int | None, ...] = ()

    def __repr__(self) -> str:
        return f"DatasetSpec({self.element_spec!r})"

    def is_compatible_with(self, other: Any) -> bool:
        if not isinstance(other, DatasetSpec):
            return False
        try:
            merge_specs(self.element_spec, other.element_spec)
        except TypeError:
            return False
        return True

    def most_specific_common(self, other: Any) -> DatasetSpec:
        if not isinstance(other, DatasetSpec):
            raise TypeError(f"incompatible specs {self} and {other}")
        return DatasetSpec(merge_specs(self.element_spec, other.element_spec))


def as_dataset(op: Op) -> Dataset:
    from feedline.dataset import Dataset  # the Dataset module imports the ops, not vice versa

    return Dataset(op)


class ElementsOp(Op):
    """A finite dataset of elements already in memory, whose spec is known (a window's)."""

    def __init__(self, elements: list[Any], spec: Any, name: str) -> None:
        super().__init__()
        self.elements = elements
        self.spec = spec
        self.name = name

    def cardinality(self) -> int:
        return len(self.elements)

    def compute_spec(self) -> Any:
        return self.spec

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        if state is None:
            return ElementsIterator(self.elements, 0)
        return ElementsIterator(
            self.elements, state_int(state, "index", self.name, 0, len(self.elements))
        )


class ElementsIterator(StageIterator):
    def __init__(self, elements: list[Any], index: int) -> None:
        self.elements = elements
        self.index = index

    def __next__(self) -> Any:
        if self.index >= len(self.elements):
            raise StopIteration
        self.index += 1
        return self.elements[self.index - 1]

    def next_chunk(self, max_n: int) -> list[Any]:
        chunk = self.elements[self.index : self.index + max_n]
        self.index += len(chunk)
        return chunk

    def get_state(self) -> State:
        return {"index": self.index}


# -- held elements in JSON-able states --------------------------------------------------------


def encode_elements(elements: list[Any]) -> list[list[Any]]:
    """Elements as JSON-able lists of encoded leaves (a leaf that is not a numpy value or bytes
    is kept as it is, so such a state pickles but is not JSON-able)."""
    return [[_encode_leaf(leaf) for leaf in flatten(e)] for e in elements]


class MalformedEncoding(ValueError):
    """Encoded elements that :func:`encode_elements` could not have written."""


def decode_elements(encoded: Any, template: Any) -> list[Any]:
    """Inverse of :func:`encode_elements`; ``template`` (e.g. the element spec) gives the
    nesting, including namedtuple types, which JSON cannot carry. Anything else than what
    ``encode_elements`` writes (they come from files and user checkpoints) is a
    ``MalformedEncoding``, never an arbitrary error or a wrong value."""
    if not isinstance(encoded, list):
        raise MalformedEncoding(f"expected a list of elements, got {type(encoded).__name__}")
    width = len(flatten(template))
    elements = []
    for i, element in enumerate(encoded):
        if not isinstance(element, list) or len(element) != width:
            raise MalformedEncoding(f"element {i} is not a list of {width} encoded leaves")
        elements.append(pack_like(template, [_decode_leaf(leaf) for leaf in element]))
    return elements


def state_elements(
    state: State, field: str, owner: str, spec: Callable[[], Any], max_count: int | None = None
) -> list[Any]:
    """The encoded elements in a state's ``field``: see :func:`check_elements`."""
    return check_elements(state_dict(state, owner, field)[field], field, owner, spec, max_count)


def check_elements(
    encoded: Any, field: str, owner: str, spec: Callable[[], Any], max_count: int | None = None
) -> list[Any]:
    """Encoded elements read from ``field`` of a state, at most ``max_count`` of them, each
    checked against ``spec()``, the spec of what the op holds (asked only when there are
    elements: finding an input's spec may take a look at its data). Checked: the nesting, and
    each leaf's dtype and rank; not the sizes, since a spec observed from the first elements
    may fix a size that later ones do not have."""
    if not isinstance(encoded, list):
        raise InvalidStateError(owner, field, f"is a {type(encoded).__name__}, not a list")
    if max_count is not None and len(encoded) > max_count:
        raise InvalidStateError(
            owner, field, f"holds {len(encoded)} elements, more than {max_count}"
        )
    if not encoded:
        return []
    template = spec()
    try:
        elements = decode_elements(encoded, template)
        leaf_specs = flatten(template)
        for i, element in enumerate(elements):
            for leaf, leaf_want in zip(flatten(element), leaf_specs):
                _check_leaf(leaf, leaf_want, i)
    except MalformedEncoding as e:
        raise InvalidStateError(owner, field, f"holds a bad element: {e}") from None
    return elements


def _check_leaf(leaf: Any, want: Any, i: int) -> None:
    if isinstance(want, DatasetSpec):
        from feedline.dataset import Dataset

        if not isinstance(leaf, Dataset):
            raise MalformedEncoding(f"element {i} has a {type(leaf).__name__}, not a dataset")
    elif isinstance(want, TensorSpec):
        got = leaf_spec(leaf)
        if got.dtype != want.dtype or (
            want.shape is not None and got.shape is not None and len(got.shape) != len(want.shape)
        ):
            raise MalformedEncoding(f"element {i} has a leaf {got}, where {want} belongs")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise MalformedEncoding(f"expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:  # binascii.Error
        raise MalformedEncoding(f"bad base64: {e}") from None


def _encode_leaf(leaf: Any) -> dict[str, Any]:
    if isinstance(leaf, bytes):
        return {"bytes": _b64(leaf)}
    if isinstance(leaf, np.ndarray | np.generic):
        arr = np.asarray(leaf)
        if arr.dtype == STRING_DTYPE:
            if all(isinstance(s, bytes) for s in arr.flat):
                return {"strings": [_b64(s) for s in arr.flat], "shape": list(arr.shape)}
        elif arr.dtype.fields is None:
            return {
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "data": _b64(arr.tobytes()),
                "scalar": isinstance(leaf, np.generic),
            }
    return {"raw": leaf}


# What an encoded leaf holds, by its kind (the key naming it).
_LEAF_KEYS = {
    "raw": {"raw"},
    "bytes": {"bytes"},
    "strings": {"strings", "shape"},
    "data": {"dtype", "shape", "data", "scalar"},
}
# A "raw" leaf is a value encode_elements could not encode (it keeps such a state from being
# JSON-able), so never one of JSON's own types: those would be a normalised element's leaf.
_NOT_RAW = (bool, int, float, str, list, dict)


def _decode_leaf(encoded: Any) -> Any:
    kind = next((k for k in _LEAF_KEYS if isinstance(encoded, dict) and k in encoded), None)
    if kind is None or set(encoded) != _LEAF_KEYS[kind]:
        raise MalformedEncoding(f"not an encoded leaf: {_describe(encoded)}")
    if kind == "raw":
        if isinstance(encoded["raw"], _NOT_RAW):
            raise MalformedEncoding(f"a raw leaf holds a {type(encoded['raw']).__name__}")
        return encoded["raw"]
    if kind == "bytes":
        return _unb64(encoded["bytes"])
    shape = _shape(encoded["shape"])
    if kind == "strings":
        strings = encoded["strings"]
        if not isinstance(strings, list) or len(strings) != math.prod(shape):
            raise MalformedEncoding(f"strings do not fill the shape {list(shape)}")
        out = np.empty(len(strings), dtype=STRING_DTYPE)
        out[:] = [_unb64(s) for s in strings]
        return out.reshape(shape)
    dtype = _dtype(encoded["dtype"])
    data = _unb64(encoded["data"])
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise MalformedEncoding(f"{len(data)} bytes do not fill a {dtype} array of {list(shape)}")
    scalar = encoded["scalar"]
    if not isinstance(scalar, bool) or (scalar and shape):
        raise MalformedEncoding(f"'scalar' is {scalar!r} for the shape {list(shape)}")
    # frombuffer gives a read-only array, like every array feedline hands out.
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    return arr[()] if scalar else arr


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise MalformedEncoding(f"not a shape: {_describe(value)}")
    return tuple(value)


def _dtype(value: Any) -> np.dtype:
    """A dtype ``encode_elements`` writes: numbers and the like, never objects or records."""
    try:
        dtype = np.dtype(value) if isinstance(value, str) else None
    except (TypeError, ValueError):
        dtype = None
    if (
        dtype is None
        or dtype.hasobject
        or dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.itemsize == 0
    ):
        raise MalformedEncoding(f"not a dtype of encoded values: {_describe(value)}")
    return dtype


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
