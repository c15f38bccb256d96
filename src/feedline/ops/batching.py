"""Batching: batch, padded_batch, unbatch, rebatch."""

from __future__ import annotations

from typing import Any

import numpy as np

from feedline.errors import StageError
from feedline.ops.base import INFINITE, UNKNOWN, Op
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import NodeIterator, State
from feedline.structure import (
    STRING_DTYPE,
    TensorSpec,
    flatten,
    format_structure,
    is_nest,
    map_structure,
    pack_like,
    to_array,
)

_SCALAR_TYPES = (np.generic, int, float, bool)


def batched_cardinality(n: int, batch_size: int, drop_remainder: bool) -> int:
    if n < 0:
        return n
    return n // batch_size if drop_remainder else -(-n // batch_size)


def stack_leaf(values: list[Any], stage: str, first_position: int) -> np.ndarray:
    """Stack one component of a batch; a shape mismatch names the positions and the shapes."""
    first = values[0]
    if isinstance(first, bytes | str):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    if isinstance(first, np.generic) and len(set(map(type, values))) == 1:
        return np.fromiter(values, dtype=first.dtype, count=len(values))
    if isinstance(first, np.ndarray):
        shape = first.shape
        for i, v in enumerate(values):
            if not isinstance(v, np.ndarray) or v.shape != shape:
                raise _shape_mismatch(stage, first_position, 0, shape, i, np.shape(v))
        if first.dtype == object:
            out = np.empty((len(values), *shape), dtype=object)
            for i, v in enumerate(values):
                out[i] = v
            return out
        return np.stack(values)
    arr = np.asarray(values)
    if arr.dtype == object and not all(isinstance(v, bytes) for v in values):
        shapes = [np.shape(v) for v in values]
        for i, shp in enumerate(shapes):
            if shp != shapes[0]:
                raise _shape_mismatch(stage, first_position, 0, shapes[0], i, shp)
    return arr


def _shape_mismatch(
    stage: str, first_position: int, i: int, shape_i: Any, j: int, shape_j: Any
) -> StageError:
    return StageError(
        stage,
        first_position + j,
        f"cannot batch elements of different shapes: element {first_position + i} has shape "
        f"{tuple(shape_i)} but element {first_position + j} has shape {tuple(shape_j)}. "
        "Use padded_batch to batch elements of different shapes.",
    )


def stack_elements(elements: list[Any], stage: str, first_position: int) -> Any:
    first = elements[0]
    if not is_nest(first):
        return stack_leaf(elements, stage, first_position)
    flat = [flatten(e) for e in elements]
    for i, (element, leaves) in enumerate(zip(elements, flat)):
        if len(leaves) != len(flat[0]) or type(element) is not type(first):
            raise StageError(
                stage,
                first_position + i,
                f"cannot batch elements of different structures: element {first_position} is "
                f"{format_structure(first)} but element {first_position + i} is "
                f"{format_structure(element)}",
            )
    columns = zip(*flat)
    return pack_like(first, [stack_leaf(list(c), stage, first_position) for c in columns])


class BatchOp(Op):
    def __init__(self, input_op: Op, batch_size: int, drop_remainder: bool) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.batch_size = batch_size
        self.drop_remainder = bool(drop_remainder)
        self.name = f"batch({batch_size})"

    def cardinality(self) -> int:
        return batched_cardinality(self.input.cardinality(), self.batch_size, self.drop_remainder)

    def compute_spec(self) -> Any:
        dim = self.batch_size if self.drop_remainder or self._always_full() else None
        return map_structure(lambda s: s.with_leading(dim), self.input.element_spec())

    def _always_full(self) -> bool:
        n = self.input.cardinality()
        return n == INFINITE or (n >= 0 and n % self.batch_size == 0)

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return BatchIterator(self, ctx, state)


