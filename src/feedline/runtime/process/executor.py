"""What a map-like stage sees of worker processes: ``ProcessExecutor`` (its threads hand it
their chunks, which it runs on the op's ``ProcessPool``) and ``ExecutorSwitch`` (moving the
stage between threads and processes while it runs).

The interleave's counterparts (``SlotPool``, ``RemoteSlots``) are in ``remote.py``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from feedline.errors import StageError
from feedline.runtime import closer
from feedline.runtime.chunks import ChunkExecutor, Failed, RowList, Transform
from feedline.runtime.process.pool import WorkerPool, WorkerProcess, shared_pool
from feedline.runtime.process.shm import Unsendable, cannot_send, unpicklable
from feedline.runtime.process.spawn import pickled_service, start_forkserver_soon
from feedline.runtime.process.worker import Rows, _ChunkService
from feedline.runtime.tunable import PROCESSES, THREADS, Knob

if TYPE_CHECKING:
    from feedline.runtime.context import IterContext


logger = logging.getLogger("feedline")


# A chunk sent to a worker is sized to take about this long. A round trip costs the parent
# ~200 us of CPU (pickling, two pipes, waking threads) and the worker an idle gap, both taken
# from the cores the work needs. Pure-Python work (python_cpu, 2 workers on 2 cores): 10 ms
# chunks ran at 4.2-4.3k elements/s with the parent at 20 us/element; 40 ms at 4.55-4.7k/s
# with the parent at 10 us/element. Chunks start at one element and double, so the first
# results still come early.
CHUNK_SECONDS = 0.04


class ProcessPool(WorkerPool):
    """The pool of a map-like op: dispatcher threads ``submit`` chunks to whichever worker is
    idle.

    Each stage holding the pool wants ``max(1, parallelism)`` workers; the pool keeps the sum
    of those (starting workers as dispatchers need them, stopping extra ones as they come
    back).
    """

    def __init__(self, name: str, service_blob: bytes, call_timeout: float | None = None) -> None:
        super().__init__(name, service_blob)
        # The worker stops a call past its map's timeout; one that ignores the signal (native
        # code) is ended with its worker once the whole chunk is this late.
        self.call_timeout = call_timeout
        self._idle: list[WorkerProcess] = []
        self._starting = 0

    def set_share(self, token: object, workers: int) -> None:
        with self._lock:
            if token not in self._holders:
                return
            self._holders[token] = workers
            extra = self._take_extra_idle()
            self._changed.notify_all()
        for worker in extra:
            self._stop(worker)

    def _wanted(self) -> int:
        """Workers to keep (caller holds the lock): what the holders want; while nobody holds
        the pool, the ones it has, for the next epoch's stage."""
        return sum(self._holders.values()) if self._holders else max(1, len(self._workers))

    def _take_extra_idle(self) -> list[WorkerProcess]:
        """Idle workers beyond those wanted, removed from the pool (caller holds the lock)."""
        extra = []
        while self._idle and len(self._workers) > self._wanted():
            worker = self._idle.pop()
            self._workers.remove(worker)
            extra.append(worker)
        return extra

    def submit(
        self, argument: Any, raw: list[Any], positions: Sequence[int]
    ) -> tuple[list[Any], list[int], float]:
        """Run a chunk on a worker: (outputs, failure indexes, the worker's CPU seconds). An
        element that cannot be pickled fails at its position; the others run."""
        try:
            return self._run_chunk(argument, raw, positions)
        except Unsendable:
            pass
        failed = {i: why for i, e in enumerate(raw) if (why := unpicklable(e)) is not None}
        sendable = [i for i in range(len(raw)) if i not in failed]
        outputs: list[Any] = [None] * len(raw)
        failures: list[int] = []
        cpu = 0.0
        if sendable:
            sent, sent_failures, cpu = self._run_chunk(
                argument, [raw[i] for i in sendable], [positions[i] for i in sendable]
            )
            for i, output in zip(sendable, sent):
                outputs[i] = output
            failures = [sendable[j] for j in sent_failures]
        for i, why in failed.items():
            outputs[i] = Failed(cannot_send(self.name, positions[i], why, "its element"))
        return outputs, sorted(failures + list(failed)), cpu

    def _run_chunk(
        self, argument: Any, raw: list[Any], positions: Sequence[int]
    ) -> tuple[list[Any], list[int], float]:
        worker = self._checkout(positions)
        try:
            outputs, failures, cpu = self.call(worker, (argument, raw, positions), positions)
        finally:
            self._checkin(worker)
        if type(outputs) is Rows:
            outputs = RowList(outputs.stacked)
        for i in failures:
            outputs[i] = Failed(outputs[i].restore())
        return outputs, failures, cpu

    def _checkout(self, positions: Sequence[int]) -> WorkerProcess:
        with self._lock:
            while True:
                error = self._stopped(positions)
                if error is not None:
                    raise error
                if self._idle:
                    return self._idle.pop()
                if len(self._workers) + self._starting < self._wanted():
                    self._starting += 1
                    break
                self._changed.wait()
        return self._start_counted(positions)

    def _start_counted(self, positions: Sequence[int]) -> WorkerProcess:
        """Start a worker the caller counted in ``_starting`` (under the lock)."""
        try:
            return self._start_worker(positions)
        finally:
            with self._lock:
                self._starting -= 1
                self._changed.notify_all()

    def warm(self) -> None:
        """Start the workers the holders want, and return once each has loaded the function:
        a stage can then move its work here without waiting. A pool that breaks or stops
        meanwhile says so to the next ``submit``."""
        started = []
        try:
            while True:
                with self._lock:
                    if self._stopped((0,)) or len(self._workers) + self._starting >= self._wanted():
                        break
                    self._starting += 1
                started.append(self._start_counted((0,)))
            for worker in started:
                self.call(worker, None, (0,))  # answered once the function is loaded
        except StageError:
            pass
        finally:
            for worker in started:
                self._checkin(worker)

    def _checkin(self, worker: WorkerProcess) -> None:
        with self._lock:
            if worker.in_sync and not self._closed and len(self._workers) <= self._wanted():
                self._idle.append(worker)
                self._changed.notify_all()
                return
            if worker in self._workers:
                self._workers.remove(worker)
            self._changed.notify_all()
        self._stop(worker, graceful=worker.in_sync)

    def close(self) -> None:
        super().close()
        with self._lock:
            self._idle.clear()  # stopped with the rest


