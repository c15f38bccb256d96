"""Worker processes for ``executor="process"``: map-like stages here, interleave in
``runtime/remote.py``.

Pure-Python per-element work holds the GIL, so threads cannot run it in parallel; processes
can. The stage keeps its worker *threads* (``runtime/parallel.py``): each becomes a dispatcher
that hands its chunk to a worker process and waits for the result, so ordering, iterator state,
errors at their positions and the ``parallelism`` knob work exactly as on threads.

- One pool per op in one run (a top-level iterator): the stages ``repeat`` makes for each
  epoch share it, so workers start once per iterator. A pool nobody holds lingers for
  ``LINGER_SECONDS`` (long enough for ``repeat``'s next epoch to take it back), then stops.
- Workers start from a forkserver on Linux (never ``fork`` from the multi-threaded parent),
  with spawn elsewhere. What a worker runs (its *service*: the user function and what to do
  with each request) goes to each worker once, pickled with cloudpickle so lambdas and
  closures work; requests to one worker are answered one at a time, in order.
- Elements travel pickled (protocol 5). Array buffers of ``SHM_MIN_BYTES`` or more travel
  out of band, through shared memory with no name (memfd), whose descriptors go over the
  worker's socket: whoever dies when, the kernel frees it, and nothing is ever left in
  ``/dev/shm``. To a worker: one segment per message, which the worker maps at once. Back
  from a worker: its *reply segments* (``ReplyArena``), which the parent maps once and lends
  to the arrays of each reply; when the last array using one is collected, it goes back to
  the worker with the next request and is written again, its pages already in both page
  tables. Results of one shape are stacked in the worker straight into a segment, and a
  ``batch`` right after the map takes whole batches as slices of it (``AsyncStage.next_block``):
  no copy in the parent at all.
- An element or a result that cannot be pickled fails at its position, as a ``StageError``
  wrapping the pickling error; the others go on.
- A worker that dies (killed, segfault, out of memory) breaks its pool: the stage fails with a
  ``StageCrashedError`` naming the positions of the chunk it was running, and every worker is
  stopped. A worker ends as soon as its parent is gone, even in the middle of a request.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import functools
import io
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, cast

import numpy as np

from feedline.errors import StageCrashedError, StageError
from feedline.runtime.chunks import Failed, RowList, Transform, element_nbytes
from feedline.runtime.machine import rss_of
from feedline.runtime.timeouts import stop_calls_in_this_process
from feedline.structure import sole_type

if TYPE_CHECKING:
    from feedline.runtime.context import IterContext

logger = logging.getLogger("feedline")

# Below this size an array buffer is cheaper to copy through the pipe inside the pickle than
# to hand over through a shared-memory segment (creating, mapping and unlinking one costs
# ~100 us). Measured worker -> parent on a 2-core Linux VM: with one array per message the
# pickle wins up to 128 KiB and shared memory from 256 KiB (1.2x; 1.5x at 1 MiB, with 3.7x
# less CPU in the parent); with 8 arrays per message shared memory wins from 128 KiB.
SHM_MIN_BYTES = 128 * 1024
# A chunk sent to a worker is sized to take about this long. A round trip costs the parent
# ~200 us of CPU (pickling, two pipes, waking threads) and the worker an idle gap, both taken
# from the cores the work needs. Pure-Python work (python_cpu, 2 workers on 2 cores): 10 ms
# chunks ran at 4.2-4.3k elements/s with the parent at 20 us/element; 40 ms at 4.55-4.7k/s
# with the parent at 10 us/element. Chunks start at one element and double, so the first
# results still come early.
CHUNK_SECONDS = 0.04
# How long a pool nobody holds keeps its workers, waiting for the next epoch's stage.
LINGER_SECONDS = 0.5
# Worker memory is sampled at most this often (reading it costs a system call per worker).
RSS_SAMPLE_SECONDS = 0.5
# How long a worker asked to stop may take before it is terminated, then killed.
STOP_SECONDS = 2.0
# Past a chunk's calls' timeouts, how long a worker may take to stop them and reply.
OVERDUE_GRACE_SECONDS = 2.0
# Reply segments a worker keeps for reuse once the parent has given them back: enough for the
# replies of a steady pipeline to find one, few enough that idle ones do not pile up.
MAX_FREE_REPLY_SEGMENTS = 2
_ALIGN = 64  # array buffers start at cache-line boundaries in a segment


def require_cloudpickle() -> ModuleType:
    """cloudpickle, or an ImportError saying how to get it."""
    try:
        import cloudpickle
    except ImportError as e:
        raise ImportError(
            "executor='process' needs cloudpickle, a dependency of feedline: reinstall feedline"
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


_forkserver_lock = threading.Lock()
_forkserver_starting: threading.Thread | None = None


def start_forkserver_soon() -> None:
    """Start the process workers fork from, on a thread, if it is not started yet.

    Starting it is a new interpreter importing feedline and numpy: ~0.5 s on a busy 2-core
    machine, which the first worker would otherwise wait for (a GIL-bound tokenizer ran on
    threads at half its rate that long, after the tuner chose processes)."""
    global _forkserver_starting
    if _context().get_start_method() != "forkserver":
        return
    with _forkserver_lock:
        if _forkserver_starting is not None:
            return
        _forkserver_starting = threading.Thread(
            target=_start_forkserver, name="feedline-forkserver-start", daemon=True
        )
        _forkserver_starting.start()


def _start_forkserver() -> None:
    from multiprocessing import forkserver

    try:
        with _main_not_reimported():
            forkserver.ensure_running()
    except Exception:  # the first worker's start tries again and says why
        logger.debug("starting the forkserver ahead of workers failed", exc_info=True)


_main_hidden_lock = threading.Lock()


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start workers without running the user's main script again in them.

    multiprocessing re-imports ``__main__`` in a new worker (by path or module name), which
    re-runs a script that lacks an ``if __name__ == "__main__":`` guard — its whole training
    loop, in every worker. Workers need nothing from it (cloudpickle sends functions defined
    there by value), so while a worker starts, ``__main__`` shows neither its file nor its
    module spec.
    """
    # One start at a time: two overlapping ones (the forkserver's and a worker's, on two
    # threads) would have the later one restore the names the earlier one hid, as None.
    with _main_hidden_lock:
        main = sys.modules.get("__main__")
        names = ("__file__", "__spec__")
        hidden = {name: getattr(main, name) for name in names if hasattr(main, name)}
        try:
            for name in hidden:
                setattr(main, name, None)
            yield
        finally:
            for name, value in hidden.items():
                setattr(main, name, value)


