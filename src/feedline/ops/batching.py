"""Batching: batch, unbatch, rebatch (padded_batch: padding.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from feedline.errors import InvalidStateError, StageError
from feedline.ops.base import UNKNOWN, Op, UnaryIterator, UnaryOp, UnobservableSpec
from feedline.ops.tracing import spec_at_build
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import known_end, state_int, state_nested
from feedline.structure import (
    flatten,
    format_structure,
    is_nest,
    map_structure,
    pack_like,
    same_structure,
    sole_type,
    to_array,
)


def batched_cardinality(n: int, batch_size: int, drop_remainder: bool) -> int:
    if n < 0:
        return n
    return n // batch_size if drop_remainder else -(-n // batch_size)


def stack_leaf(
    values: list[Any], stage: str, first_position: int, uniform: bool = False
) -> np.ndarray:
    """Stack one component of a batch; a shape mismatch names the positions and the shapes.

    ``uniform``: the caller already knows every value has the same type.
    """
    first = values[0]
    # Fast paths for the common homogeneous columns; anything else is checked value by value.
    if type(first) is bytes and all(type(v) is bytes for v in values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    if isinstance(first, np.generic) and (uniform or sole_type(values) is not None):
        return np.fromiter(values, dtype=first.dtype, count=len(values))
    shape = np.shape(first)
    for i, v in enumerate(values):
        if not (type(v) is np.ndarray and v.shape == shape) and np.shape(v) != shape:
            raise _shape_mismatch(stage, first_position, 0, shape, i, np.shape(v))
    if isinstance(first, bytes | str) or (isinstance(first, np.ndarray) and first.dtype == object):
        out = np.empty((len(values), *shape), dtype=object)
        for i, v in enumerate(values):
            out[i] = v
        return out
    if type(first) is np.ndarray and first.dtype.itemsize and first.dtype.isnative:
        return _stack_aligned(values, first.dtype)
    return np.stack(values)


# XLA's CPU client (``jax.device_put``) takes an array starting at a 64-byte boundary without
# a copy and copies any other; numpy's memory (malloc's) is only 16-byte aligned, so 3 batches
# in 4 were copied (2.5-11.5 ms of CPU for a 19 MiB image batch). 64 bytes more per batch.
BATCH_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting at a ``BATCH_ALIGNMENT`` boundary."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + BATCH_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % BATCH_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


# The largest batch copied holding the GIL (about 0.1 ms of memcpy).
HOLD_GIL_MAX_BYTES = 1 << 20
# Kinds of dtypes a memoryview takes (not datetimes, objects or records, which may hold them).
_BUFFER_KINDS = frozenset("biufcSU")


def _stack_aligned(values: list[Any], dtype: np.dtype) -> np.ndarray:
    """``np.stack(values)`` starting at a ``BATCH_ALIGNMENT`` boundary (values of several
    dtypes: numpy's promotion, in numpy's memory).

    A small batch of plain arrays of ``dtype`` is copied holding the GIL: numpy lets it go
    for a copy and must then get it back, which behind busy worker threads takes up to a
    switch interval (5 ms) where 32 rows of 16 KiB take 30 us. On 256 threads waiting on I/O
    the consumer's batches then took 3.6 ms each and held the pass at 7.5k elements/s, the
    workers idle for room half the time, against 12.5k/s with the copy made holding it. A
    large one is numpy's: holding the GIL through a 19 MiB copy (1.4 ms) kept the workers'
    Python waiting, and image decoding ran 10-20% slower.
    """
    out = aligned_empty((len(values), *values[0].shape), dtype)
    if (
        dtype.kind in _BUFFER_KINDS
        and 0 < out.nbytes <= HOLD_GIL_MAX_BYTES
        and all(type(v) is np.ndarray and v.dtype == dtype and v.flags.c_contiguous for v in values)
    ):
        rows = out.reshape(-1).view(np.uint8).data
        size = values[0].nbytes
        for i, v in enumerate(values):
            rows[i * size : (i + 1) * size] = v.data.cast("B")  # a memcpy, GIL held
        return out
    try:
        return np.stack(values, out=out, casting="no")
    except TypeError:
        return np.stack(values)


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


def check_same_structure(elements: list[Any], stage: str, first_position: int) -> bool:
    """Every element nested like the first (same node types, tuple lengths, dict keys).

    Returns True when the elements are leaves all of one type (the common case, checked at C
    speed), which lets the caller skip checking that again.
    """
    first = elements[0]
    nested = is_nest(first)
    if not nested and sole_type(elements) is not None:
        return True
    for i, element in enumerate(elements):
        if same_structure(first, element) if nested else not is_nest(element):
            continue
        raise StageError(
            stage,
            first_position + i,
            f"cannot batch elements of different structures: element {first_position} is "
            f"{format_structure(first)} but element {first_position + i} is "
            f"{format_structure(element)}",
        )
    return False


def stack_elements(elements: list[Any], stage: str, first_position: int) -> Any:
    uniform = check_same_structure(elements, stage, first_position)
    first = elements[0]
    if not is_nest(first):
        return stack_leaf(elements, stage, first_position, uniform)
    columns = zip(*(flatten(e) for e in elements))
    return pack_like(first, [stack_leaf(list(c), stage, first_position) for c in columns])


class BatchOp(UnaryOp):
    def __init__(self, input_op: Op, batch_size: int, drop_remainder: bool) -> None:
        super().__init__(input_op)
        self.batch_size = batch_size
        self.drop_remainder = bool(drop_remainder)
        self.name = f"batch({batch_size})"

    def cardinality(self) -> int:
        return batched_cardinality(self.input.cardinality(), self.batch_size, self.drop_remainder)

    def compute_spec(self) -> Any:
        specs = self.input.element_spec()
        return map_structure(lambda s: s.with_leading(self.batch_dim), specs)

    @property
    def batch_dim(self) -> int | None:
        # tf.data's rule: static only with drop_remainder, even when the input's cardinality
        # says every batch would be full.
        return self.batch_size if self.drop_remainder else None

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return BatchIterator(self, ctx, state)


def read_up_to(source: StageIterator, size: int) -> list[Any]:
    """The next ``size`` elements of ``source`` (fewer at its end), read in chunks."""
    elements = source.next_chunk(size)
    while elements and len(elements) < size:
        more = source.next_chunk(size - len(elements))
        if not more:
            break
        elements.extend(more)
    return elements


class BatchIterator(UnaryIterator):
    # A batch may be a block its input already stacked (see ``StageIterator.next_block``).
    takes_blocks = True

    def __init__(self, op: BatchOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.position = 0
        if state is not None:
            end = known_end(op.input.cardinality())
            self.position = state_int(state, "position", op.name, 0, end)
        super().__init__(op, ctx, state)

    def collect(self) -> list[Any]:
        """The next batch's elements (fewer at the end)."""
        return read_up_to(self.input, self.op.batch_size)

    def __next__(self) -> Any:
        if self.takes_blocks:
            block = self.input.next_block(self.op.batch_size)
            if block is not None:
                self.position += len(block)
                return block
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


