"""padded_batch: elements of different shapes batched, each component padded to a common
shape with a value of its own dtype."""

from __future__ import annotations

from typing import Any

import numpy as np

from feedline.errors import StageError
from feedline.ops.base import Op
from feedline.ops.batching import BatchIterator, BatchOp, check_same_structure
from feedline.ops.tracing import spec_at_build
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.structure import (
    STRING_DTYPE,
    TensorSpec,
    flatten,
    is_nest,
    leaf_spec,
    normalize_leaf,
    pack_like,
    to_array,
)


class PaddedBatchOp(BatchOp):
    def __init__(
        self,
        input_op: Op,
        batch_size: int,
        padded_shapes: Any,
        padding_values: Any,
        drop_remainder: bool,
    ) -> None:
        super().__init__(input_op, batch_size, drop_remainder)
        self.padded_shapes = padded_shapes
        self.padding_values = padding_values
        self.name = f"padded_batch({batch_size})"
        spec = spec_at_build(input_op)
        if spec is not None:
            for value, leaf in zip(flatten_padding(padding_values, spec), flatten(spec)):
                check_padding_value(value, leaf.dtype)

    def compute_spec(self) -> Any:
        specs = self.input.element_spec()
        dim = self.batch_dim

        def padded(spec: TensorSpec, shape: Any) -> TensorSpec:
            if shape is None:
                return spec.with_leading(dim)
            return TensorSpec((dim, *_as_shape(shape)), spec.dtype)

        leaves = flatten(specs)
        return pack_like(specs, list(map(padded, leaves, self.flat_shapes(specs))))

    def flat_shapes(self, template: Any) -> list[Any]:
        """One padded shape (or None: pad to the batch's longest) per leaf of ``template``."""
        if self.padded_shapes is None:
            return [None] * len(flatten(template))
        return _flatten_up_to(template, self.padded_shapes, "padded_shapes")

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return PaddedBatchIterator(self, ctx, state)


def _as_shape(shape: Any) -> tuple[int | None, ...]:
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    return tuple(None if d is None or d == -1 else int(d) for d in shape)


class PaddedBatchIterator(BatchIterator):
    takes_blocks = False  # padding may change the shape
    op: PaddedBatchOp

    def combine(self, elements: list[Any], first_position: int) -> Any:
        check_same_structure(elements, self.op.name, first_position)
        first = elements[0]
        shapes = self.op.flat_shapes(first)
        values = flatten_padding(self.op.padding_values, first)
        columns = [list(c) for c in zip(*(flatten(e) for e in elements))]
        leaves = [
            self._pad_leaf(column, shape, value, first_position)
            for column, shape, value in zip(columns, shapes, values)
        ]
        return pack_like(first, leaves)

    def _pad_leaf(
        self, column: list[Any], shape: Any, value: Any, first_position: int
    ) -> np.ndarray:
        arrays = [to_array(v) if not isinstance(v, bytes) else _bytes_array(v) for v in column]
        rank = arrays[0].ndim
        for i, a in enumerate(arrays):
            if a.ndim != rank:
                raise StageError(
                    self.op.name,
                    first_position + i,
                    f"element {first_position + i} has rank {a.ndim}, but element "
                    f"{first_position} has rank {rank}; padded_batch pads sizes, not ranks",
                )
        target = [max(a.shape[d] for a in arrays) for d in range(rank)]
        if shape is not None:
            wanted = _as_shape(shape)
            if len(wanted) != rank:
                raise StageError(
                    self.op.name,
                    first_position,
                    f"padded shape {wanted} has rank {len(wanted)}, elements have rank {rank}",
                )
            for d, w in enumerate(wanted):
                if w is None:
                    continue
                if target[d] > w:
                    i = max(range(len(arrays)), key=lambda k: arrays[k].shape[d])
                    raise StageError(
                        self.op.name,
                        first_position + i,
                        f"element {first_position + i} has shape {arrays[i].shape}, larger "
                        f"than the padded shape {wanted} in dimension {d}",
                    )
                target[d] = w
        dtype = arrays[0].dtype
        # Checked at build already where the input's spec was known.
        fill = _default_padding(dtype) if value is None else check_padding_value(value, dtype)
        out = np.full((len(arrays), *target), fill, dtype=dtype)
        for i, a in enumerate(arrays):
            region: tuple[int | slice, ...] = (i, *(slice(0, n) for n in a.shape))
            # A 0-d object array (one string) would be stored as an array inside the object
            # array; its item is what belongs there.
            out[region] = a[()] if a.ndim == 0 else a
        return out


def check_padding_value(value: Any, dtype: np.dtype) -> Any:
    """``value`` as a padding value of a ``dtype`` component, never cast silently.

    tf.data converts it (a Python int is int32, a float float32) and requires that very dtype,
    a TypeError at build otherwise. feedline is as strict with numpy values, and takes a plain
    Python number of the component's own kind (an int for any integer dtype that holds it, a
    float for any float dtype, a bool for bool) as tf.data's literals would be written for it.
    """
    if value is None:
        return _default_padding(dtype)
    fill = normalize_leaf(value)
    spec = leaf_spec(fill)
    if spec.shape != ():
        raise ValueError(f"padding_values must be scalars, got {value!r} of shape {spec.shape}")
    if spec.dtype == dtype:
        return fill
    if _python_literal_of(value, dtype):
        return dtype.type(value)
    raise TypeError(
        f"padding_values: {value!r} is {_dtype_name(spec.dtype)}, but the component it pads "
        f"is {_dtype_name(dtype)}; pass a value of that dtype (tf.data refuses a value of "
        "another dtype too)"
    )


def _python_literal_of(value: Any, dtype: np.dtype) -> bool:
    """Whether a plain Python number stands for a value of ``dtype`` exactly."""
    if type(value) is int and dtype.kind in "iu":
        info = np.iinfo(dtype)
        return bool(info.min <= value <= info.max)
    return type(value) is float and dtype.kind == "f"


def _dtype_name(dtype: np.dtype) -> str:
    return "string" if dtype == STRING_DTYPE else dtype.name


def _bytes_array(b: bytes) -> np.ndarray:
    out = np.empty((), dtype=object)
    out[()] = b
    return out


def _default_padding(dtype: np.dtype) -> Any:
    return b"" if dtype == STRING_DTYPE else dtype.type(0)


def _flatten_up_to(template: Any, given: Any, what: str) -> list[Any]:
    """Flatten ``given`` along ``template``'s nesting only: where the template has a leaf, the
    value there is one item even if it is a tuple (a shape such as ``(None, 3)``)."""
    if isinstance(template, tuple):
        if not isinstance(given, tuple | list) or len(given) != len(template):
            raise ValueError(f"{what} {given!r} does not match the element structure {template}")
        return [x for t, g in zip(template, given) for x in _flatten_up_to(t, g, what)]
    if isinstance(template, dict):
        if not isinstance(given, dict) or given.keys() != template.keys():
            raise ValueError(f"{what} {given!r} does not match the element structure {template}")
        return [x for k in sorted(template) for x in _flatten_up_to(template[k], given[k], what)]
    return [given]


def flatten_padding(values: Any, template: Any) -> list[Any]:
    """One padding value (or None: the default) per leaf; a single value applies to all."""
    if values is None or not is_nest(values):
        return [values] * len(flatten(template))
    return _flatten_up_to(template, values, "padding_values")
