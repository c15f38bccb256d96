"""Ops over several datasets: zip, concatenate, interleave (and so flat_map)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from feedline.errors import StageError, wrap_user_error
from feedline.ops.base import (
    AUTOTUNE,
    INFINITE,
    UNKNOWN,
    Op,
    UnobservableSpec,
    call_with_element,
    function_name,
)
from feedline.ops.tracing import traced_spec
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, NodeIterator, State
from feedline.runtime.parallel import AsyncStage
from feedline.structure import flatten, map_structure, merge_specs, pack_like


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

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return ZipIterator(self, ctx, state)


class ZipIterator(NodeIterator):
    def __init__(self, op: ZipOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        states = [None] * len(op.inputs) if state is None else state["inputs"]
        self.inputs = tuple(i.make_iterator(ctx, s) for i, s in zip(op.inputs, states))

    def __next__(self) -> Any:
        return pack_like(self.op.structure, [next(it) for it in self.inputs])

    def get_state(self) -> State:
        return {"inputs": [it.get_state() for it in self.inputs]}


class ConcatenateOp(Op):
    def __init__(self, first: Op, second: Op) -> None:
        super().__init__()
        self.inputs = (first, second)
        self.name = "concatenate"
        self.compute_spec()  # incompatible datasets fail here, where the user wrote it

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

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return ConcatenateIterator(self, ctx, state)


class ConcatenateIterator(ChunkedIterator):
    def __init__(self, op: ConcatenateOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.ctx = ctx
        self.which = 0 if state is None else state["which"]
        self.current: NodeIterator | None = None
        if self.which < 2:
            self.current = op.inputs[self.which].make_iterator(
                ctx, None if state is None else state["input"]
            )
        self.inputs = (self.current,) if self.current else ()

    def next_chunk(self, max_n: int) -> list[Any]:
        while self.current is not None:
            chunk = self.current.next_chunk(max_n)
            if chunk:
                return chunk
            self.current.close()
            self.which += 1
            self.current = (
                self.op.inputs[1].make_iterator(self.ctx, None) if self.which == 1 else None
            )
            self.inputs = (self.current,) if self.current else ()
        return []

    def get_state(self) -> State:
        return {
            "which": self.which,
            "input": None if self.current is None else self.current.get_state(),
        }


class InterleaveOp(Op):
    """tf.data's interleave: ``block_length`` elements in turn from ``cycle_length`` open
    datasets; an exhausted one leaves its slot empty until the cycle comes back to it, which
    then opens the next input element's dataset there."""

    def __init__(
        self,
        input_op: Op,
        fn: Callable[..., Any],
        cycle_length: int,
        block_length: int,
        name: str | None = None,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.fn = fn
        self.cycle_length = cycle_length
        self.block_length = block_length
        self.num_parallel_calls = num_parallel_calls
        self.deterministic = deterministic
        self.name = name or f"interleave({function_name(fn)})"

    def cardinality(self) -> int:
        return UNKNOWN  # tf.data's answer even over an infinite input

    def compute_spec(self) -> Any:
        from feedline.dataset import Dataset

        def inner_spec(element: Any) -> Any:
            dataset = call_with_element(self.fn, element)
            if not isinstance(dataset, Dataset):
                raise TypeError(f"{self.name}: the function must return a Dataset")
            return dataset.element_spec

        return traced_spec(self.input, inner_spec, self.name)

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return InterleaveIterator(self, ctx, state)


class InterleaveIterator(NodeIterator):
    """State: the input's state at the start of the pass, how many input elements were read,
    and for each open slot the input position it came from and its own state. Restoring
    re-reads the input (cheap: it is usually a list of files) and reopens those slots.

    With ``num_parallel_calls`` each open slot reads ahead on a thread of its own (the usual
    case: several files read at once). Without ``deterministic``, a slot whose next element is
    not ready yet is passed over for one that is.
    """

    def __init__(self, op: InterleaveOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.ctx = ctx
        self.parallel = op.num_parallel_calls is not None
        self.deterministic = (
            ctx.options.deterministic if op.deterministic is None else op.deterministic
        )
        self.input_start = None if state is None else state["input_start"]
        self.input = op.input.make_iterator(ctx, self.input_start)
        if state is None:
            self.input_start = self.input.get_state()
        self.inputs = (self.input,)
        self.slots: list[NodeIterator | None] = [None] * op.cycle_length
        self.slot_origin: list[int | None] = [None] * op.cycle_length
        self.read = 0
        self.input_done = False
        self.cycle_index = 0
        self.block_index = 0
        if state is not None:
            self._restore(state)

    def _restore(self, state: State) -> None:
        wanted = {pos: s for pos, s in state["slots"] if pos is not None}
        origins = [pos for pos, _ in state["slots"]]
        opened: dict[int, NodeIterator] = {}
        for pos in range(state["read"]):
            element = next(self.input)
            if pos in wanted:
                opened[pos] = self._open(element, pos, wanted[pos])
        self.read = state["read"]
        self.input_done = state["input_done"]
        self.slot_origin = origins
        self.slots = [None if pos is None else opened[pos] for pos in origins]
        self.cycle_index = state["cycle_index"]
        self.block_index = state["block_index"]

    def _open(self, element: Any, position: int, state: State | None) -> NodeIterator:
        from feedline.dataset import Dataset

        try:
            dataset = call_with_element(self.op.fn, element)
        except Exception as e:
            raise wrap_user_error(self.op.name, position, e) from e
        if not isinstance(dataset, Dataset):
            raise StageError(
                self.op.name,
                position,
                f"the function must return a Dataset, got {type(dataset).__name__}",
            )
        inner = dataset._op
        if not self.parallel:
            return inner.make_iterator(self.ctx, state)
        return AsyncStage(
            name=f"{self.op.name}[{position}]",
            ctx=self.ctx,
            make_input=lambda s: inner.make_iterator(self.ctx, s),
            transform=None,
            state=state,
            parallelism=1,
            parallelism_tunable=False,
            max_parallelism=1,
            buffer_size=2 * self.op.block_length,
            buffer_tunable=self.op.num_parallel_calls == AUTOTUNE,
            deterministic=True,
        )

    def _advance_cycle(self) -> None:
        self.block_index = 0
        self.cycle_index = (self.cycle_index + 1) % self.op.cycle_length

    def _ready_slot(self) -> None:
        """Out-of-order mode: move to an open slot that has an element ready, if the current
        one has none (the block count restarts there)."""
        current = self.slots[self.cycle_index]
        if not isinstance(current, AsyncStage) or current.has_ready():
            return
        n = self.op.cycle_length
        for step in range(1, n):
            index = (self.cycle_index + step) % n
            slot = self.slots[index]
            if isinstance(slot, AsyncStage) and slot.has_ready():
                self.cycle_index = index
                self.block_index = 0
                return

    def __next__(self) -> Any:
        while True:
            if not self.deterministic:
                self._ready_slot()
            slot = self.slots[self.cycle_index]
            if slot is not None:
                if self.block_index < self.op.block_length:
                    try:
                        element = next(slot)
                    except StopIteration:
                        slot.close()
                        self.slots[self.cycle_index] = None
                        self.slot_origin[self.cycle_index] = None
                    else:
                        self.block_index += 1
                        return element
                self._advance_cycle()
            elif not self.input_done:
                try:
                    element = next(self.input)
                except StopIteration:
                    self.input_done = True
                    continue
                position = self.read
                self.read += 1
                self.slots[self.cycle_index] = self._open(element, position, None)
                self.slot_origin[self.cycle_index] = position
            elif any(s is not None for s in self.slots):
                self._advance_cycle()
            else:
                raise StopIteration

    def get_state(self) -> State:
        return {
            "input_start": self.input_start,
            "read": self.read,
            "input_done": self.input_done,
            "slots": [
                [pos, None if it is None else it.get_state()]
                for pos, it in zip(self.slot_origin, self.slots)
            ],
            "cycle_index": self.cycle_index,
            "block_index": self.block_index,
        }

    def close(self) -> None:
        self.input.close()
        for slot in self.slots:
            if slot is not None:
                slot.close()


def zip_structure(datasets: Any) -> tuple[Any, list[Op]]:
    """The nesting of ``datasets`` (with op placeholders) and the ops in flatten order."""
    from feedline.dataset import Dataset

    leaves = flatten(datasets)
    for leaf in leaves:
        if not isinstance(leaf, Dataset):
            raise TypeError(f"zip takes datasets (or nests of them), got {type(leaf).__name__}")
    structure = map_structure(lambda _: None, datasets)
    return structure, [d._op for d in leaves]