class ProcessExecutor:
    """A stage's handle on its op's pool: what ``AsyncStage`` calls instead of its transform
    (see ``ChunkExecutor`` in ``runtime/parallel.py``)."""

    chunk_seconds = CHUNK_SECONDS

    def __init__(self, pool: ProcessPool, token: object, argument: Any) -> None:
        self.pool = pool
        self.argument = argument
        self._token = token
        # A stage dropped without close() still lets go of the pool.
        self._release = weakref.finalize(self, closer.from_finalizer, partial(pool.release, token))

    def run(self, raw: list[Any], positions: Sequence[int]) -> tuple[list[Any], list[int], float]:
        if type(raw[0]) is Failed:  # an upstream error: nothing to run
            return raw, [0], 0.0
        return self.pool.submit(self.argument, raw, positions)

    def resize(self, parallelism: int) -> None:
        self.pool.set_share(self._token, max(1, parallelism))

    def warm(self) -> None:
        self.pool.warm()

    def close(self) -> None:
        if self._release.detach() is not None:
            self.pool.release(self._token)


def process_executor(
    ctx: IterContext,
    key: object,
    name: str,
    factory: Callable[[Any], Transform],
    argument: Any,
    call_timeout: float | None = None,
) -> ProcessExecutor:
    """An executor on the pool of op ``key`` in run ``ctx`` (made on first use).

    ``factory(argument)`` makes the chunk transform in a worker; the factory is pickled once
    per pool, and must not change between the stages of one run.
    """
    token = object()
    pool = shared_pool(
        ctx,
        key,
        lambda: ProcessPool(
            name, pickled_service(_ChunkService(factory, name), name), call_timeout
        ),
        token,
    )
    return ProcessExecutor(pool, token, argument)


class SwitchedStage(Protocol):
    """What an ``ExecutorSwitch`` sees of its stage (an ``AsyncStage``)."""

    name: str
    # Where the stage's threads run its chunks: None runs them on the threads themselves.
    executor: ChunkExecutor | None

    @property
    def parallelism(self) -> int: ...


