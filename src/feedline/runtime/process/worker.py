"""What runs in a worker process: its loop (``_worker_main``), the chunk service of map-like
stages, its heap kept for the next chunk, errors on their way back to the parent, and its end
with the parent's (a worker ends as soon as its parent is gone, even in the middle of a
request).

Results of one shape are stacked in the worker straight into a reply segment (``Rows``), and
a ``batch`` right after the map takes whole batches as slices of it
(``AsyncStage.next_block``): no copy in the parent at all.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from feedline.errors import StageError
from feedline.runtime.chunks import Transform, element_nbytes
from feedline.runtime.process.shm import (
    _SHARED_MEMORY,
    ReplyArena,
    Unsendable,
    _load,
    _pack,
    _post,
    _read,
    cannot_send,
    unpicklable,
)
from feedline.runtime.process.spawn import Service
from feedline.runtime.timeouts import stop_calls_in_this_process
from feedline.structure import sole_type

if TYPE_CHECKING:
    pass


# This process's reply segments and heap, when it is a worker.
_arena: ReplyArena | None = None
_heap: WorkerHeap | None = None

# glibc malloc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from a worker's heap: glibc's own ceiling for the threshold it
# adapts by itself (which it stops adapting once a worker sets the trim threshold).
HEAP_BLOCK_MAX = 32 * 2**20
# A worker keeps at most this much freed memory in its heap.
HEAP_KEEP_MAX = 256 * 2**20


class WorkerHeap:
    """How much freed memory a worker keeps for its next chunk instead of returning it.

    A worker holds a chunk's results until they are sent, then frees them all at once. By
    default glibc returns freed memory at the top of the heap beyond twice the largest block
    it has seen (1.2 MB for 600 KB images), so the next chunk grows the heap again, page
    faults and zeroing included: image decoding on two workers spent 0.4-0.6 cores in the
    kernel, against 0.07 for the same loop in two plain processes. Kept: up to twice what
    the largest chunk's results held (so a worker stays near the peak each chunk reaches
    anyway, and a large one-off allocation, such as loading a file, is still returned).
    glibc only (``mallopt``): written here with ctypes, as no maintained package wraps it;
    elsewhere nothing changes."""

    def __init__(self, mallopt: Callable[[int, int], int]) -> None:
        self._mallopt = mallopt
        self._kept = 0

    @classmethod
    def of_this_process(cls) -> WorkerHeap | None:
        try:
            import ctypes

            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
            return None
        if not mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_MAX):
            return None
        return cls(mallopt)

    def hold(self, nbytes: int) -> None:
        """A chunk's results held ``nbytes``."""
        keep = min(HEAP_KEEP_MAX, 2 * nbytes)
        if keep > self._kept:
            self._kept = keep
            self._mallopt(_M_TRIM_THRESHOLD, keep)


def _worker_main(conn: Connection, service_blob: bytes, parent_pid: int) -> None:
    """A worker's loop: receive a request, send back what the service replies; end when the
    parent closes the pipe or is gone."""
    # Ctrl-C reaches the whole process group; the parent decides what stops, and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_calls_in_this_process()
    _end_with_parent(conn, parent_pid)
    global _arena, _heap
    _heap = WorkerHeap.of_this_process()
    if _SHARED_MEMORY:
        _arena = ReplyArena()
    service: Service | None = None
    load_error = ""
    try:
        service = pickle.loads(service_blob)
    except Exception:
        load_error = "could not load the function:\n" + traceback.format_exc()
    del service_blob
    while True:
        try:
            header, body, fds = _read(conn)
        except (EOFError, OSError):
            return  # the parent closed the pipe (stop), or is gone
        try:
            # Elements that cannot be unpickled here (say, of a class only the parent has) are
            # an error reply like any other: the whole message was read by then.
            request = _load(header, body, fds, arena=_arena)
            del body
            if service is None:
                raise RuntimeError(load_error)
            # None: the parent asks whether the function is loaded (it is).
            reply = None if request is None else service(request)
            del request  # the elements it carried: not kept while the reply is sent
            try:
                message = _pack(("ok", reply), _SHARED_MEMORY, _arena)
            except Unsendable as e:
                message = _pack(("ok", service.unsendable(reply, e.error)), _SHARED_MEMORY, _arena)
            del reply
        except Exception:
            message = _pack(("error", traceback.format_exc()), False, _arena)
        try:
            _post(conn, message)
        except OSError:
            return  # the parent is gone: what the reply held goes with this process
        del message  # nor the reply while waiting for the next request


def _end_with_parent(conn: Connection, parent_pid: int) -> None:
    """End this process as soon as its parent is gone, or has closed the pipe, even in the
    middle of a request: a worker must not run on (nor hold its memory) for a parent that
    stopped it or was killed. Watched from a thread: the pipe's hang-up (the parent's end
    closed) and, where the kernel has pidfds, the parent's exit itself (its end of the pipe
    may live on in a process it forked)."""
    if not hasattr(select, "poll"):  # Windows: the pipe's end tells, once the call returns
        return
    poller = select.poll()
    # Hang-ups only (always reported): the requests on the pipe stay for the main thread.
    poller.register(conn.fileno(), getattr(select, "POLLRDHUP", 0))
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(0)  # gone already
    except (AttributeError, OSError):  # no pidfds here (not Linux, or too old): the pipe tells
        pass
    else:
        poller.register(pidfd, select.POLLIN)

    def watch() -> None:
        while not poller.poll():
            pass
        os._exit(0)

    threading.Thread(target=watch, name="feedline-parent-watch", daemon=True).start()


