"""Worker processes for map-like stages (``executor="process"``).

Pure-Python per-element work holds the GIL, so threads cannot run it in parallel; processes
can. The stage keeps its worker *threads* (``runtime/parallel.py``): each becomes a dispatcher
that hands its chunk to a worker process and waits for the result, so ordering, iterator state,
errors at their positions and the ``parallelism`` knob work exactly as on threads.

- One ``ProcessPool`` per op in one run (a top-level iterator): the stages ``repeat`` makes for
  each epoch share it, so workers start once per iterator. A pool nobody holds lingers for
  ``LINGER_SECONDS`` (long enough for ``repeat``'s next epoch to take it back), then stops.
- Workers start from a forkserver on Linux (never ``fork`` from the multi-threaded parent),
  with spawn elsewhere; the user function goes to each worker once, pickled with cloudpickle
  so lambdas and closures work.
- Elements travel pickled (protocol 5). Array buffers of ``SHM_MIN_BYTES`` or more travel
  out of band, in one shared-memory segment per message: the sender writes them once, the
  receiver maps the segment and unlinks its name at once, and the arrays it gets are views of
  that mapping, freed when the last of them is dropped. Nothing is left in ``/dev/shm`` when
  a worker dies mid-message either: segment names carry the pool's prefix, and a stopping
  pool removes whatever is left under it.
- A worker that dies (killed, segfault, out of memory) breaks its pool: the stage fails with a
  ``StageError`` naming the positions of the chunk it was running, and every worker is stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import itertools
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from types import ModuleType
from typing import TYPE_CHECKING, Any

from feedline.errors import StageError, wrap_user_error
from feedline.runtime.parallel import Failed, Transform

if TYPE_CHECKING:
    from feedline.runtime.context import IterContext

# Below this size an array buffer is cheaper to copy through the pipe inside the pickle than
# to hand over through a shared-memory segment (creating, mapping and unlinking one costs
# ~100 us). Measured worker -> parent on a 2-core Linux VM: with one array per message the
# pickle wins up to 128 KiB and shared memory from 256 KiB (1.2x; 1.5x at 1 MiB, with 3.7x
# less CPU in the parent); with 8 arrays per message shared memory wins from 128 KiB.
SHM_MIN_BYTES = 128 * 1024
# A chunk sent to a worker is sized to take about this long: a round trip costs 100-200 us
# (pickling, two pipes, waking threads), 1-2% of it. At the threads' 2 ms, pure-Python work on
# 2 cores ran at 1.4x one core; at 10 ms, at 1.8x.
CHUNK_SECONDS = 0.01
# How long a pool nobody holds keeps its workers, waiting for the next epoch's stage.
LINGER_SECONDS = 0.5
# Worker memory is sampled at most this often (reading it costs a system call per worker).
RSS_SAMPLE_SECONDS = 0.5
# How long a worker asked to stop may take before it is terminated, then killed.
STOP_SECONDS = 2.0
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
_ALIGN = 64  # array buffers start at cache-line boundaries in a segment
_segment_serial = itertools.count()
_pool_serial = itertools.count()


def require_cloudpickle() -> ModuleType:
    """cloudpickle, or an ImportError saying how to get it."""
    try:
        import cloudpickle
    except ImportError as e:
        raise ImportError(
            "executor='process' needs cloudpickle: pip install 'feedline[process]'"
        ) from e
    return cloudpickle


@functools.cache
def _context() -> Any:
    """The multiprocessing context workers start from (one forkserver per parent process).

    The forkserver preloads feedline, so each worker forks with it (and numpy) already
    imported: ~15 ms per worker instead of ~300 ms importing it afresh. It does not preload
    ``__main__``: see ``_main_not_reimported``.
    """
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start workers without running the user's main script again in them.

    multiprocessing re-imports ``__main__`` in a new worker (by path or module name), which
    re-runs a script that lacks an ``if __name__ == "__main__":`` guard — its whole training
    loop, in every worker. Workers need nothing from it (cloudpickle sends functions defined
    there by value), so while a worker starts, ``__main__`` shows neither its file nor its
    module spec.
    """
    main = sys.modules.get("__main__")
    hidden = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        for name in hidden:
            setattr(main, name, None)
        yield
    finally:
        for name, value in hidden.items():
            setattr(main, name, value)


