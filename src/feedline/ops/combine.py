"""Ops over several datasets: zip and concatenate (interleave and flat_map: interleave.py)."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

from feedline.errors import InvalidStateError, StageCrashedError
from feedline.ops.base import (
    INFINITE,
    UNKNOWN,
    Op,
    UnobservableSpec,
)
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, InputCursor, StageIterator, State
from feedline.runtime.states import (
    check_int,
    check_nested,
    state_int,
    state_list,
    state_nested,
)
from feedline.structure import flatten, map_structure, merge_specs, pack_like

if TYPE_CHECKING:
    pass


class ZipOp(Op):
    """Elements of several datasets side by side, in the nesting they were given in."""

    def __init__(self, structure: Any, ops: list[Op]) -> None:
        super().__init__()
        self.structure = structure
        self.inputs = tuple(ops)
        self.name = "zip"

    def cardinality(self) -> int:
        # tf.data's rule: any unknown input makes it unknown; else the shortest finite one.
        counts = [op.cardinality() for op in self.inputs]
        if UNKNOWN in counts:
            return UNKNOWN
        finite = [c for c in counts if c >= 0]
        return min(finite) if finite else INFINITE

    def compute_spec(self) -> Any:
        return pack_like(self.structure, [op.element_spec() for op in self.inputs])

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return ZipIterator(self, ctx, state)


class ZipIterator(ChunkedIterator):
    """Its inputs stay in step whatever fails. Each is read through a cursor, and moves on
    only once a whole row is made, so a crash (or Ctrl-C) while reading one input leaves none
    ahead. An input whose element is an error makes that row the error: the others' elements
    of the row are owed, dropped before the next row (and a state counts them as owed)."""

    def __init__(self, op: ZipOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        n = len(op.inputs)
        cursor_states: list[State | None] = [None] * n
        self.owed: list[int] = []  # inputs whose element of an erroneous row is still to drop
        if state is not None:
            cursor_states = [
                check_nested(s, "inputs", op.name) for s in state_list(state, "inputs", op.name, n)
            ]
            self.owed = [
                check_int(i, "owed", op.name, 0, n - 1) for i in state_list(state, "owed", op.name)
            ]
            if len(set(self.owed)) < len(self.owed):
                raise InvalidStateError(op.name, "owed", "names an input twice")
        self.cursors: list[InputCursor] = []
        try:
            for input_op, cursor_state in zip(op.inputs, cursor_states):
                self.cursors.append(
                    InputCursor.restore(
                        functools.partial(input_op.make_iterator, ctx), cursor_state, op.name
                    )
                )
        except BaseException:
            for cursor in self.cursors:
                cursor.close()
            raise
        self.inputs = tuple(cursor.input for cursor in self.cursors)

    def next_chunk(self, max_n: int) -> list[Any]:
        self._drop_owed()
        parts: list[list[Any]] = []
        last = len(self.cursors) - 1
        for i, cursor in enumerate(self.cursors):
            try:
                # The last input is read straight: its part, the shortest, is taken whole, so
                # it never holds elements back and needs no state from before it.
                part = cursor.peek(max_n) if i < last else cursor.input.next_chunk(max_n)
            except StageCrashedError:
                raise  # nothing moved: the state still points at this row
            except Exception:
                # This input's element of the row is the error (the elements before it were
                # delivered first): the row fails, and the others owe their element of it.
                self.owed = [j for j in range(len(self.cursors)) if j != i]
                raise
            if not part:
                return []
            parts.append(part)
            max_n = len(part)
        for cursor in self.cursors[:last]:
            cursor.advance(max_n)
        structure = self.op.structure
        return [pack_like(structure, [part[k] for part in parts]) for k in range(max_n)]

    def _drop_owed(self) -> None:
        while self.owed:
            try:
                self.cursors[self.owed[0]].take(1)
            except StageCrashedError:
                raise
            except Exception:
                pass  # its element of that row was an error too: dropped all the same
            self.owed.pop(0)

    def get_state(self) -> State:
        return {"inputs": [cursor.get_state() for cursor in self.cursors], "owed": list(self.owed)}


class ConcatenateOp(Op):
    def __init__(self, first: Op, second: Op) -> None:
        super().__init__()
        self.inputs = (first, second)
        self.name = "concatenate"
        # Incompatible datasets fail here, where the user wrote it; inputs whose specs cannot
        # be known (all empty, made by functions) have nothing to check, and yield nothing.
        with contextlib.suppress(UnobservableSpec):
            self.compute_spec()

    def cardinality(self) -> int:
        a, b = (op.cardinality() for op in self.inputs)
        if INFINITE in (a, b):
            return INFINITE
        if UNKNOWN in (a, b):
            return UNKNOWN
        return a + b

    def compute_spec(self) -> Any:
        # A side whose spec could only be observed from an element it does not have (an empty
        # mapped dataset) constrains nothing: tf.data would know it from tracing.
        known = []
        for op in self.inputs:
            try:
                known.append(op.element_spec())
            except UnobservableSpec:
                continue
        if not known:
            raise UnobservableSpec(
                f"cannot infer the element spec of {self.name}: both sides "
                "are empty datasets whose spec depends on a function"
            )
        return merge_specs(known[0], known[1]) if len(known) == 2 else known[0]

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return ConcatenateIterator(self, ctx, state)


class ConcatenateIterator(ChunkedIterator):
    def __init__(self, op: ConcatenateOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.ctx = ctx
        self.which = 0
        input_state = None
        if state is not None:
            self.which = state_int(state, "which", op.name, 0, 2)
            if self.which < 2:
                input_state = state_nested(state, "input", op.name)
        self.current: StageIterator | None = None
        if self.which < 2:
            self.current = op.inputs[self.which].make_iterator(ctx, input_state)
        self.inputs = (self.current,) if self.current else ()

    def next_chunk(self, max_n: int) -> list[Any]:
        while self.current is not None:
            chunk = self.current.next_chunk(max_n)
            if chunk:
                return chunk
            # The second input is made before the first is let go: if making it fails, the
            # next call tries again, rather than find the first closed and skip the second.
            following = self.op.inputs[1].make_iterator(self.ctx, None) if self.which == 0 else None
            self.current.close()
            self.which += 1
            self.current = following
            self.inputs = (self.current,) if self.current else ()
        return []

    def get_state(self) -> State:
        return {
            "which": self.which,
            "input": None if self.current is None else self.current.get_state(),
        }


def zip_structure(datasets: Any) -> tuple[Any, list[Op]]:
    """The nesting of ``datasets`` (with op placeholders) and the ops in flatten order."""
    from feedline.dataset import Dataset

    leaves = flatten(datasets)
    for leaf in leaves:
        if not isinstance(leaf, Dataset):
            raise TypeError(f"zip takes datasets (or nests of them), got {type(leaf).__name__}")
    structure = map_structure(lambda _: None, datasets)
    return structure, [d._op for d in leaves]
