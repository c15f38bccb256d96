"""The parent's side: worker processes and their pools.

- One pool per op in one run (a top-level iterator): the stages ``repeat`` makes for each
  epoch share it, so workers start once per iterator. A pool nobody holds lingers for
  ``LINGER_SECONDS`` (long enough for ``repeat``'s next epoch to take it back), then stops.
- Requests to one worker are answered one at a time, in order. An element or a result that
  cannot be pickled fails at its position, as a ``StageError`` wrapping the pickling error;
  the others go on.
- A worker that dies (killed, segfault, out of memory) breaks its pool: the stage fails with
  a ``StageCrashedError`` naming the positions of the chunk it was running, and every worker
  is stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, TypeVar, cast

from feedline.errors import StageCrashedError, StageError
from feedline.runtime.machine import rss_of
from feedline.runtime.process.shm import (
    _SHARED_MEMORY,
    ReplySegments,
    _load,
    _pack,
    _post,
    _read,
)
from feedline.runtime.process.spawn import _context, _main_not_reimported
from feedline.runtime.process.worker import _worker_main

if TYPE_CHECKING:
    from feedline.runtime.context import IterContext


logger = logging.getLogger("feedline")


# How long a pool nobody holds keeps its workers, waiting for the next epoch's stage.
LINGER_SECONDS = 0.5
# Worker memory is sampled at most this often (reading it costs a system call per worker).
RSS_SAMPLE_SECONDS = 0.5
# How long a worker asked to stop may take before it is terminated, then killed.
STOP_SECONDS = 2.0
# Past a chunk's calls' timeouts, how long a worker may take to stop them and reply.
OVERDUE_GRACE_SECONDS = 2.0


class WorkerProcess:
    """One worker process and the parent's end of its pipe. ``lock`` keeps one request at a
    time on the pipe; ``in_sync`` is False once a message was cut short (the pipe cannot be
    used again)."""

    __slots__ = ("conn", "in_sync", "lock", "process", "replies", "status_lock")

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.lock = threading.Lock()
        self.in_sync = True
        self.replies = ReplySegments()
        # One thread at a time reads the process's exit status. The forkserver hands it over
        # once, through a pipe: a second thread reading at the same time finds the pipe
        # closed, and multiprocessing then sets the status to 255, over the one the first
        # read (a worker killed by SIGKILL was reported as "exited with code 255").
        self.status_lock = threading.Lock()

    def join(self, timeout: float | None = None) -> None:
        with self.status_lock:
            self.process.join(timeout)

    def is_alive(self) -> bool:
        with self.status_lock:
            return bool(self.process.is_alive())

    def exitcode(self) -> int | None:
        with self.status_lock:
            code: int | None = self.process.exitcode
            return code


def _how_it_ended(worker: WorkerProcess) -> str:
    code = worker.exitcode()
    if code is None:
        return "closed its pipe"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = {
        "SIGKILL": " (killed, e.g. by the out-of-memory killer)",
        "SIGSEGV": " (a crash in native code)",
    }.get(name, "")
    return f"was killed by {name}{hint}"


def _span(positions: Sequence[int]) -> str:
    first, last = positions[0], positions[-1]
    return f"{first}" if first == last else f"{first}..{last} ({len(positions)} elements)"


_WORKER_PREFIX = "feedline-"


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a daemonic process (a torch DataLoader worker) start workers.

    multiprocessing refuses children to a daemonic process, which is killed without reaping
    them; feedline's workers need no reaping: each ends as soon as its parent does
    (``worker._end_with_parent``), and the daemon's exit stops them first anyway."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemon = config.get("daemon", False)
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = daemon


class WorkerPool:
    """Worker processes for one op in one run, all running the service pickled in
    ``service_blob``; subclasses decide which worker runs what.

    Stages (or iterators) ``acquire`` the pool and ``release`` it; it stops when nobody has held
    it for ``LINGER_SECONDS``. A worker that dies breaks the pool: every request then fails with
    the ``StageCrashedError`` saying which worker died running what, and every worker is
    stopped.
    """

    def __init__(self, name: str, service_blob: bytes) -> None:
        # Only feedline's own workers (named so below) may not start more: another library's
        # daemonic process (a torch DataLoader worker) may, see ``_children_allowed``.
        if multiprocessing.current_process().name.startswith(_WORKER_PREFIX):
            raise StageError(
                name,
                None,
                "a worker process cannot start worker processes of its own (executor='process' "
                "inside an interleave with executor='process'); use executor='thread' here",
            )
        self.name = name
        self._blob = service_blob
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._workers: list[WorkerProcess] = []  # alive
        self._busy: set[WorkerProcess] = set()  # in the middle of a request
        self._holders: dict[object, int] = {}  # by holder token: workers it wants
        self._linger: threading.Timer | None = None
        self._closed = False
        self.broken: StageCrashedError | None = None
        self.starts = 0  # worker processes started, over the pool's life
        self._rss = 0
        self._rss_at = -float("inf")
        _live_pools.add(self)

    # -- holders -----------------------------------------------------------------------------

    def acquire(self, token: object) -> bool:
        """Hold the pool; False when it has stopped (make a new one)."""
        with self._lock:
            if self._closed:
                return False
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            self._holders[token] = 1
            return True

    def release(self, token: object) -> None:
        with self._lock:
            if self._holders.pop(token, None) is None or self._holders or self._closed:
                return
            # Keep the workers a moment: repeat's next epoch takes the pool right back.
            self._linger = threading.Timer(LINGER_SECONDS, self._close_if_unheld)
            self._linger.name = f"feedline-{self.name}-linger"
            self._linger.daemon = True
            self._linger.start()

    def _close_if_unheld(self) -> None:
        with self._lock:
            if self._holders or self._closed:
                return
        self.close()

    # -- work --------------------------------------------------------------------------------

    def call(self, worker: WorkerProcess, request: Any, positions: Sequence[int]) -> Any:
        """Send ``request`` to ``worker`` and return the service's reply; ``positions`` (of
        the elements it is about) go into the errors. ``Unsendable`` (and nothing sent) when
        the request cannot be pickled; ``StageCrashedError`` when the worker died or its reply
        could not be read."""
        with worker.lock:
            with self._lock:
                error = self._stopped(positions)
                if error is not None:
                    raise error
                self._busy.add(worker)
            try:
                returned = worker.replies.returned()
                try:
                    message = _pack(request, _SHARED_MEMORY, keys=returned)
                except BaseException:
                    worker.replies.give_back(returned)  # with the next request, then
                    raise
                try:
                    worker.in_sync = False
                    _post(worker.conn, message)
                    self._await_reply(worker, positions)
                    header, body, fds = _read(worker.conn)
                    worker.in_sync = True
                except (EOFError, OSError):
                    raise self._lost(worker, positions) from None
                except BaseException:
                    if not worker.in_sync:  # cut short (say, by Ctrl-C): the pipe is unusable
                        self._cut_short(worker)
                    raise
                try:
                    # Still busy: a worker stopped meanwhile lets go of its segments after this.
                    reply = _load(header, body, fds, replies=worker.replies)
                except Exception as e:  # say, an object of a class the parent cannot import
                    raise StageCrashedError(
                        self.name,
                        positions[0],
                        f"a reply from a worker process could not be loaded "
                        f"({type(e).__name__}: {e})",
                    ) from e
            finally:
                with self._lock:
                    self._busy.discard(worker)
        if reply[0] == "error":  # not the function's (its errors are per element): the worker's
            raise StageCrashedError(
                self.name, positions[0], f"a worker process failed:\n{reply[1]}"
            ) from None
        return reply[1]

    def _cut_short(self, worker: WorkerProcess) -> None:
        """An exchange with ``worker`` was cut short (called before anyone else can use it).
        A map-like pool stops it once checked in; see ``SlotPool`` for the other."""

    def _stopped(self, positions: Sequence[int]) -> StageCrashedError | None:
        """Why the pool cannot run ``positions``, if it has stopped (caller holds the lock)."""
        if self.broken is not None:
            return self.broken
        if self._closed:
            return StageCrashedError(self.name, positions[0], "its worker processes were stopped")
        return None

    def _start_worker(self, positions: Sequence[int]) -> WorkerProcess:
        """A new worker, in the pool; the pool's error if it stopped while the worker started
        (for ``positions``)."""
        ctx = _context()
        parent_end, child_end = ctx.Pipe()
        process = ctx.Process(
            target=_worker_main,
            args=(child_end, self._blob, os.getpid()),
            name=f"{_WORKER_PREFIX}{self.name}",
            daemon=True,
        )
        try:
            with _main_not_reimported(), _children_allowed():
                process.start()
        except Exception as e:  # say, no more processes allowed
            parent_end.close()
            raise StageCrashedError(
                self.name,
                positions[0],
                f"could not start a worker process ({type(e).__name__}: {e})",
            ) from e
        finally:
            child_end.close()  # the worker holds its end: its death is an EOF here
        worker = WorkerProcess(process, parent_end)
        with self._lock:
            self.starts += 1
            error = self._stopped(positions)
            if error is None:
                self._workers.append(worker)
                return worker
        self._stop(worker)
        raise error

    def _work_of(self, worker: WorkerProcess, positions: Sequence[int]) -> str:
        """What ``worker`` was doing, for the error when it dies (caller holds the lock)."""
        return f"given the elements at positions {_span(positions)}"

    call_timeout: float | None = None

    def _await_reply(self, worker: WorkerProcess, positions: Sequence[int]) -> None:
        """Kill a worker whose calls went on past their timeout without being stopped."""
        if self.call_timeout is None:
            return
        allowed = self.call_timeout * len(positions) + OVERDUE_GRACE_SECONDS
        if not worker.conn.poll(allowed):
            logger.warning(
                "%s: worker process %s went %.3g s past the timeout of its calls (%s); killed",
                self.name,
                worker.process.pid,
                allowed,
                self._work_of(worker, positions),
            )
            worker.process.kill()

    def _lost(self, worker: WorkerProcess, positions: Sequence[int]) -> StageCrashedError:
        """The error for a worker that died while running ``positions``; breaks the pool."""
        worker.join(STOP_SECONDS)
        with self._lock:
            stopped = self._stopped(positions)
            if stopped is not None:  # stopped on purpose, or after another worker died
                return stopped
            self.broken = StageCrashedError(
                self.name,
                positions[0],
                f"worker process {worker.process.pid} {_how_it_ended(worker)}; "
                f"it was {self._work_of(worker, positions)}",
            )
            broken = self.broken
        self.close()
        return broken

    # -- shutdown ----------------------------------------------------------------------------

    def _stop(self, worker: WorkerProcess, graceful: bool = True) -> None:
        """Stop one worker: an idle one exits when its pipe closes; a busy one is killed."""
        if graceful:
            worker.conn.close()
            worker.join(STOP_SECONDS)
        if worker.is_alive():
            worker.process.terminate()
            worker.join(STOP_SECONDS)
        if worker.is_alive():
            worker.process.kill()
            worker.join()
        worker.conn.close()
        worker.replies.close()

    def close(self) -> None:
        """Stop every worker (busy ones are terminated)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._blob = b""  # the pickled function may be large (a closure over data)
            if self._linger is not None:
                self._linger.cancel()
            busy = [w for w in self._workers if w in self._busy]
            idle = [w for w in self._workers if w not in self._busy]
            self._workers = busy  # their callers wake with an EOF
            self._changed.notify_all()
        for worker in busy:
            worker.process.terminate()
        for worker in idle:
            self._stop(worker)
        for worker in busy:
            worker.join(STOP_SECONDS)
            if worker.is_alive():
                worker.process.kill()
                worker.join()
        _live_pools.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- observation -------------------------------------------------------------------------

    def rss_bytes(self) -> int:
        """Resident memory of the workers, sampled at most every ``RSS_SAMPLE_SECONDS``."""
        now = time.monotonic()
        if now - self._rss_at >= RSS_SAMPLE_SECONDS:
            self._rss_at = now
            with self._lock:
                pids = [w.process.pid for w in self._workers]
            self._rss = sum(rss_of(pid) for pid in pids)
        return self._rss

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers]