# -- transport --------------------------------------------------------------------------------

# What a message's receiver needs to find its out-of-band buffers: the segment's name, its
# size, and each buffer's (offset, length) in it; None when everything is inside the pickle.
Segment = tuple[str, int, list[tuple[int, int]]] | None


def _dumps(obj: Any, keep_out: Callable[[pickle.PickleBuffer], bool]) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5, buffer_callback=keep_out)
    except (pickle.PicklingError, TypeError, AttributeError):
        # The standard pickler is faster; cloudpickle also takes lambdas inside elements.
        cloudpickle = require_cloudpickle()
        body: bytes = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_out)
        return body


def _send(conn: Connection, obj: Any, shm_prefix: str | None) -> None:
    """Send ``obj``; its large array buffers go through a shared-memory segment."""
    big: list[memoryview] = []

    def keep_out(buffer: pickle.PickleBuffer) -> bool:
        """False (out of band) for a large contiguous buffer, which is then kept aside."""
        if shm_prefix is None:
            return True
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: stays in the pickle
            return True
        if raw.nbytes < SHM_MIN_BYTES:
            return True
        big.append(raw)
        return False

    body = _dumps(obj, keep_out)
    segment: Segment = None
    if big:
        assert shm_prefix is not None
        try:
            segment = _write_segment(f"{shm_prefix}{next(_segment_serial)}", big)
        except OSError:  # /dev/shm full or unavailable: everything inside the pickle
            big.clear()
            body = _dumps(obj, lambda _: True)
    try:
        conn.send_bytes(pickle.dumps(segment))
        conn.send_bytes(body)
    except BaseException:
        if segment is not None:  # the receiver never saw it: remove it here
            _unlink(segment[0])
        raise


def _write_segment(name: str, buffers: list[memoryview]) -> Segment:
    layout: list[tuple[int, int]] = []
    size = 0
    for raw in buffers:
        layout.append((size, raw.nbytes))
        size += -(-raw.nbytes // _ALIGN) * _ALIGN
    assert _SHM_DIR is not None
    # pwrite rather than writing through a mapping: the kernel allocates the pages in bulk,
    # and a full /dev/shm is an OSError here rather than a SIGBUS.
    fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)  # the padding after the last buffer too
        for (offset, _), raw in zip(layout, buffers):
            written = 0
            while written < raw.nbytes:
                written += os.pwrite(fd, raw[written:], offset + written)
    except BaseException:
        _unlink(name)
        raise
    finally:
        os.close(fd)
    return name, size, layout


def _receive(conn: Connection) -> Any:
    """Receive what ``_send`` sent; large arrays come as views of a shared mapping."""
    segment: Segment = pickle.loads(conn.recv_bytes())
    body = conn.recv_bytes()
    if segment is None:
        return pickle.loads(body)
    name, size, layout = segment
    assert _SHM_DIR is not None
    path = os.path.join(_SHM_DIR, name)
    fd = os.open(path, os.O_RDWR)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # map every page at once
        mapping = mmap.mmap(fd, size, flags=flags)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping lives on, as long as some array refers to it
    view = memoryview(mapping)
    return pickle.loads(body, buffers=[view[offset : offset + n] for offset, n in layout])


def _unlink(name: str) -> None:
    assert _SHM_DIR is not None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_SHM_DIR, name))


# -- errors crossing the process boundary ----------------------------------------------------