class BatchIterator(NodeIterator):
    def __init__(self, op: BatchOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.input = op.input.make_iterator(ctx, None if state is None else state["input"])
        self.inputs = (self.input,)
        self.position = 0 if state is None else state["position"]

    def collect(self) -> list[Any]:
        """The next batch's elements (fewer at the end); the input is read in chunks."""
        size = self.op.batch_size
        elements = self.input.next_chunk(size)
        while elements and len(elements) < size:
            more = self.input.next_chunk(size - len(elements))
            if not more:
                break
            elements.extend(more)
        return elements

    def __next__(self) -> Any:
        elements = self.collect()
        if not elements or (self.op.drop_remainder and len(elements) < self.op.batch_size):
            raise StopIteration
        first = self.position
        self.position += len(elements)
        return self.combine(elements, first)

    def combine(self, elements: list[Any], first_position: int) -> Any:
        return stack_elements(elements, self.op.name, first_position)

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "position": self.position}


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

    def compute_spec(self) -> Any:
        dim = self.batch_size if self.drop_remainder or self._always_full() else None
        specs = self.input.element_spec()
        shapes = self._shapes_for(specs)

        def padded(spec: TensorSpec, shape: Any) -> TensorSpec:
            if shape is None:
                return TensorSpec((dim, *spec.shape), spec.dtype)
            return TensorSpec((dim, *_as_shape(shape)), spec.dtype)

        return map_structure(padded, specs, shapes)

    def _shapes_for(self, template: Any) -> Any:
        if self.padded_shapes is None:
            return map_structure(lambda _: None, template)
        return self.padded_shapes

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return PaddedBatchIterator(self, ctx, state)


def _as_shape(shape: Any) -> tuple[int | None, ...]:
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    return tuple(None if d is None or d == -1 else int(d) for d in shape)