# -- transport --------------------------------------------------------------------------------

# Large buffers travel in anonymous shared memory (memfd): files with no name, in /dev/shm or
# anywhere, whose descriptors go over the worker's socket (SCM_RIGHTS). The kernel frees one
# with its last descriptor or mapping, those still in flight in a socket included, so nothing
# can be left behind whoever dies when. (Named segments had to be removed by whoever held the
# name last: a parent killed while workers sent it 4-8 MiB arrays left 22-104 MiB in
# /dev/shm.) Elsewhere (no memfd), everything travels inside the pickle.
_SHARED_MEMORY = hasattr(os, "memfd_create") and hasattr(socket, "send_fds")

# Where a message's out-of-band buffers are: the segments they lie in, as (key, size, new),
# and each buffer as (index in that list, offset, length). A key of None is a one-shot segment
# (the receiver maps it, and the memory goes with the last view of it); an int is one of the
# sending worker's reply segments (see ``ReplyArena``). ``new``: the segment's descriptor
# follows the message (always for a one-shot segment; for a reply segment, the first time it
# travels). ``keys``: requests carry the reply segments the parent gave back, replies those
# the worker let go of.
Segment = tuple[int | None, int, bool]
Header = tuple[list[Segment], list[tuple[int, int, int]], list[int]]


class Message(NamedTuple):
    """A message ready to send: header and body pickled, and the descriptors of the new
    segments it uses; ``owned``: they are the sender's to close once sent (a one-shot
    segment's; a worker keeps those of its reply segments)."""

    header: bytes
    body: bytes
    fds: list[int]
    owned: bool


