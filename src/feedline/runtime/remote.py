"""``interleave(executor="process")``: each open slot's dataset lives in a worker process.

An input element goes to a worker, which calls the interleave's function on it and iterates the
dataset that returns; the parent only interleaves the elements that come back. A slot stays on
the worker that opened it (its iterator lives there); several slots may share a worker, which
answers their requests in turn.

- ``RemoteIterator`` stands for one slot in the parent: a node iterator whose ``next_chunk``
  asks the slot's worker for elements. Each reply also carries the slot's state after them, so
  ``get_state`` needs no round trip. That state is the dataset iterator's own, as on threads:
  a saved state reopens the slot on any worker (or, read ahead, on a thread).
- ``SlotPool``: the workers of one interleave in one run. Starting them, keeping them across
  ``repeat`` epochs, stopping them and telling a dead one apart are ``runtime/process.py``'s.
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
from typing import Any

from feedline.errors import StageError
from feedline.options import Options, ResolvedOptions
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, NodeIterator, State
from feedline.runtime.process import (
    ExportedError,
    WorkerPool,
    WorkerProcess,
    pickled_service,
    shared_pool,
)

# Makes a slot's iterator in a worker: (input element, its position, context, saved state or
# None) -> the iterator of the dataset the interleave's function returns for the element.
Opener = Callable[[Any, int, IterContext, State | None], NodeIterator]
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


class SlotService:
    """A worker's side: the iterators of the slots given to it, each in a context of its own.

    A slot that ends, or fails to open, is dropped at once.
    """

    def __init__(self, opener: Opener, options: Options) -> None:
        self.opener = opener
        self.options = options
        self._slots: dict[int, tuple[NodeIterator, IterContext]] = {}

    def __call__(self, request: Request) -> Reply:
        drops, slot, opening, max_n = request
        for dropped in drops:
            self._drop(dropped)
        if opening is not None:
            element, position, state = opening
            ctx = IterContext(self.options)
            try:
                it = self.opener(element, position, ctx, state)
            except Exception as e:
                ctx.close()
                return [], ExportedError(e), None
            self._slots[slot] = (it, ctx)
            return [], None, it.get_state()
        it, _ = self._slots[slot]
        try:
            elements = it.next_chunk(max_n)
        except Exception as e:
            return [], ExportedError(e), it.get_state()
        state = it.get_state()
        if not elements:
            self._drop(slot)
        return elements, None, state

    def _drop(self, slot: int) -> None:
        # Absent when only the reply to its opening failed: the parent drops it to be sure.
        it, ctx = self._slots.pop(slot, (None, None))
        if it is not None and ctx is not None:
            with contextlib.suppress(Exception):  # its errors have no one to go to
                it.close()
            ctx.close()


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
        return self._request(worker, ([], slot, (element, position, state), 0), position)

    def read(self, worker: WorkerProcess, slot: int, position: int, max_n: int) -> Reply:
        # Drops go with reads only: a read cannot fail to be sent (an opening's element can).
        with self._lock:
            drops, self._drops[worker] = self._drops[worker], []
        return self._request(worker, (drops, slot, None, max_n), position)

    def _request(self, worker: WorkerProcess, request: Request, position: int) -> Reply:
        try:
            reply: Reply = self.call(worker, request, [position])
        finally:
            if not worker.in_sync:
                # A message cut short (say, by Ctrl-C): the pipe is unusable, and with it the
                # slots that live on this worker.
                self.close()
        return reply

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

    Opening it runs the function there, so its errors are raised here, as on threads. A
    failure of the worker itself (it died, or its elements could not come back) is raised
    again on every later call, as by a stage on threads whose worker crashed.
    """

    def __init__(self, pool: SlotPool, element: Any, position: int, state: State | None) -> None:
        self._pool = pool
        self._position = position
        self._worker, self._slot = pool.place(position)
        self._done = False  # ended, failed to open, or closed: nothing more to ask its worker
        self._failure: StageError | None = None
        try:
            _, error, opened = pool.open(self._worker, self._slot, element, position, state)
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
        except StageError as e:
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
        # An iterator dropped without close() still lets go of the pool.
        self._release = weakref.finalize(self, pool.release, token)

    def open(self, element: Any, position: int, state: State | None) -> RemoteIterator:
        return RemoteIterator(self.pool, element, position, state)

    def close(self) -> None:
        self._release()


def remote_slots(
    ctx: IterContext, key: object, name: str, opener: Opener, workers: int
) -> RemoteSlots:
    """A hold on the pool of interleave op ``key`` in run ``ctx``: up to ``workers`` processes,
    which make slots' iterators with ``opener`` (pickled once per pool)."""
    token = object()
    service = SlotService(opener, worker_options(ctx.options))
    pool = shared_pool(
        ctx, key, lambda: SlotPool(name, pickled_service(service, name), workers), token
    )
    return RemoteSlots(pool, token)
