"""interleave (and so flat_map): datasets made from each input element, read in turn."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from feedline.errors import InvalidStateError, StageCrashedError, StageError, wrap_user_error
from feedline.ops.base import (
    AUTOTUNE,
    INFINITE,
    UNKNOWN,
    Op,
    UnaryIterator,
    UnaryOp,
    call_with_element,
    function_name,
)
from feedline.ops.choices import ChoiceLog
from feedline.ops.interleave_ahead import (
    SLOT_BUFFER_BYTES,
    SLOT_BUFFER_ELEMENTS,
    Ahead,
    DatasetsAhead,
    datasets_ahead,
)
from feedline.ops.tracing import output_check, traced_spec
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.parallel import AsyncStage, default_parallelism
from feedline.runtime.stage_config import StageConfig
from feedline.runtime.states import (
    check_int,
    check_nested,
    known_end,
    state_bool,
    state_int,
    state_list,
    state_nested,
)

if TYPE_CHECKING:
    from feedline.runtime.process.remote import RemoteSlots


# tf.data's default cycle length depends on the machine's cores (``port::MaxParallelism``):
# with ``num_parallel_calls=N``, ``min(N, cores)`` (and N above the cores is then an error);
# with AUTOTUNE, ``ceil(cores / 3)`` (each slot has a thread, and two future slots open ahead
# on threads of their own); sequential, ``cores``. The cycle length decides the order, so
# feedline evaluates that rule for a fixed machine of ``REFERENCE_CORES`` cores instead: one
# pipeline gives one order on any machine, and tf.data's own on a machine of that size.
REFERENCE_CORES = 2
# Threads tf.data gives each slot under AUTOTUNE: its own and two for future slots.
_THREADS_PER_SLOT = 3


def default_cycle_length(num_parallel_calls: int | None) -> int:
    """The cycle length of an interleave given none, by tf.data's rule for a machine of
    ``REFERENCE_CORES`` cores (a fixed ``num_parallel_calls`` needs no machine: it is that)."""
    if num_parallel_calls is None:
        return REFERENCE_CORES
    if num_parallel_calls == AUTOTUNE:
        return -(-REFERENCE_CORES // _THREADS_PER_SLOT)
    return num_parallel_calls


class InterleaveOp(UnaryOp):
    """tf.data's interleave: ``block_length`` elements in turn from ``cycle_length`` open
    datasets; an exhausted one leaves its slot empty until the cycle comes back to it, which
    then opens the next input element's dataset there.

    With the "process" executor each open dataset is made and iterated in a worker process
    (``runtime/process/remote.py``); "auto" and "thread" run on threads.
    """

    def __init__(
        self,
        input_op: Op,
        fn: Callable[..., Any],
        cycle_length: int,
        block_length: int,
        name: str | None = None,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        executor: str | None = "thread",
    ) -> None:
        super().__init__(input_op)
        self.fn = fn
        # None: the pipeline's Options.executor, as ``Dataset.interleave`` passes unless told.
        # Interleaves made for other ops (flat_map, TextLineDataset) stay on threads, where
        # they always ran, whatever Options.executor says for maps.
        self.executor = executor
        self.cycle_length = cycle_length
        self.block_length = block_length
        self.num_parallel_calls = num_parallel_calls
        self.deterministic = deterministic
        self.name = name or f"interleave({function_name(fn)})"

    def cardinality(self) -> int:
        # tf.data's answers: a parallel interleave over an infinite input is infinite (it
        # would open datasets forever); otherwise unknown, even over an infinite input.
        if self.num_parallel_calls is not None and self.input.cardinality() == INFINITE:
            return INFINITE
        return UNKNOWN

    def compute_spec(self) -> Any:
        from feedline.dataset import Dataset

        def inner_spec(element: Any) -> Any:
            dataset = call_with_element(self.fn, element)
            if not isinstance(dataset, Dataset):
                raise TypeError(f"{self.name}: the function must return a Dataset")
            return dataset.element_spec

        return traced_spec(self.input, inner_spec, self.name)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return InterleaveIterator(self, ctx, state)


def open_dataset(
    fn: Callable[..., Any],
    name: str,
    element: Any,
    position: int,
    ctx: IterContext,
    state: State | None,
) -> StageIterator:
    """The iterator of the dataset ``fn`` returns for the input element at ``position`` (of
    interleave stage ``name``), resumed from ``state``."""
    from feedline.dataset import Dataset

    try:
        dataset = call_with_element(fn, element)
    except Exception as e:
        raise wrap_user_error(name, position, e) from e
    if not isinstance(dataset, Dataset):
        raise StageError(
            name, position, f"the function must return a Dataset, got {type(dataset).__name__}"
        )
    return dataset._op.make_iterator(ctx, state)


class InterleaveIterator(UnaryIterator):
    """State: the input's state at the start of the pass, how many input elements were read,
    and for each open slot the input position it came from and its own state. Restoring
    re-reads the input (cheap: it is usually a list of files) and reopens those slots.

    With ``num_parallel_calls`` each open slot reads ahead on a thread of its own (the usual
    case: several files read at once), and so do the datasets of the next input elements,
    opened ahead (``datasets_ahead``; they are not in the state: restored, they are opened
    again in their turn). Without ``deterministic``, a slot whose next element is not ready
    yet is passed over for one that is.

    With worker processes a slot's dataset runs in a worker (``RemoteIterator``), and a thread
    reads ahead from it in any case; without ``num_parallel_calls`` all slots share one worker,
    so one slot is read at a time, as on threads, but while the consumer works.

    An input element counts as read once its dataset is open, or has failed to open on its own
    account (that error is its turn in the pass). One whose opening was cut short (Ctrl-C) is
    opened again by the next call; after a ``StageCrashedError`` (a worker process died, while
    opening or reading a slot) the pass ends, and its state resumes with every element not
    yet delivered.
    """

    def __init__(self, op: InterleaveOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.ctx = ctx
        self.parallel = op.num_parallel_calls is not None
        # Slots can be passed over only when they are read at once.
        self.deterministic = (
            not self.parallel
            or ctx.in_order
            or (ctx.options.deterministic if op.deterministic is None else op.deterministic)
        )
        self.slots: list[StageIterator | None] = [None] * op.cycle_length
        self.slot_origin: list[int | None] = [None] * op.cycle_length
        self.read = 0
        self.input_done = False
        self.cycle_index = 0
        self.block_index = 0
        self.crashed = False
        self.pending: tuple[Any] | None = None  # an input element read, its opening cut short
        self.ahead: deque[Ahead] = deque()  # the next input elements, after ``pending``
        self.choices = ChoiceLog()
        # Each element checked against the traced spec, once known: the datasets the function
        # returns may differ from the first ones (another dtype, another structure).
        self.check = output_check(op, ctx, op.executor, trace=False)
        wanted: dict[int, State] = {}
        if state is not None:
            wanted = self._check_state(state)
            self.choices.restore(state, op.name, op.cycle_length)
        super().__init__(op, ctx, state, field="input_start")
        # Taken from the input even when restored: the saved one is a frozen copy, and an
        # input that delivers in finishing order records its order only in the live one.
        self.input_start = self.input.get_state()
        self.remote: RemoteSlots | None = None
        self.most_ahead = 0
        self.tuned_ahead: DatasetsAhead | None = None
        try:
            self.remote = self._remote_slots()
            # Threads read ahead; a worker process's slots are read one round trip at a time.
            self.most_ahead = (
                0 if self.remote is not None else datasets_ahead(op.num_parallel_calls)
            )
            # Under AUTOTUNE, the tuner moves how many (from tf.data's two).
            if self.remote is None and op.num_parallel_calls == AUTOTUNE:
                self.tuned_ahead = DatasetsAhead(
                    op.name, op, ctx, self.most_ahead, self._readers, op.cycle_length
                )
                self.most_ahead = self.tuned_ahead.knobs["parallelism"].value
                self.tuned_ahead.on_change = self._set_most_ahead
            if state is not None:
                self._reopen(wanted)
        except BaseException:
            self.close()
            raise

    def _check_state(self, state: State) -> dict[int, State]:
        """Read ``state`` into this iterator's fields; the states of the open slots, by input
        position."""
        op, owner = self.op, self.op.name
        state_nested(state, "input_start", owner)
        self.read = state_int(state, "read", owner, 0, known_end(op.input.cardinality()))
        self.input_done = state_bool(state, "input_done", owner)
        self.cycle_index = state_int(state, "cycle_index", owner, 0, op.cycle_length - 1)
        self.block_index = state_int(state, "block_index", owner, 0, op.block_length)
        wanted: dict[int, State] = {}
        origins: list[int | None] = []
        for pair in state_list(state, "slots", owner, op.cycle_length):
            if not isinstance(pair, list) or len(pair) != 2:
                raise InvalidStateError(owner, "slots", f"holds {pair!r}, not a [position, state]")
            position, slot_state = pair
            if position is not None:
                position = check_int(position, "slots", owner, 0, self.read - 1)
                if position in wanted:
                    raise InvalidStateError(owner, "slots", f"opens position {position} twice")
                wanted[position] = check_nested(slot_state, "slots", owner)
            origins.append(position)
        self.slot_origin = origins
        return wanted

    def _reopen(self, wanted: dict[int, State]) -> None:
        """Read the input up to where the state was, opening its open slots again."""
        opened: dict[int, StageIterator] = {}
        try:
            for position in range(self.read):
                try:
                    element = next(self.input)
                except StopIteration:
                    raise InvalidStateError(
                        self.op.name, "read", f"is {self.read}: the input ends before that"
                    ) from None
                if position in wanted:
                    opened[position] = self._open(element, position, wanted[position])
        except BaseException:
            for slot in opened.values():
                slot.close()
            raise
        self.slots = [None if pos is None else opened[pos] for pos in self.slot_origin]

    def _readers(self) -> list[AsyncStage]:
        """The stages reading the open slots' and the opened-ahead datasets now (asked on
        the tuner's thread, while the consumer's may change them)."""
        while True:
            try:
                opened = [*self.slots, *(ahead.opened for ahead in self.ahead)]
            except RuntimeError:  # the deque changed meanwhile: read it again
                continue
            return [r for r in opened if isinstance(r, AsyncStage)]

    def _set_most_ahead(self, value: int) -> None:
        # Called on the tuner's thread: only the number changes here; the consumer's thread
        # opens what it allows (see ``_advance_cycle``).
        self.most_ahead = value

    def _remote_slots(self) -> RemoteSlots | None:
        """A hold on worker processes for the slots, if they run there."""
        op, ctx = self.op, self.ctx
        # A probe pass (for an element spec) looks at an element or two: never worth processes.
        if (op.executor or ctx.options.executor) != "process" or ctx.probe:
            return None
        from feedline.runtime.process.remote import remote_slots

        # As many as slots are read at once: num_parallel_calls (AUTOTUNE: every slot), up to
        # the cores; without it, one.
        calls = op.num_parallel_calls
        at_once = op.cycle_length if calls == AUTOTUNE else min(calls or 1, op.cycle_length)
        workers = min(at_once, default_parallelism())
        opener = functools.partial(open_dataset, op.fn, op.name)
        return remote_slots(ctx, op, op.name, opener, workers)

    def _open(self, element: Any, position: int, state: State | None) -> StageIterator:
        remote = self.remote
        if remote is not None:

            def make_input(s: State | None) -> StageIterator:
                return remote.open(element, position, s)

        else:

            def make_input(s: State | None) -> StageIterator:
                return open_dataset(self.op.fn, self.op.name, element, position, self.ctx, s)

        if not self.parallel and remote is None:
            return make_input(state)
        # From a worker process, elements come a chunk per round trip (100-200 us). Read ahead
        # on a thread, with a buffer the stage sizes from the measured cost, a chunk is ~10 ms
        # of work; read one by one, or a block at a time, it is often one element (10x slower
        # on small records).
        config = StageConfig(
            name=f"{self.op.name}[{position}]",
            parallelism=1,
            parallelism_tunable=False,
            max_parallelism=1,
            buffer_size=None if remote is not None else SLOT_BUFFER_ELEMENTS,
            buffer_tunable=False,
            deterministic=True,
        )
        slot = AsyncStage(config, ctx=self.ctx, make_input=make_input, transform=None, state=state)
        if remote is None:
            slot.max_buffer_bytes = min(slot.max_buffer_bytes, SLOT_BUFFER_BYTES)
        return slot

    def _advance_cycle(self) -> None:
        self.block_index = 0
        self.cycle_index = (self.cycle_index + 1) % self.op.cycle_length
        if len(self.ahead) < self.most_ahead and self.pending is None:
            self._open_ahead()  # the tuner allowed more

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

    def _choose_slot(self) -> None:
        """Finishing order: the slot a restored state replays, else one with an element ready
        (a jump, recorded for the states given out)."""
        choices = self.choices
        choices.steps += 1
        if choices.forced:
            slot = choices.forced_jump()
            if slot is not None:
                self.cycle_index, self.block_index = slot, 0
            return
        before = self.cycle_index
        self._ready_slot()
        if self.cycle_index != before:
            choices.record_jump(self.cycle_index)

    def __next__(self) -> Any:
        if self.crashed:
            raise StopIteration  # the pass ended with the crash
        try:
            return self._next()
        except StageCrashedError:
            self.crashed = True
            raise

    def _next(self) -> Any:
        while True:
            if not self.deterministic:
                self._choose_slot()
            slot = self.slots[self.cycle_index]
            if slot is not None:
                if self.block_index < self.op.block_length:
                    try:
                        element = next(slot)
                    except StopIteration:
                        slot.close()
                        if self.tuned_ahead is not None and isinstance(slot, AsyncStage):
                            self.tuned_ahead.metrics.retire(slot)
                        self.slots[self.cycle_index] = None
                        self.slot_origin[self.cycle_index] = None
                    else:
                        self.block_index += 1
                        self.choices.deliveries += 1
                        if self.check is not None and not self.check.fits(element):
                            origin = self.slot_origin[self.cycle_index]
                            raise self.check.error(element, origin)
                        return element
                self._advance_cycle()
            elif self.ahead and self.pending is None:
                self._take_ahead()
            elif self.pending is not None or not self.input_done:
                if self.pending is None:
                    try:
                        self.pending = (next(self.input),)
                    except StopIteration:
                        self.input_done = True
                        continue
                self._open_pending()
            elif any(s is not None for s in self.slots):
                self._advance_cycle()
            else:
                raise StopIteration

    def _open_pending(self) -> None:
        """Open the pending input element's dataset in the current slot."""
        assert self.pending is not None
        (element,) = self.pending
        position = self.read
        try:
            slot = self._open(element, position, None)
        except StageCrashedError:
            raise  # not read: the pass ends, and its state opens this element again
        except Exception:
            self.pending = None  # its failure is its turn
            self.read += 1
            raise
        self.pending = None
        self.read += 1
        self.slots[self.cycle_index] = slot
        self.slot_origin[self.cycle_index] = position
        self._open_ahead()

    def _take_ahead(self) -> None:
        """Put the first dataset opened ahead in the current slot (or raise its error, its
        turn)."""
        ahead = self.ahead.popleft()
        if ahead.from_input:
            assert ahead.error is not None
            raise ahead.error  # the input goes on after it, as when read in turn
        if ahead.opened is None and ahead.error is None:
            self.pending = (ahead.element,)  # its opening was cut short: opened now
            self._open_pending()
            return
        position = self.read
        self.read += 1
        if ahead.error is not None:
            error, ahead.error = ahead.error, None
            raise error
        self.slots[self.cycle_index] = ahead.opened
        self.slot_origin[self.cycle_index] = position
        self._open_ahead()

    def _open_ahead(self) -> None:
        """Open the next input elements' datasets, up to ``most_ahead``, reading at once."""
        while len(self.ahead) < self.most_ahead and not self.input_done:
            if self.ahead and self.ahead[-1].from_input:
                return  # read on past the input's error only once it is raised
            try:
                element = next(self.input)
            except StopIteration:
                self.input_done = True
                return
            except StageCrashedError:
                raise
            except Exception as e:
                self.ahead.append(Ahead(None, error=e, from_input=True))
                return
            ahead = Ahead(element)
            self.ahead.append(ahead)  # before opening: a Ctrl-C meanwhile keeps its turn
            try:
                opened = self._open(element, self.read + len(self.ahead) - 1, None)
            except StageCrashedError:
                raise
            except Exception as e:
                ahead.error = e
            else:
                ahead.opened = opened
                if isinstance(opened, AsyncStage):
                    opened.start()

    def get_state(self) -> State:
        state = {
            "input_start": self.input_start,
            "read": self.read,
            # Elements read ahead are read again when restored.
            "input_done": self.input_done and not self.ahead,
            "slots": [
                [pos, None if it is None else it.get_state()]
                for pos, it in zip(self.slot_origin, self.slots)
            ],
            "cycle_index": self.cycle_index,
            "block_index": self.block_index,
        }
        return state if self.deterministic else self.choices.state(state)

    def close(self) -> None:
        self.input.close()
        for slot in self.slots:
            if slot is not None:
                slot.close()
        while self.ahead:
            opened = self.ahead.popleft().opened
            if opened is not None:
                opened.close()
        if self.tuned_ahead is not None:
            self.tuned_ahead.close()
        if self.remote is not None:
            self.remote.close()
        self.pending = None