class RemoteTraceback(Exception):
    """Where an exception was raised in a worker process (set as its ``__cause__``)."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


class RemoteError(Exception):
    """Stands for an exception from a worker process that could not be pickled back."""


class _ExportedFailure:
    """A ``Failed`` output on its way back from a worker: the stage and position of the
    failing element, the user's exception (pickled if it survives a round trip) and its
    traceback as text."""

    __slots__ = ("cause", "position", "stage", "traceback")

    def __init__(self, failed: Failed) -> None:
        error = failed.error
        cause = error.__cause__ if isinstance(error, StageError) else None
        cause = cause if cause is not None else error
        self.stage = error.stage if isinstance(error, StageError) else None
        self.position = error.position if isinstance(error, StageError) else None
        self.traceback = "".join(traceback.format_exception(cause))
        try:
            self.cause = pickle.loads(pickle.dumps(cause))
        except Exception:  # e.g. an exception whose __init__ takes other arguments
            self.cause = RemoteError(f"{type(cause).__qualname__}: {cause}")

    def restore(self, stage: str) -> Failed:
        cause = self.cause
        cause.__cause__ = RemoteTraceback(self.traceback)
        return Failed(wrap_user_error(self.stage or stage, self.position, cause))


# -- the worker side --------------------------------------------------------------------------


def _worker_main(conn: Connection, factory_blob: bytes, shm_prefix: str | None) -> None:
    """A worker's loop: receive (argument, elements, positions), send back the outputs.

    ``factory(argument)`` makes the chunk transform (for random_map the argument is the pass's
    random key, so one pickled function serves every epoch).
    """
    # Ctrl-C reaches the whole process group; the parent decides what stops, and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if shm_prefix is not None:  # segment names unique to this worker, under the pool's prefix
        shm_prefix = f"{shm_prefix}w{os.getpid()}-"
    factory: Callable[[Any], Transform] | None = None
    load_error = ""
    try:
        factory = pickle.loads(factory_blob)
    except Exception:
        load_error = "could not load the function:\n" + traceback.format_exc()
    del factory_blob
    transform: Transform | None = None
    argument: Any = None
    while True:
        try:
            # Elements that cannot be unpickled here (say, of a class only the parent has) are
            # an error reply like any other: both parts of the message were read by then.
            request_argument, raw, positions = _receive(conn)
            if factory is None:
                raise RuntimeError(load_error)
            if transform is None or request_argument != argument:
                argument = request_argument
                transform = factory(argument)
            started = time.process_time()
            outputs, failures = transform(raw, positions)
            del raw
            for i in failures:
                outputs[i] = _ExportedFailure(outputs[i])
            reply: tuple[Any, ...] = ("ok", outputs, failures, time.process_time() - started)
            del outputs
            _send(conn, reply, shm_prefix)
        except EOFError:
            return  # the parent closed the pipe: stop
        except Exception:
            _send(conn, ("error", traceback.format_exc()), None)


# -- the parent side --------------------------------------------------------------------------


class _Worker:
    __slots__ = ("conn", "process")

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn


def _how_it_ended(process: Any) -> str:
    code = process.exitcode
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


class ProcessPool:
    """Worker processes for one op in one run; dispatcher threads ``submit`` chunks to them.

    Each stage holding the pool wants ``max(1, parallelism)`` workers; the pool keeps the sum
    of those (starting workers as dispatchers need them, stopping extra ones as they come
    back), and stops them all when nobody has held it for ``LINGER_SECONDS``.
    """

    def __init__(self, name: str, factory_blob: bytes) -> None:
        self.name = name
        self._blob = factory_blob
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._workers: list[_Worker] = []  # alive, idle or busy
        self._idle: list[_Worker] = []
        self._starting = 0
        self._shares: dict[object, int] = {}  # workers each holder wants, by holder token
        self._linger: threading.Timer | None = None
        self._closed = False
        self.broken: StageError | None = None
        self.starts = 0  # worker processes started, over the pool's life
        prefix = f"fl-{os.getpid()}-{next(_pool_serial)}-"
        self._shm_prefix = prefix if _SHM_DIR is not None else None
        self._rss = 0
        self._rss_at = -float("inf")
        _live_pools.add(self)

    # -- holders -----------------------------------------------------------------------------

    def acquire(self, token: object) -> bool:
        """Hold the pool for one stage; False when it has stopped (make a new one)."""
        with self._lock:
            if self._closed:
                return False
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            self._shares[token] = 1
            return True

    def set_share(self, token: object, workers: int) -> None:
        with self._lock:
            if token not in self._shares:
                return
            self._shares[token] = workers
            extra = self._take_extra_idle()
            self._changed.notify_all()
        for worker in extra:
            self._stop(worker)

    def release(self, token: object) -> None:
        with self._lock:
            if self._shares.pop(token, None) is None or self._shares or self._closed:
                return
            # Keep the workers a moment: repeat's next epoch takes the pool right back.
            self._linger = threading.Timer(LINGER_SECONDS, self._close_if_unheld)
            self._linger.name = f"feedline-{self.name}-linger"
            self._linger.daemon = True
            self._linger.start()

    def _close_if_unheld(self) -> None:
        with self._lock:
            if self._shares or self._closed:
                return
        self.close()

    def _wanted(self) -> int:
        """Workers to keep (caller holds the lock): what the holders want; while nobody holds
        the pool, the ones it has, for the next epoch's stage."""
        return sum(self._shares.values()) if self._shares else max(1, len(self._workers))

    def _take_extra_idle(self) -> list[_Worker]:
        """Idle workers beyond those wanted, removed from the pool (caller holds the lock)."""
        extra = []
        while self._idle and len(self._workers) > self._wanted():
            worker = self._idle.pop()
            self._workers.remove(worker)
            extra.append(worker)
        return extra

    # -- work --------------------------------------------------------------------------------

    def submit(
        self, argument: Any, raw: list[Any], positions: Sequence[int]
    ) -> tuple[list[Any], list[int], float]:
        """Run a chunk on a worker: (outputs, failure indexes, the worker's CPU seconds)."""
        worker = self._checkout(positions)
        in_sync = False  # whether the pipe is between messages (the worker can be reused)
        try:
            try:
                _send(worker.conn, (argument, raw, positions), self._shm_prefix)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                in_sync = True  # nothing was sent
                raise StageError(
                    self.name,
                    positions[0],
                    f"cannot send elements to a worker process ({type(e).__name__}: {e}); "
                    "use executor='thread'",
                ) from e
            reply = _receive(worker.conn)
            in_sync = True
        except (EOFError, OSError):
            raise self._lost(worker, positions) from None
        finally:
            self._checkin(worker, in_sync)
        if reply[0] == "error":
            raise StageError(
                self.name, positions[0], f"a worker process failed:\n{reply[1]}"
            ) from None
        _, outputs, failures, cpu = reply
        for i in failures:
            outputs[i] = outputs[i].restore(self.name)
        return outputs, failures, cpu

    def _checkout(self, positions: Sequence[int]) -> _Worker:
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
        try:
            worker = self._start_worker()
        except BaseException:
            with self._lock:
                self._starting -= 1
                self._changed.notify_all()
            raise
        with self._lock:
            self._starting -= 1
            self._changed.notify_all()
            error = self._stopped(positions)
            if error is None:
                self._workers.append(worker)
                return worker
        self._stop(worker)  # the pool stopped while this one started
        raise error

    def _stopped(self, positions: Sequence[int]) -> StageError | None:
        """Why the pool cannot run ``positions``, if it has stopped (caller holds the lock)."""
        if self.broken is not None:
            return self.broken
        if self._closed:
            return StageError(self.name, positions[0], "its worker processes were stopped")
        return None

    def _start_worker(self) -> _Worker:
        ctx = _context()
        parent_end, child_end = ctx.Pipe()
        process = ctx.Process(
            target=_worker_main,
            args=(child_end, self._blob, self._shm_prefix),
            name=f"feedline-{self.name}",
            daemon=True,
        )
        with _main_not_reimported():
            process.start()
        child_end.close()  # the worker holds its end: its death is an EOF here
        with self._lock:
            self.starts += 1
        return _Worker(process, parent_end)

    def _checkin(self, worker: _Worker, in_sync: bool) -> None:
        with self._lock:
            if in_sync and not self._closed and len(self._workers) <= self._wanted():
                self._idle.append(worker)
                self._changed.notify_all()
                return
            if worker in self._workers:
                self._workers.remove(worker)
            self._changed.notify_all()
        self._stop(worker, graceful=in_sync)

    def _lost(self, worker: _Worker, positions: Sequence[int]) -> StageError:
        """The error for a worker that died while running ``positions``; breaks the pool."""
        worker.process.join(STOP_SECONDS)
        with self._lock:
            stopped = self._stopped(positions)
            if stopped is not None:  # stopped on purpose, or after another worker died
                return stopped
            self.broken = StageError(
                self.name,
                positions[0],
                f"worker process {worker.process.pid} {_how_it_ended(worker.process)}; "
                f"it was given the elements at positions {_span(positions)}",
            )
            broken = self.broken
        self.close()
        return broken

    # -- shutdown ----------------------------------------------------------------------------

    def _stop(self, worker: _Worker, graceful: bool = True) -> None:
        """Stop one worker: an idle one exits when its pipe closes; a busy one is killed."""
        process = worker.process
        if graceful:
            worker.conn.close()
            process.join(STOP_SECONDS)
        if process.is_alive():
            process.terminate()
            process.join(STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
        worker.conn.close()

    def close(self) -> None:
        """Stop every worker (busy ones are terminated) and remove leftover segments."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._blob = b""  # the pickled function may be large (a closure over data)
            if self._linger is not None:
                self._linger.cancel()
            idle = self._idle
            busy = [w for w in self._workers if w not in idle]
            self._idle = []
            self._workers = busy  # their dispatchers wake with an EOF and check them in
            self._changed.notify_all()
        for worker in busy:
            worker.process.terminate()
        for worker in idle:
            self._stop(worker)
        for worker in busy:
            worker.process.join(STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        if self._shm_prefix is not None:
            assert _SHM_DIR is not None
            for path in glob.glob(os.path.join(_SHM_DIR, glob.escape(self._shm_prefix) + "*")):
                _unlink(os.path.basename(path))
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
            self._rss = sum(_rss_of(pid) for pid in pids)
        return self._rss

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers]


def _rss_of(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


# Pools by run and op. Weak keys: a finished run's entries go with it.
_pools: weakref.WeakKeyDictionary[IterContext, dict[object, ProcessPool]] = (
    weakref.WeakKeyDictionary()
)
_pools_lock = threading.Lock()
# Every pool not yet closed, so that exiting the interpreter stops their workers first.
_live_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_live_pools):
        pool.close()


class ProcessExecutor:
    """A stage's handle on its op's pool: what ``AsyncStage`` calls instead of its transform
    (see ``ChunkExecutor`` in ``runtime/parallel.py``)."""

    chunk_seconds = CHUNK_SECONDS

    def __init__(self, pool: ProcessPool, token: object, argument: Any) -> None:
        self.pool = pool
        self.argument = argument
        self._token = token
        # A stage dropped without close() still lets go of the pool.
        self._release = weakref.finalize(self, pool.release, token)

    def run(self, raw: list[Any], positions: Sequence[int]) -> tuple[list[Any], list[int], float]:
        if type(raw[0]) is Failed:  # an upstream error: nothing to run
            return raw, [0], 0.0
        return self.pool.submit(self.argument, raw, positions)

    def resize(self, parallelism: int) -> None:
        self.pool.set_share(self._token, max(1, parallelism))

    def worker_rss_bytes(self) -> int:
        return self.pool.rss_bytes()

    def close(self) -> None:
        self._release()


def process_executor(
    ctx: IterContext, key: object, name: str, factory: Callable[[Any], Transform], argument: Any
) -> ProcessExecutor:
    """An executor on the pool of op ``key`` in run ``ctx`` (made on first use).

    ``factory(argument)`` makes the chunk transform in a worker; the factory is pickled once
    per pool, and must not change between the stages of one run.
    """
    token = object()
    with _pools_lock:
        if ctx not in _pools:
            # The run's end closes its pools at once (stages closing between epochs let them
            # linger instead, for the next epoch's stage).
            ctx.on_close(lambda: _close_pools_of(ctx))
        pools = _pools.setdefault(ctx, {})
        pool = pools.get(key)
        if pool is None or not pool.acquire(token):
            pool = ProcessPool(name, _pickled(factory, name))
            pool.acquire(token)
            pools[key] = pool
    return ProcessExecutor(pool, token, argument)


def _close_pools_of(ctx: IterContext) -> None:
    with _pools_lock:
        pools = _pools.pop(ctx, {})
    for pool in pools.values():
        pool.close()


def _pickled(factory: Callable[[Any], Transform], name: str) -> bytes:
    cloudpickle = require_cloudpickle()
    try:
        blob: bytes = cloudpickle.dumps(factory)
    except Exception as e:
        raise StageError(
            name,
            None,
            f"executor='process' cannot send the function to worker processes "
            f"({type(e).__name__}: {e}); make it picklable or use executor='thread'",
        ) from e
    return blob
