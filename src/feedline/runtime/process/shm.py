"""Messages between the parent and a worker: pickled (protocol 5), large array buffers out of
band in shared memory.

Array buffers of ``SHM_MIN_BYTES`` or more travel through shared memory with no name (memfd),
whose descriptors go over the worker's socket: whoever dies when, the kernel frees it, and
nothing is ever left in ``/dev/shm``. To a worker: one segment per message, which the worker
maps at once. Back from a worker: its *reply segments* (``ReplyArena``), which the parent maps
once and lends to the arrays of each reply (``ReplySegments``); when the last array using one
is collected, it goes back to the worker with the next request and is written again, its pages
already in both page tables.
"""

from __future__ import annotations

import array
import collections
import contextlib
import itertools
import mmap
import os
import pickle
import socket
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from feedline.errors import StageError
from feedline.runtime.process.spawn import cloudpickle_dumps

if TYPE_CHECKING:
    pass


# Below this size an array buffer is cheaper to copy through the pipe inside the pickle than
# to hand over through a shared-memory segment (creating, mapping and unlinking one costs
# ~100 us). Measured worker -> parent on a 2-core Linux VM: with one array per message the
# pickle wins up to 128 KiB and shared memory from 256 KiB (1.2x; 1.5x at 1 MiB, with 3.7x
# less CPU in the parent); with 8 arrays per message shared memory wins from 128 KiB.
SHM_MIN_BYTES = 128 * 1024


# Reply segments a worker keeps for reuse once the parent has given them back: enough for the
# replies of a steady pipeline to find one, few enough that idle ones do not pile up.
MAX_FREE_REPLY_SEGMENTS = 2
_ALIGN = 64  # array buffers start at cache-line boundaries in a segment


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
    the mapping of every page again; a reused one is in both page tables already (for image
    decoding on two workers, most of the parent's CPU per element). A result built in
    ``empty`` lies in a segment from the start; other large buffers are copied into one when
    sent.

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
        # Filled by finalizers, which may run on a thread in the middle of returned(): a
        # deque's append and popleft need no lock that thread could already hold.
        self._returned: collections.deque[int] = collections.deque()

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
        self._returned.extend(keys)

    def returned(self) -> list[int]:
        """Segments no reply array uses any more, each once."""
        keys = []
        with contextlib.suppress(IndexError):
            while True:
                keys.append(self._returned.popleft())
        return keys

    def forget(self, keys: Sequence[int]) -> None:
        """The worker let these go: unmapped here too once nothing refers to them."""
        for key in keys:
            self._maps.pop(key, None)

    def close(self) -> None:
        """The worker is gone: each segment stays mapped only while an array uses it."""
        self._maps.clear()