class _ChunkService:
    """A map-like stage's work in a worker: requests are (argument, elements, positions), and
    ``factory(argument)`` makes the chunk transform (for random_map the argument is the pass's
    random key, so one pickled function serves every epoch). ``name``: the stage's."""

    def __init__(self, factory: Callable[[Any], Transform], name: str) -> None:
        self.factory = factory
        self.name = name
        self._argument: Any = None
        self._transform: Transform | None = None
        self._positions: Sequence[int] = ()  # of the request being answered

    def __call__(self, request: tuple[Any, list[Any], Sequence[int]]) -> Any:
        argument, raw, positions = request
        self._positions = positions
        if self._transform is None or argument != self._argument:
            self._argument = argument
            self._transform = self.factory(argument)
        started = time.process_time()
        outputs, failures = self._transform(raw, positions)
        for i in failures:
            outputs[i] = ExportedError(outputs[i].error)
        if _heap is not None and outputs:
            _heap.hold(element_nbytes(outputs[0]) * len(outputs))
        return (
            as_rows(outputs) if not failures else outputs,
            failures,
            time.process_time() - started,
        )

    def unsendable(self, reply: Any, error: Exception) -> Any:
        """Each result that cannot be pickled fails at its position; the others go."""
        outputs, failures, cpu = reply
        assert type(outputs) is list, "stacked Rows hold plain arrays, which always pickle"
        failed = set(failures)
        for i, output in enumerate(outputs):
            why = None if i in failed else unpicklable(output)
            if why is not None:
                position = self._positions[i]
                outputs[i] = ExportedError(cannot_send(self.name, position, why, "its result"))
                failed.add(i)
        return outputs, sorted(failed), cpu


class Rows:
    """Arrays of one shape and dtype sent as one stacked array: the parent unpickles (and maps,
    for large ones) a single buffer instead of one per element, and gets the elements back as
    views of it. Python-level work per element is what the parent cannot spread over cores,
    so this is where it saves: ~2 us per element of parent CPU for 1 KiB arrays (python_cpu)."""

    __slots__ = ("stacked",)

    def __init__(self, stacked: Any) -> None:
        self.stacked = stacked


def as_rows(outputs: list[Any]) -> list[Any] | Rows:
    """``outputs`` as ``Rows`` when they are plain arrays of one shape and dtype."""
    if len(outputs) < 2 or sole_type(outputs) is not np.ndarray:
        return outputs
    first = outputs[0]
    shape, dtype = first.shape, first.dtype
    if (
        not shape
        or dtype.hasobject
        or not all(a.shape == shape and a.dtype == dtype for a in outputs)
    ):
        return outputs
    stacked = (
        np.empty((len(outputs), *shape), dtype)
        if _arena is None
        else _arena.empty((len(outputs), *shape), dtype)
    )
    return Rows(np.stack(outputs, out=stacked))


# -- errors crossing the process boundary ----------------------------------------------------


class RemoteTraceback(Exception):
    """Where an exception was raised in a worker process (set as its ``__cause__``)."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


class RemoteError(Exception):
    """Stands for an exception from a worker process that could not be pickled back."""


class ExportedError:
    """An exception on its way back from a worker process, rebuilt in the parent as the same
    error: a ``StageError`` with its stage, position and message, its cause (or the exception
    itself, if not a ``StageError``) pickled if it survives a round trip, with its traceback
    as text."""

    __slots__ = ("cause", "message", "position", "stage", "traceback")

    def __init__(self, error: BaseException) -> None:
        cause: BaseException | None = error
        self.stage: str | None = None
        self.position: int | None = None
        self.message = ""
        if isinstance(error, StageError):
            self.stage, self.position = error.stage, error.position
            where = str(StageError(error.stage, error.position, ""))
            self.message = str(error).removeprefix(where)
            cause = error.__cause__
        self.traceback = "" if cause is None else "".join(traceback.format_exception(cause))
        self.cause = None if cause is None else _portable(cause)

    def restore(self) -> BaseException:
        cause = self.cause
        if cause is not None:
            cause.__cause__ = RemoteTraceback(self.traceback)
        if self.stage is None:
            assert cause is not None
            return cause
        error = StageError(self.stage, self.position, self.message)
        error.__cause__ = cause
        return error


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a ``RemoteError`` saying what it was."""
    try:
        restored: BaseException = pickle.loads(pickle.dumps(error))
    except Exception:  # e.g. an exception whose __init__ takes other arguments
        return RemoteError(f"{type(error).__qualname__}: {error}")
    return restored
