"""ragged_batch: batches of elements whose first dimension varies (tf.data's ``ragged_batch``
and ``tf.data.experimental.dense_to_ragged_batch``).

tf.data makes such a component a ``tf.RaggedTensor``. numpy has no ragged array, so feedline
gives its two parts, as tf.RaggedTensor itself stores them: a ``RaggedBatch(values,
row_lengths)``, where ``values`` is the batch's elements concatenated along their first axis
and ``row_lengths`` their lengths (``batch.rows()`` splits them again). That is one ragged
dimension: the elements of one batch must agree on every dimension after the first (tf.data
would make those ragged too); a batch where they do not is a ``StageError`` naming the element,
and ``padded_batch`` is the way to batch those.

As in tf.data, a component whose spec has a fully known shape is batched densely, as ``batch``
does; only components with an unknown dimension (or rank) become ``RaggedBatch``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from feedline.errors import StageError
from feedline.ops.base import Op
from feedline.ops.batching import BatchIterator, BatchOp, check_same_structure, stack_leaf
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.structure import TensorSpec, flatten, map_structure, pack_like

ROW_LENGTH_DTYPES = (np.dtype(np.int64), np.dtype(np.int32))


class RaggedBatch(NamedTuple):
    """One ragged component of a batch: tf.RaggedTensor with one ragged dimension, as numpy
    arrays. Row ``i`` is ``values[sum(row_lengths[:i]) : sum(row_lengths[:i + 1])]``."""

    values: Any
    row_lengths: Any

    def rows(self) -> list[np.ndarray]:
        """The batch's elements, one array each (tf's ``RaggedTensor`` rows)."""
        ends = np.cumsum(self.row_lengths)
        return np.split(self.values, ends[:-1]) if len(ends) else []


def row_lengths_dtype(value: Any) -> np.dtype:
    """tf.data's ``row_splits_dtype`` (int64 or int32; a numpy or tf dtype, or its name)."""
    dtype = np.dtype(getattr(value, "name", value))
    if dtype not in ROW_LENGTH_DTYPES:
        raise ValueError(f"row_splits_dtype must be int64 or int32, got {value!r}")
    return dtype


def _is_ragged(spec: TensorSpec) -> bool:
    return spec.shape is None or None in spec.shape


class RaggedBatchOp(BatchOp):
    def __init__(
        self, input_op: Op, batch_size: int, drop_remainder: bool, row_splits_dtype: Any
    ) -> None:
        super().__init__(input_op, batch_size, drop_remainder)
        self.row_dtype = row_lengths_dtype(row_splits_dtype)
        self.name = f"ragged_batch({batch_size})"

    def compute_spec(self) -> Any:
        dim = self.batch_dim

        def batched(spec: TensorSpec) -> Any:
            if not _is_ragged(spec):
                return spec.with_leading(dim)
            if spec.shape == ():
                raise TypeError(f"{self.name}: a scalar has no dimension to batch raggedly")
            inner = None if spec.shape is None else (None, *spec.shape[1:])
            return RaggedBatch(TensorSpec(inner, spec.dtype), TensorSpec((dim,), self.row_dtype))

        return map_structure(batched, self.input.element_spec())

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return RaggedBatchIterator(self, ctx, state)


class RaggedBatchIterator(BatchIterator):
    op: RaggedBatchOp
    # Blocks an input stacked are dense batches: a ragged component needs its elements.
    takes_blocks = False

    def combine(self, elements: list[Any], first_position: int) -> Any:
        check_same_structure(elements, self.op.name, first_position)
        leaf_specs = flatten(self.op.input.element_spec())
        columns = zip(*(flatten(e) for e in elements))
        out: list[Any] = []
        for spec, column in zip(leaf_specs, columns):
            values = list(column)
            if _is_ragged(spec):
                out.append(self._ragged(values, first_position))
            else:
                out.append(stack_leaf(values, self.op.name, first_position))
        return pack_like(elements[0], out)

    def _ragged(self, values: list[Any], first_position: int) -> RaggedBatch:
        arrays = [np.asarray(v) if not isinstance(v, np.ndarray) else v for v in values]
        inner = arrays[0].shape[1:]
        for i, a in enumerate(arrays):
            if a.ndim == 0 or a.shape[1:] != inner:
                raise StageError(
                    self.op.name,
                    first_position + i,
                    f"ragged_batch makes only the first dimension ragged: element "
                    f"{first_position} has shape {arrays[0].shape}, element "
                    f"{first_position + i} {a.shape}; use padded_batch for these",
                )
        lengths = np.fromiter((len(a) for a in arrays), dtype=self.op.row_dtype, count=len(arrays))
        return RaggedBatch(np.concatenate(arrays), lengths)