def known_batch_dim(spec: Any, what: str) -> int | None:
    """The leading dimension every component of ``spec`` has, where the spec shows one.

    tf.data's checks at build, made here too so that an empty input does not hide them: a
    ValueError for a scalar component (no dimension to split) or for components whose known
    leading dimensions differ."""
    dims = set()
    for leaf in flatten(spec):
        if leaf.shape is None:
            continue
        if not leaf.shape:
            raise ValueError(f"{what}: cannot unbatch an input with scalar components ({spec})")
        if leaf.shape[0] is not None:
            dims.add(leaf.shape[0])
    if len(dims) > 1:
        raise ValueError(
            f"{what} needs components with one leading dimension; the element spec {spec} "
            f"has {sorted(dims)}"
        )
    return dims.pop() if dims else None


class UnbatchOp(UnaryOp):
    def __init__(self, input_op: Op, name: str = "unbatch") -> None:
        super().__init__(input_op)
        self.name = name
        spec = spec_at_build(input_op)
        if spec is not None:
            known_batch_dim(spec, name)

    def cardinality(self) -> int:
        # tf.data's rule: n batches of a static size k (every component) are n * k elements.
        n = self.input.cardinality()
        if n < 0:
            return n
        try:
            leaves = flatten(self.input.element_spec())
        except UnobservableSpec:
            return UNKNOWN
        sizes = {None if not leaf.shape else leaf.shape[0] for leaf in leaves}
        size = sizes.pop() if len(sizes) == 1 else None
        return UNKNOWN if size is None else n * size

    def compute_spec(self) -> Any:
        specs = self.input.element_spec()
        return map_structure(lambda s: s.without_leading(), specs)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
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


