"""``interleave(executor="process")``: each open slot's dataset lives in a worker process.

An input element goes to a worker, which calls the interleave's function on it and iterates the
dataset that returns; the parent only interleaves the elements that come back. A slot stays on
the worker that opened it (its iterator lives there); several slots may share a worker, which
answers their requests in turn.

- ``RemoteIterator`` stands for one slot in the parent: a stage iterator whose ``next_chunk``
  asks the slot's worker for elements. Each reply also carries the slot's state after them, so
  ``get_state`` needs no round trip. That state is the dataset iterator's own, as on threads:
  a saved state reopens the slot on any worker (or, read ahead, on a thread).
- ``SlotPool``: the workers of one interleave in one run. Starting them, keeping them across
  ``repeat`` epochs, stopping them and telling a dead one apart are ``pool.py``'s.
- ``SlotService``: a worker's side. The datasets run untuned, in contexts of the worker's own:
  AUTOTUNE stages inside them run inline, maps on threads (a worker process cannot start worker
  processes of its own), explicit ``num_parallel_calls`` on that many threads.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from feedline.errors import StageCrashedError
from feedline.options import Options, ResolvedOptions
from feedline.runtime import closer
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, StageIterator, State
from feedline.runtime.process.pool import WorkerPool, WorkerProcess, shared_pool
from feedline.runtime.process.shm import Unsendable, cannot_send, unpicklable
from feedline.runtime.process.spawn import pickled_service
from feedline.runtime.process.worker import ExportedError

# Makes a slot's iterator in a worker: (input element, its position, context, saved state or
# None) -> the iterator of the dataset the interleave's function returns for the element.
Opener = Callable[[Any, int, IterContext, State | None], StageIterator]
# To a worker: (slots to drop, slot, (input element, position, saved state) to open it, or
# None to read up to max_n elements from it, max_n).
Request = tuple[list[int], int, tuple[Any, int, State | None] | None, int]
# A worker's reply: (elements, the error met instead, the slot's state after them).
Reply = tuple[list[Any], ExportedError | None, State | None]


def worker_options(options: ResolvedOptions) -> Options:
    """What slots' datasets run with in a worker: the run's ordering, threads, and no tuning.
    AUTOTUNE stages start inline when tuning is on; with no tuner in a worker, and no room to
    grow, they stay there."""
    worker = Options(deterministic=options.deterministic, executor="thread")
    worker.autotune.enabled = True
    worker.autotune.max_parallelism = 0
    return worker


class _Slot:
    """A slot in a worker: its iterator and context, what opened it, the state after what
    the parent has of it, and an error held for the parent's next read (with the state
    after it)."""

    __slots__ = ("ctx", "element", "held", "it", "position", "state")

    def __init__(self, it: StageIterator, ctx: IterContext, element: Any, position: int) -> None:
        self.it = it
        self.ctx = ctx
        self.element = element
        self.position = position
        self.state = it.get_state()
        self.held: tuple[ExportedError, State] | None = None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # its errors have no one to go to
            self.it.close()
        self.ctx.close()


class SlotService:
    """A worker's side: the iterators of the slots given to it, each in a context of its own.

    A slot that ends, or fails to open, is dropped at once. ``name``: the interleave's.
    """

    def __init__(self, opener: Opener, options: Options, name: str) -> None:
        self.opener = opener
        self.options = options
        self.name = name
        self._slots: dict[int, _Slot] = {}
        self._reading: tuple[_Slot, State] | None = None  # this request's slot, state before

    def __call__(self, request: Request) -> Reply:
        drops, slot, opening, max_n = request
        for dropped in drops:
            self._drop(dropped)
        self._reading = None
        if opening is not None:
            element, position, state = opening
            try:
                opened = self._open(element, position, state)
            except Exception as e:
                return [], ExportedError(e), None
            self._slots[slot] = opened
            return [], None, opened.state
        current = self._slots[slot]
        if current.held is not None:
            return self._give_held(current)
        self._reading = (current, current.state)
        try:
            elements = current.it.next_chunk(max_n)
        except Exception as e:
            current.state = current.it.get_state()
            return [], ExportedError(e), current.state
        current.state = current.it.get_state()
        if not elements:
            self._drop(slot)
        return elements, None, current.state

    def _open(self, element: Any, position: int, state: State | None) -> _Slot:
        ctx = IterContext(self.options, in_order=True)
        try:
            return _Slot(self.opener(element, position, ctx, state), ctx, element, position)
        except BaseException:
            ctx.close()
            raise

    def unsendable(self, reply: Reply, error: Exception) -> Reply:
        """Some element read could not be pickled. The read went past them all, and its state
        comes after the last: read the slot again from where the read started, an element at
        a time. Those before the first that cannot be pickled go now, its error with the next
        read, each with the state right after it, so that a restore resumes exactly there."""
        assert self._reading is not None, "only elements read from a slot can fail to pickle"
        current, state = self._reading
        elements, _, _ = reply
        current.close()
        reopened = self._open(current.element, current.position, state)
        current.it, current.ctx = reopened.it, reopened.ctx
        good: list[Any] = []
        while len(good) < len(elements):
            got = current.it.next_chunk(1)
            if not got:
                break
            why = unpicklable(got[0])
            if why is not None:
                failure = cannot_send(self.name, current.position, why, "an element of its dataset")
                current.held = (ExportedError(failure), current.it.get_state())
                break
            good.append(got[0])
            state = current.it.get_state()
        current.state = state
        if not good and current.held is not None:  # the first one failed: its error now
            return self._give_held(current)
        return good, None, state

    @staticmethod
    def _give_held(current: _Slot) -> Reply:
        assert current.held is not None
        error, current.state = current.held
        current.held = None
        return [], error, current.state

    def _drop(self, slot: int) -> None:
        # Absent when only the reply to its opening failed: the parent drops it to be sure.
        dropped = self._slots.pop(slot, None)
        if dropped is not None:
            dropped.close()


class SlotPool(WorkerPool):
    """The workers of one interleave in one run. A new slot goes to the worker with the fewest
    open, or to a new worker while there are fewer than ``size``."""

    def __init__(self, name: str, service_blob: bytes, size: int) -> None:
        super().__init__(name, service_blob)
        self.size = size
        self._slot_ids = itertools.count()
        # Per worker: the input position of each open slot, by slot id.
        self._positions: dict[WorkerProcess, dict[int, int]] = {}
        # Per worker: slots closed before their end, dropped there with its next read.
        self._drops: dict[WorkerProcess, list[int]] = {}
        self._placing = threading.Lock()

    def place(self, position: int) -> tuple[WorkerProcess, int]:
        """The worker for a new slot (of the input element at ``position``) and its id."""
        with self._placing:
            with self._lock:
                error = self._stopped([position])
                if error is not None:
                    raise error
                worker = None
                if len(self._workers) >= self.size:
                    worker = min(self._workers, key=lambda w: len(self._positions[w]))
            if worker is None:
                worker = self._start_worker([position])
            with self._lock:
                slot = next(self._slot_ids)
                self._positions.setdefault(worker, {})[slot] = position
                self._drops.setdefault(worker, [])
        return worker, slot

    def open(
        self, worker: WorkerProcess, slot: int, element: Any, position: int, state: State | None
    ) -> Reply:
        reply: Reply = self.call(worker, ([], slot, (element, position, state), 0), [position])
        return reply

    def read(self, worker: WorkerProcess, slot: int, position: int, max_n: int) -> Reply:
        # Drops go with reads only: a read cannot fail to be sent (an opening's element can).
        with self._lock:
            drops, self._drops[worker] = self._drops[worker], []
        reply: Reply = self.call(worker, (drops, slot, None, max_n), [position])
        return reply

    def _cut_short(self, worker: WorkerProcess) -> None:
        # The slots that live on the worker go with its pipe: the pass cannot go on.
        self.close()

    def forget(self, worker: WorkerProcess, slot: int, drop: bool) -> None:
        """The slot is done with; ``drop``: the worker may still hold it."""
        with self._lock:
            self._positions[worker].pop(slot, None)
            if drop and not self._closed:
                self._drops[worker].append(slot)

    def _work_of(self, worker: WorkerProcess, positions: Sequence[int]) -> str:
        listed = ", ".join(str(p) for p in sorted(self._positions.get(worker, {}).values()))
        return f"reading the datasets of the input elements at positions {listed}"


class RemoteIterator(ChunkedIterator):
    """One interleave slot whose dataset is iterated in a worker process.

    Opening it runs the function there, so its errors are raised here, as on threads; so are
    those of elements that cannot be pickled, each at its turn. A failure of the worker itself
    (it died, or a reply could not be read) is a ``StageCrashedError``, raised again on every
    later call: the slot can produce no more.
    """

    def __init__(self, pool: SlotPool, element: Any, position: int, state: State | None) -> None:
        self._pool = pool
        self._position = position
        self._worker, self._slot = pool.place(position)
        self._done = False  # ended, failed to open, or closed: nothing more to ask its worker
        self._failure: StageCrashedError | None = None
        try:
            _, error, opened = pool.open(self._worker, self._slot, element, position, state)
        except Unsendable as e:  # nothing was sent: a failure of this element alone
            self._let_go(drop=False)
            raise cannot_send(pool.name, position, e.error, "its element") from e.error
        except BaseException:
            self.close()  # the worker may have opened it: only the reply failed
            raise
        if error is not None:
            self._let_go(drop=False)
            raise error.restore()
        self._state = opened

    def next_chunk(self, max_n: int) -> list[Any]:
        if self._failure is not None:
            raise self._failure.with_traceback(None)
        if self._done:
            return []
        try:
            elements, error, self._state = self._pool.read(
                self._worker, self._slot, self._position, max_n
            )
        except StageCrashedError as e:
            self._failure = e
            raise
        if error is not None:
            raise error.restore()
        if not elements:
            self._let_go(drop=False)  # the worker dropped it at its end
        return elements

    def get_state(self) -> State:
        assert self._state is not None
        return self._state

    def _let_go(self, drop: bool) -> None:
        if not self._done:
            self._done = True
            self._pool.forget(self._worker, self._slot, drop)

    def close(self) -> None:
        self._let_go(drop=True)


class RemoteSlots:
    """An interleave iterator's hold on its op's pool: it opens slots there until closed."""

    def __init__(self, pool: SlotPool, token: object) -> None:
        self.pool = pool
        self._token = token
        # An iterator dropped without close() still lets go of the pool.
        self._release = weakref.finalize(self, closer.from_finalizer, partial(pool.release, token))

    def open(self, element: Any, position: int, state: State | None) -> RemoteIterator:
        return RemoteIterator(self.pool, element, position, state)

    def close(self) -> None:
        if self._release.detach() is not None:
            self.pool.release(self._token)


def remote_slots(
    ctx: IterContext, key: object, name: str, opener: Opener, workers: int
) -> RemoteSlots:
    """A hold on the pool of interleave op ``key`` in run ``ctx``: up to ``workers`` processes,
    which make slots' iterators with ``opener`` (pickled once per pool)."""
    token = object()
    service = SlotService(opener, worker_options(ctx.options), name)
    pool = shared_pool(
        ctx, key, lambda: SlotPool(name, pickled_service(service, name), workers), token
    )
    return RemoteSlots(pool, token)