# Pools by run and op. Weak keys: a finished run's entries go with it.
_pools: weakref.WeakKeyDictionary[IterContext, dict[object, WorkerPool]] = (
    weakref.WeakKeyDictionary()
)
# Reentrant: a dropped iterator collected by the garbage collector (at any allocation, in this
# thread too, say while a pool is made under this lock) closes its run's pools.
_pools_lock = threading.RLock()
# Every pool not yet closed, so that exiting the interpreter stops their workers first.
_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_live_pools):
        pool.close()


Pool = TypeVar("Pool", bound=WorkerPool)


def shared_pool(
    ctx: IterContext, key: object, make_pool: Callable[[], Pool], token: object
) -> Pool:
    """The pool of op ``key`` in run ``ctx``, held by ``token``: made on first use, and anew
    when the previous one has stopped. ``make_pool`` must make the same kind of pool (with the
    same service) every time for one op."""
    with _pools_lock:
        if ctx not in _pools:
            # The run's end closes its pools at once (stages closing between epochs let them
            # linger instead, for the next epoch's stage).
            ctx.on_close(lambda: _close_pools_of(ctx))
        pools = _pools.setdefault(ctx, {})
        pool = pools.get(key)
        if pool is None or not pool.acquire(token):
            pool = make_pool()
            pool.acquire(token)
            pools[key] = pool
            ctx.add_worker_pool(pool)
    return cast(Pool, pool)


def _close_pools_of(ctx: IterContext) -> None:
    with _pools_lock:
        pools = _pools.pop(ctx, {})
    for pool in pools.values():
        pool.close()