class ExecutorSwitch:
    """A stage's ``executor`` knob: the tuner moves the stage between threads and processes
    while it runs. ``make_executor`` makes the process executor (``process_executor``).

    Processes start beside the threads, which go on with the work until the processes have
    loaded the function: moving image decoding stalled the stage for 0.3-0.5 s (the
    forkserver and the workers starting), a quarter of a 2,000-image pass. The executor is
    made on that thread too: pickling the function while GIL-bound threads run took the
    tuner's thread 0.3 s. The executor a move leaves is closed with the stage, not at once:
    a worker thread may still be running a chunk on it.
    """

    def __init__(self, make_executor: Callable[[], ChunkExecutor]) -> None:
        self._make_executor = make_executor
        self._stage: SwitchedStage | None = None
        self._lock: threading.Lock | None = None  # the stage's, guarding its ``executor``
        self._on_change: Callable[[], None] = lambda: None
        self.knob = Knob("executor", THREADS, THREADS, PROCESSES, True, self._changed)
        self._replaced: list[ChunkExecutor] = []
        # An executor being started (see _changed), and the thread starting it.
        self._warming: ChunkExecutor | None = None
        self._warm_thread: threading.Thread | None = None
        self._closed = False

    def attach(
        self, stage: SwitchedStage, lock: threading.Lock, on_change: Callable[[], None]
    ) -> Knob:
        """Serve ``stage``, whose ``lock`` guards its ``executor``; ``on_change`` follows each
        move of the knob. Returns the knob, for the stage's ``knobs``."""
        self._stage, self._lock, self._on_change = stage, lock, on_change
        return self.knob

    def expect(self) -> None:
        """A move to processes may come: start what it needs (see ``expect_processes``)."""
        if self.knob.tunable:
            start_forkserver_soon()

    def new_executor(self) -> ChunkExecutor | None:
        """A process executor, or None when the function cannot go to processes (the stage
        then stays on threads: the knob is set there for good)."""
        try:
            return self._make_executor()
        except Exception as e:  # an unpicklable function: threads it stays
            logger.info("%s stays on threads: %s", self._attached()[0].name, e)
            cause = e.__cause__ or e  # the pickling error, under the stage's own
            self.knob.refuse(THREADS, f"cannot move to processes: {type(cause).__name__}: {cause}")
            return None

    def resize(self, parallelism: int) -> None:
        """The stage's parallelism changed: the executor being started follows it."""
        warming = self._warming
        if warming is not None:
            warming.resize(parallelism)

    @property
    def threads(self) -> list[threading.Thread]:
        """Threads of this switch, for the stage to join when it closes."""
        return [self._warm_thread] if self._warm_thread is not None else []

    def close(self) -> None:
        """The stage is closing: executors it left and the one being started are closed (the
        stage closes its current one)."""
        _, lock = self._attached()
        with lock:
            self._closed = True
            warming, self._warming = self._warming, None
        for replaced in self._replaced:
            replaced.close()
        if warming is not None:
            warming.close()

    def _attached(self) -> tuple[SwitchedStage, threading.Lock]:
        assert self._stage is not None and self._lock is not None, "attach() comes first"
        return self._stage, self._lock

    def _changed(self) -> None:
        stage, lock = self._attached()
        with lock:
            if self.knob.value == PROCESSES:
                starting = self._warm_thread is not None and self._warm_thread.is_alive()
                if stage.executor is None and self._warming is None and not starting:
                    self._warm_thread = threading.Thread(
                        target=self._start_processes,
                        name=f"feedline-{stage.name}-warm",
                        daemon=True,
                    )
                    self._warm_thread.start()
            else:
                leaving = (stage.executor, self._warming)
                self._replaced += [e for e in leaving if e is not None]
                stage.executor = self._warming = None
        self._on_change()

    def _start_processes(self) -> None:
        stage, lock = self._attached()
        executor = self.new_executor()
        if executor is None:
            return  # the function cannot go to processes: threads it stays (said there)
        with lock:
            wanted = self.knob.value == PROCESSES and not self._closed
            if wanted:
                self._warming = executor
        if not wanted:
            executor.close()
            return
        executor.resize(stage.parallelism)
        try:
            executor.warm()
        except Exception:  # the first chunk sent there raises it again, at its position
            logger.debug("%s: starting worker processes failed", stage.name, exc_info=True)
        with lock:
            if self._warming is executor:  # still wanted
                self._warming = None
                stage.executor = executor