class Unsendable(Exception):
    """An object could not be pickled (``error`` says why); nothing was sent."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def _dumps(obj: Any, keep_out: Callable[[pickle.PickleBuffer], bool]) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5, buffer_callback=keep_out)
    except (pickle.PicklingError, TypeError, AttributeError):
        # The standard pickler is faster; cloudpickle also takes lambdas inside elements.
        return cloudpickle_dumps(obj, buffer_callback=keep_out)


def unpicklable(obj: Any) -> Exception | None:
    """Why ``obj`` cannot be sent to another process, or None if it can. Its buffers are
    left out of band, so checking copies none of them."""
    try:
        _dumps(obj, lambda _: False)
    except Exception as e:
        return e
    return None


def cannot_send(stage: str, position: int, error: Exception, what: str) -> StageError:
    """The per-element error for ``what`` (an element, a result) that could not be pickled."""
    wrapped = StageError(
        stage,
        position,
        f"{what} cannot be sent between processes ({type(error).__name__}: {error}); "
        "use executor='thread'",
    )
    wrapped.__cause__ = error
    return wrapped


def cloudpickle_dumps(
    obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None
) -> bytes:
    """``obj`` pickled by cloudpickle, with the file names of the code it sends by value.

    cloudpickle >= 3.1 names such code ``<dynamic-code>``: a worker's traceback would then show
    neither the file nor the failing line of the user's lambda. Each code object is sent as
    cloudpickle sends it, and renamed back when loaded."""
    cloudpickle = require_cloudpickle()
    # Copies of the code objects being sent, left to cloudpickle. A copy rather than the code
    # itself: pickle would take an object saved while saving its own arguments for recursion,
    # and drop the renaming around it.
    copies: dict[int, types.CodeType] = {}

    class KeepingFileNames(cloudpickle.Pickler):  # type: ignore[misc, name-defined]
        def reducer_override(self, o: Any) -> Any:
            if type(o) is types.CodeType and id(o) not in copies:
                copy = o.replace()
                copies[id(copy)] = copy  # kept alive: its id must not be reused meanwhile
                return _named_code, (copy, o.co_filename)
            return super().reducer_override(o)

    buffer = io.BytesIO()
    KeepingFileNames(buffer, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return buffer.getvalue()


def _named_code(code: types.CodeType, filename: str) -> types.CodeType:
    return code if code.co_filename == filename else code.replace(co_filename=filename)


def _big_buffer(buffer: pickle.PickleBuffer) -> memoryview | None:
    """The buffer's memory if it is contiguous and worth sending through shared memory."""
    try:
        raw = buffer.raw()
    except BufferError:  # not contiguous: stays in the pickle
        return None
    return raw if raw.nbytes >= SHM_MIN_BYTES else None


def _pack(
    obj: Any, shared: bool, arena: ReplyArena | None = None, keys: Sequence[int] = ()
) -> Message:
    """``obj`` pickled for ``_post``; ``Unsendable`` if it cannot be. With ``shared``, its
    large array buffers go through shared memory: the worker's reply segments when ``arena``
    is given, else one one-shot segment. ``keys`` go in the header."""
    big: list[memoryview] = []

    def keep_out(buffer: pickle.PickleBuffer) -> bool:
        """False (out of band) for a large contiguous buffer, which is then kept aside."""
        if not shared:
            return True
        raw = _big_buffer(buffer)
        if raw is None:
            return True
        if arena is not None:
            return not arena.place(raw)
        big.append(raw)
        return False

    try:
        body = _dumps(obj, keep_out)
    except BaseException as e:
        if arena is not None:
            arena.end_message(sent=False)
        if isinstance(e, Exception):
            raise Unsendable(e) from e
        raise
    if arena is not None:
        header, fds = arena.end_message()
        return Message(pickle.dumps(header), body, fds, owned=False)
    header = ([], [], list(keys))
    fds = []
    if big:
        try:
            fd, header = _write_segment(big, header[2])
            fds.append(fd)
        except OSError:  # no memory for it: everything inside the pickle
            body = _dumps(obj, lambda _: True)
    return Message(pickle.dumps(header), body, fds, owned=True)