class UnbatchIterator(UnaryIterator):
    def __init__(self, op: UnbatchOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.rows: list[Any] = []
        self.row_index = 0
        self.batches_read = 0
        self._before_batch: State | None = None
        row = 0
        if state is not None:
            # Mid-batch (row > 0), the input's state is the one before that batch.
            row = state_int(state, "row", op.name)
            end = known_end(op.input.cardinality())
            self.batches_read = state_int(state, "batches_read", op.name, min(row, 1), end)
        super().__init__(op, ctx, state)
        if row:
            self.catch_up(self._reload_batch, row)

    def _reload_batch(self, row: int) -> None:
        """Split the batch a mid-batch state is in again and stand at ``row`` in it."""
        if not self._load_batch(self.batches_read - 1) or row >= len(self.rows):
            raise InvalidStateError(
                self.op.name, "row", f"is {row}: the batch it points into has {len(self.rows)} rows"
            )
        self.row_index = row

    def _load_batch(self, position: int) -> bool:
        self._before_batch = self.input.get_state()
        try:
            batch = next(self.input)
        except StopIteration:
            return False
        # Counted before splitting, so a batch that fails to split is not reported twice.
        self.batches_read = position + 1
        self.rows = []
        self.row_index = 0
        self.rows = split_rows(batch, self.op.name, position)
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


class RebatchOp(UnaryOp):
    """Re-slices batches into batches of ``batch_size`` rows (a list cycles through sizes)."""

    def __init__(self, input_op: Op, batch_sizes: list[int], drop_remainder: bool) -> None:
        super().__init__(input_op)
        self.batch_sizes = batch_sizes
        self.drop_remainder = drop_remainder
        self.name = f"rebatch({batch_sizes[0] if len(batch_sizes) == 1 else batch_sizes})"
        spec = spec_at_build(input_op)
        if spec is not None:
            known_batch_dim(spec, self.name)

    def cardinality(self) -> int:
        # tf.data's rule: rebatch never knows its cardinality, even over an infinite input.
        return UNKNOWN

    def compute_spec(self) -> Any:
        specs = self.input.element_spec()
        dim = self.static_batch_dim(specs)
        return map_structure(lambda s: s.without_leading().with_leading(dim), specs)

    def static_batch_dim(self, specs: Any) -> int | None:
        """tf.data's rule: one batch size, and either ``drop_remainder`` or input batches of
        a known size it divides (so that no batch can come out smaller)."""
        if len(set(self.batch_sizes)) != 1:
            return None
        size = self.batch_sizes[0]
        if self.drop_remainder:
            return size
        input_dim = known_batch_dim(specs, self.name)
        return size if input_dim is not None and input_dim % size == 0 else None

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return RebatchIterator(self, ctx, state)


class RebatchIterator(StageIterator):
    """Keeps rows of partly used input batches as array slices, so no row is copied twice."""

    def __init__(self, op: RebatchOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.emitted = self.position = 0
        rows_state = None
        if state is not None:
            # Each batch made has at least a row.
            self.position = state_int(state, "position", op.name)
            self.emitted = state_int(state, "emitted", op.name, 0, self.position)
            rows_state = state_nested(state, "rows", op.name)
        self.rows = UnbatchOp(op.input, name=op.name).make_iterator(ctx, rows_state)
        self.inputs = (self.rows,)

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