class PaddedBatchIterator(BatchIterator):
    op: PaddedBatchOp

    def combine(self, elements: list[Any], first_position: int) -> Any:
        first = elements[0]
        shapes = self.op._shapes_for(first)
        values = self.op.padding_values
        if values is None:
            values = map_structure(lambda _: None, first)
        columns = [list(c) for c in zip(*(flatten(e) for e in elements))]
        leaves = [
            self._pad_leaf(column, shape, value, first_position)
            for column, shape, value in zip(
                columns, _flatten_shapes(shapes, first), flatten_padding(values, first)
            )
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
        fill = _default_padding(dtype) if value is None else value
        out = np.full((len(arrays), *target), fill, dtype=dtype)
        for i, a in enumerate(arrays):
            region: tuple[int | slice, ...] = (i, *(slice(0, n) for n in a.shape))
            out[region] = a
        return out


def _bytes_array(b: bytes) -> np.ndarray:
    out = np.empty((), dtype=object)
    out[()] = b
    return out


def _default_padding(dtype: np.dtype) -> Any:
    return b"" if dtype == STRING_DTYPE else dtype.type(0)


def _flatten_shapes(shapes: Any, template: Any) -> list[Any]:
    """Flatten ``padded_shapes`` along ``template`` (a shape is a leaf, not a nest)."""
    if isinstance(template, tuple):
        return [
            s for part_s, part_t in zip(shapes, template) for s in _flatten_shapes(part_s, part_t)
        ]
    if isinstance(template, dict):
        return [s for k in sorted(template) for s in _flatten_shapes(shapes[k], template[k])]
    return [shapes]


def flatten_padding(values: Any, template: Any) -> list[Any]:
    if not is_nest(template):
        return [values]
    if not is_nest(values):
        return [values] * len(flatten(template))
    return _flatten_shapes(values, template)


class UnbatchOp(Op):
    def __init__(self, input_op: Op, name: str = "unbatch") -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.name = name

    def cardinality(self) -> int:
        return INFINITE if self.input.cardinality() == INFINITE else UNKNOWN

    def compute_spec(self) -> Any:
        return map_structure(lambda s: s.without_leading(), self.input.element_spec())

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return UnbatchIterator(self, ctx, state)


def split_rows(batch: Any, stage: str, position: int) -> list[Any]:
    """The rows of a batch (its first axis), leaf by leaf for nests."""
    if not is_nest(batch):
        arr = to_array(batch)
        if arr.ndim == 0:
            raise StageError(stage, position, "cannot unbatch a scalar")
        return list(arr)
    leaves = [to_array(leaf) for leaf in flatten(batch)]
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise StageError(
            stage,
            position,
            f"cannot unbatch components with different first dimensions: "
            f"{[leaf.shape for leaf in leaves]}",
        )
    return [pack_like(batch, list(row)) for row in zip(*(list(leaf) for leaf in leaves))]


class UnbatchIterator(NodeIterator):
    def __init__(self, op: UnbatchOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.input = op.input.make_iterator(ctx, None if state is None else state["input"])
        self.inputs = (self.input,)
        self.rows: list[Any] = []
        self.row_index = 0
        self.batches_read = 0
        self._before_batch: State | None = None
        if state is not None and state["row"]:
            self._load_batch(state["batches_read"] - 1)
            self.row_index = state["row"]

    def _load_batch(self, position: int) -> bool:
        self._before_batch = self.input.get_state()
        try:
            batch = next(self.input)
        except StopIteration:
            return False
        self.rows = split_rows(batch, self.op.name, position)
        self.row_index = 0
        self.batches_read = position + 1
        return True

    def __next__(self) -> Any:
        while self.row_index >= len(self.rows):
            if not self._load_batch(self.batches_read):
                raise StopIteration
        row = self.rows[self.row_index]
        self.row_index += 1
        return row

    def next_chunk(self, max_n: int) -> list[Any]:
        while self.row_index >= len(self.rows):
            if not self._load_batch(self.batches_read):
                return []
        out = self.rows[self.row_index : self.row_index + max_n]
        self.row_index += len(out)
        return out

    def get_state(self) -> State:
        if self.row_index >= len(self.rows):
            return {"input": self.input.get_state(), "row": 0, "batches_read": self.batches_read}
        # Mid-batch: resume from the state before that batch and split it again.
        return {
            "input": self._before_batch,
            "row": self.row_index,
            "batches_read": self.batches_read,
        }


class RebatchOp(Op):
    """Re-slices batches into batches of ``batch_size`` rows (a list cycles through sizes)."""

    def __init__(self, input_op: Op, batch_sizes: list[int], drop_remainder: bool) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.batch_sizes = batch_sizes
        self.drop_remainder = drop_remainder
        self.name = f"rebatch({batch_sizes[0] if len(batch_sizes) == 1 else batch_sizes})"

    def cardinality(self) -> int:
        return INFINITE if self.input.cardinality() == INFINITE else UNKNOWN

    def compute_spec(self) -> Any:
        fixed = self.drop_remainder and len(set(self.batch_sizes)) == 1
        dim = self.batch_sizes[0] if fixed else None
        return map_structure(
            lambda s: s.without_leading().with_leading(dim), self.input.element_spec()
        )

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return RebatchIterator(self, ctx, state)


class RebatchIterator(NodeIterator):
    """Keeps rows of partly used input batches as array slices, so no row is copied twice."""

    def __init__(self, op: RebatchOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        unbatch_state = None if state is None else state["rows"]
        self.rows = UnbatchOp(op.input, name=op.name).make_iterator(ctx, unbatch_state)
        self.inputs = (self.rows,)
        self.emitted = 0 if state is None else state["emitted"]
        self.position = 0 if state is None else state["position"]

    def __next__(self) -> Any:
        size = self.op.batch_sizes[self.emitted % len(self.op.batch_sizes)]
        rows: list[Any] = []
        while len(rows) < size:
            more = self.rows.next_chunk(size - len(rows))
            if not more:
                break
            rows.extend(more)
        if not rows or (self.op.drop_remainder and len(rows) < size):
            raise StopIteration
        first = self.position
        self.position += len(rows)
        self.emitted += 1
        return stack_elements(rows, self.op.name, first)

    def get_state(self) -> State:
        return {"rows": self.rows.get_state(), "emitted": self.emitted, "position": self.position}