def _write_segment(buffers: list[memoryview], keys: list[int]) -> tuple[int, Header]:
    """A one-shot segment holding ``buffers``: its descriptor, and the message header."""
    layout: list[tuple[int, int, int]] = []
    size = 0
    for raw in buffers:
        layout.append((0, size, raw.nbytes))
        size += -(-raw.nbytes // _ALIGN) * _ALIGN
    # pwrite rather than writing through a mapping: the kernel allocates the pages in bulk,
    # and running out of memory is an OSError here rather than a SIGBUS.
    fd = os.memfd_create("feedline-message", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)  # the padding after the last buffer too
        for (_, offset, _), raw in zip(layout, buffers):
            written = 0
            while written < raw.nbytes:
                written += os.pwrite(fd, raw[written:], offset + written)
    except BaseException:
        os.close(fd)
        raise
    return fd, ([(None, size, True)], layout, keys)


@contextlib.contextmanager
def _socket_of(conn: Connection) -> Iterator[socket.socket]:
    """The socket under ``conn`` (a Unix socket pair), to pass descriptors over it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, conn.fileno())
    try:
        if sock.gettimeout() is not None:  # socket.setdefaulttimeout made it non-blocking
            sock.settimeout(None)
        yield sock
    finally:
        sock.detach()  # the descriptor stays the connection's


def _post(conn: Connection, message: Message) -> None:
    """Send a packed message; ``OSError`` when the other end is gone."""
    try:
        conn.send_bytes(message.header)
        conn.send_bytes(message.body)
        if message.fds:
            with _socket_of(conn) as sock:
                socket.send_fds(sock, [b"\0"], message.fds)
    finally:
        if message.owned:
            for fd in message.fds:
                os.close(fd)


def _read(conn: Connection) -> tuple[Header, bytes, list[int]]:
    """A message ``_post`` sent: its header, its body and the descriptors of its new segments
    (to hand to ``_load``, which closes them). ``EOFError`` or ``OSError`` when the other end
    is gone, even part-way."""
    header = cast(Header, pickle.loads(conn.recv_bytes()))
    body = conn.recv_bytes()
    new = sum(1 for _, _, is_new in header[0] if is_new)
    if not new:
        return header, body, []
    fds = array.array("i")
    with _socket_of(conn) as sock:
        # Not socket.recv_fds: it drops its flags argument, and descriptors received without
        # close-on-exec would leak into any process the parent starts meanwhile.
        data, ancillary, _, _ = sock.recvmsg(
            1, socket.CMSG_SPACE(new * fds.itemsize), getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data or len(fds) != new:  # the sender died part-way
        for fd in fds:
            os.close(fd)
        raise EOFError("the shared memory of a message did not arrive")
    return header, body, list(fds)


def _load(
    header: Header,
    body: bytes,
    fds: list[int],
    replies: ReplySegments | None = None,
    arena: ReplyArena | None = None,
) -> Any:
    """Unpickle what ``_read`` read; large arrays come as views of shared mappings. A reply's
    segments are leased from ``replies``; the keys a request carries go back to ``arena``.
    Closes ``fds`` (a mapping keeps what it needs)."""
    segments, layout, keys = header
    try:
        if arena is not None:
            arena.take_back(keys)
        elif replies is not None:
            replies.forget(keys)
        if not segments:
            return pickle.loads(body)
        views: list[memoryview] = []
        new = iter(fds)
        for key, size, is_new in segments:
            fd = next(new) if is_new else None
            if key is None:
                assert fd is not None, "a one-shot segment always comes with its descriptor"
                views.append(memoryview(_map(fd, size, populate=True)))
            else:
                assert replies is not None, "reply segments travel only to the parent"
                views.append(replies.lease(key, fd, size).data)
    finally:
        for fd in fds:
            os.close(fd)
    return pickle.loads(body, buffers=[views[i][offset : offset + n] for i, offset, n in layout])


def _map(fd: int, size: int, populate: bool) -> mmap.mmap:
    """Map a segment; ``populate``: every page at once (of a segment read once, all of it
    written)."""
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(fd, size, flags=flags)


class ReplyArena:
    """A worker's reply segments: shared memory its results travel in, mapped by the parent
    once and reused for later replies once the parent holds no view of them.

    A fresh segment per reply costs the worker its page faults and zeroing, and the parent
    the mapping of every page again; a reused one is in both page tables already (image
    decoding on two workers: the parent's CPU per element fell from 348 to 127 us). A result built
    in ``empty`` lies in a segment from the start; other large buffers are copied into one
    when sent.

    A segment is *lent* while the parent holds views of it and *free* once given back; at
    most ``MAX_FREE_REPLY_SEGMENTS`` stay free (the smallest beyond that are let go, and the
    parent told), so the memory follows what is in flight.
    """

    def __init__(self) -> None:
        self._serial = itertools.count()
        self._maps: dict[int, mmap.mmap] = {}
        self._fds: dict[int, int] = {}  # open, to reserve more of a segment when reused
        self._reserved: dict[int, int] = {}  # bytes with pages reserved, from the start
        self._free: set[int] = set()
        self._lent: set[int] = set()
        self._unsent: set[int] = set()  # made, descriptor not yet sent to the parent
        self._dropped: list[int] = []  # let go, not yet told
        # The message being built: segments taken for it, arrays made in them (by id), its
        # header, and the descriptors it sends.
        self._taken: set[int] = set()
        self._made: dict[int, int] = {}
        self._segments: list[Segment] = []
        self._index: dict[int, int] = {}
        self._layout: list[tuple[int, int, int]] = []
        self._message_fds: list[int] = []

    @property
    def segments(self) -> int:
        return len(self._maps)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array to build a result in: inside a segment when it is large enough to travel
        out of band (a plain one otherwise, or when no memory can be reserved for it)."""
        count = int(np.prod(shape))
        nbytes = count * dtype.itemsize
        if nbytes < SHM_MIN_BYTES or not _SHARED_MEMORY:
            return np.empty(shape, dtype)
        try:
            key = self._take(nbytes)
        except OSError:
            return np.empty(shape, dtype)
        array = np.frombuffer(self._maps[key], dtype, count=count).reshape(shape)
        self._made[id(array)] = key
        return array

    def _take(self, nbytes: int) -> int:
        """The smallest free segment that holds ``nbytes``, or a new one; its pages for
        ``nbytes`` reserved (running out of memory is then an OSError here, not a SIGBUS
        when the pages are written)."""
        fits = [key for key in self._free if len(self._maps[key]) >= nbytes]
        key = min(fits, key=lambda k: len(self._maps[k])) if fits else self._make(nbytes)
        self._free.discard(key)
        if self._reserved[key] < nbytes:
            try:
                os.posix_fallocate(self._fds[key], 0, nbytes)
            except OSError:
                self._free.add(key)
                raise
            self._reserved[key] = nbytes
        self._taken.add(key)
        return key

    def _make(self, nbytes: int) -> int:
        """A new segment, free, with room for ``nbytes`` and more (see ``_segment_size``) of
        which only what is used gets pages."""
        key = next(self._serial)
        size = _segment_size(nbytes)
        fd = os.memfd_create("feedline-reply", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._maps[key] = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fds[key] = fd
        self._reserved[key] = 0
        self._unsent.add(key)
        self._free.add(key)
        return key

    def place(self, raw: memoryview) -> bool:
        """Put a buffer being pickled in a segment (it may be in one already); False when
        no memory can be reserved for it (it then stays in the pickle)."""
        key = self._made.get(id(raw.obj))
        if key is None:
            try:
                key = self._take(raw.nbytes)
            except OSError:
                return False
            memoryview(self._maps[key])[: raw.nbytes] = raw
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self._segments)
            new = key in self._unsent
            if new:
                self._message_fds.append(self._fds[key])
            self._segments.append((key, len(self._maps[key]), new))
        self._layout.append((index, 0, raw.nbytes))
        return True

    def end_message(self, sent: bool = True) -> tuple[Header, list[int]]:
        """The header of the message just pickled and the descriptors it sends; its segments
        are lent from now on (or, when it could not be sent, free again)."""
        header: Header = (self._segments, self._layout, self._dropped if sent else [])
        fds = self._message_fds if sent else []
        sent_keys = set(self._index) if sent else set()
        self._lent |= sent_keys
        self._unsent -= sent_keys
        self._free |= self._taken - sent_keys  # taken for a result that did not travel
        self._taken, self._made, self._index = set(), {}, {}
        self._segments, self._layout, self._message_fds = [], [], []
        if sent:
            self._dropped = []
        return header, fds

    def take_back(self, keys: Sequence[int]) -> None:
        """The parent holds no view of these any more."""
        for key in keys:
            self._lent.discard(key)
            self._free.add(key)
        while len(self._free) > MAX_FREE_REPLY_SEGMENTS:
            key = min(self._free, key=lambda k: len(self._maps[k]))
            self._free.discard(key)
            mapping = self._maps.pop(key)
            os.close(self._fds.pop(key))
            del self._reserved[key]
            with contextlib.suppress(BufferError):  # an array still uses it: freed with it
                mapping.close()
            if key in self._unsent:
                self._unsent.discard(key)  # the parent never had it
            else:
                self._dropped.append(key)


def _segment_size(nbytes: int) -> int:
    """A size of the form 2^k or 1.5 * 2^k pages holding ``nbytes``: results of a slowly
    growing chunk size then reuse a segment rather than each making a new one, for at most a
    third more memory."""
    pages = -(-nbytes // mmap.PAGESIZE)
    size = 1 << (pages - 1).bit_length()
    if size >= 4 and size * 3 // 4 >= pages:
        size = size * 3 // 4
    return size * mmap.PAGESIZE


class ReplySegments:
    """The parent's side of one worker's reply segments: each mapped once, and lent to the
    arrays of each reply that uses it; when the last of them is gone (collected), the segment
    goes back to the worker with the next request."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._returned: list[int] = []

    def lease(self, key: int, fd: int | None, size: int) -> np.ndarray:
        """The segment's memory, as an object the reply's arrays keep alive; ``fd``: the
        descriptor of a segment new here."""
        if fd is not None:
            # Not populated: only what replies use of it has pages (see ReplyArena._take).
            self._maps[key] = _map(fd, size, populate=False)
        lease = np.frombuffer(self._maps[key], np.uint8)
        weakref.finalize(lease, self.give_back, [key])
        return lease

    def give_back(self, keys: list[int]) -> None:
        """Segments to give back to the worker with the next request."""
        with self._lock:
            self._returned += keys

    def returned(self) -> list[int]:
        """Segments no reply array uses any more, each once."""
        with self._lock:
            keys, self._returned = self._returned, []
        return keys

    def forget(self, keys: Sequence[int]) -> None:
        """The worker let these go: unmapped here too once nothing refers to them."""
        for key in keys:
            self._maps.pop(key, None)

    def close(self) -> None:
        """The worker is gone: each segment stays mapped only while an array uses it."""
        self._maps.clear()


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


# -- the worker side --------------------------------------------------------------------------


class Service(Protocol):
    """What a worker runs: called with each request, it returns the reply."""

    def __call__(self, request: Any) -> Any: ...

    def unsendable(self, reply: Any, error: Exception) -> Any:
        """A reply to send instead of ``reply``, which could not be pickled (``error``): what
        of it can be sent, with per-element errors for what cannot."""
        ...


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


# -- the parent side --------------------------------------------------------------------------


class WorkerProcess:
    """One worker process and the parent's end of its pipe. ``lock`` keeps one request at a
    time on the pipe; ``in_sync`` is False once a message was cut short (the pipe cannot be
    used again)."""

    __slots__ = ("conn", "in_sync", "lock", "process", "replies")

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.lock = threading.Lock()
        self.in_sync = True
        self.replies = ReplySegments()


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


class WorkerPool:
    """Worker processes for one op in one run, all running the service pickled in
    ``service_blob``; subclasses decide which worker runs what.

    Stages (or iterators) ``acquire`` the pool and ``release`` it; it stops when nobody has held
    it for ``LINGER_SECONDS``. A worker that dies breaks the pool: every request then fails with
    the ``StageCrashedError`` saying which worker died running what, and every worker is
    stopped.
    """

    def __init__(self, name: str, service_blob: bytes) -> None:
        if multiprocessing.current_process().daemon:  # multiprocessing would only assert
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
            name=f"feedline-{self.name}",
            daemon=True,
        )
        try:
            with _main_not_reimported():
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
        worker.process.join(STOP_SECONDS)
        with self._lock:
            stopped = self._stopped(positions)
            if stopped is not None:  # stopped on purpose, or after another worker died
                return stopped
            self.broken = StageCrashedError(
                self.name,
                positions[0],
                f"worker process {worker.process.pid} {_how_it_ended(worker.process)}; "
                f"it was {self._work_of(worker, positions)}",
            )
            broken = self.broken
        self.close()
        return broken

    # -- shutdown ----------------------------------------------------------------------------

    def _stop(self, worker: WorkerProcess, graceful: bool = True) -> None:
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
            worker.process.join(STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
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


def pickled_service(service: Service, name: str) -> bytes:
    """``service`` as workers load it; a ``StageError`` naming stage ``name`` if it cannot be
    pickled."""
    try:
        blob = cloudpickle_dumps(service)
    except Exception as e:
        raise StageError(
            name,
            None,
            f"executor='process' cannot send the function to worker processes "
            f"({type(e).__name__}: {e}); make it picklable or use executor='thread'",
        ) from e
    return blob


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

    def warm(self) -> None:
        self.pool.warm()

    def close(self) -> None:
        self._release()


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
