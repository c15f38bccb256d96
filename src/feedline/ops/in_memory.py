"""Elements an op holds in memory: small datasets made of them (windows, groups), the spec of a
dataset-valued element, and the JSON-able encoding of held elements inside iterator states.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from feedline.ops.base import Op
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import NodeIterator, State
from feedline.structure import STRING_DTYPE, flatten, merge_specs, pack_like

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

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return ElementsIterator(self.elements, 0 if state is None else state["index"])


class ElementsIterator(NodeIterator):
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


def decode_elements(encoded: list[list[Any]], template: Any) -> list[Any]:
    """Inverse of :func:`encode_elements`; ``template`` (e.g. the element spec) gives the
    nesting, including namedtuple types, which JSON cannot carry."""
    return [pack_like(template, [_decode_leaf(leaf) for leaf in e]) for e in encoded]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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


def _decode_leaf(encoded: dict[str, Any]) -> Any:
    if "raw" in encoded:
        return encoded["raw"]
    if "bytes" in encoded:
        return base64.b64decode(encoded["bytes"])
    if "strings" in encoded:
        out = np.empty(len(encoded["strings"]), dtype=STRING_DTYPE)
        out[:] = [base64.b64decode(s) for s in encoded["strings"]]
        return out.reshape(encoded["shape"])
    data = base64.b64decode(encoded["data"])
    # frombuffer gives a read-only array, like every array feedline hands out.
    arr = np.frombuffer(data, dtype=np.dtype(encoded["dtype"])).reshape(encoded["shape"])
    return arr[()] if encoded["scalar"] else arr
