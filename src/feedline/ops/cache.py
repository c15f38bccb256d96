"""cache: keep the elements of one complete pass, in memory or in a file.

A pass that stops early (``take``, ``break``, an error) publishes nothing, so a cache never
holds a partial dataset. A file cache is written to a temporary name and renamed when its pass
completes; a new process reuses it. Every record carries a CRC32 and the file ends in a trailer
with the record count, so a corrupt or truncated file raises an error instead of yielding wrong
or missing data.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import uuid
import zlib
from typing import Any, BinaryIO

from feedline.ops.base import Op
from feedline.ops.in_memory import ElementsIterator
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, NodeIterator, State

MAGIC = b"FLCACHE\x01"
TRAILER_MAGIC = b"FLCACHE-END"
_RECORD = struct.Struct("<II")
_END_MARK = 0xFFFFFFFF


class CacheFileError(RuntimeError):
    pass


class CacheOp(Op):
    def __init__(self, input_op: Op, filename: str) -> None:
        super().__init__()
        self.input = input_op
        self.inputs = (input_op,)
        self.filename = os.fspath(filename)
        self.name = f"cache({self.filename!r})" if self.filename else "cache"
        self._memory: list[Any] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process fills its own cache, as a new run would.
        state = super().__getstate__()
        del state["_lock"]
        state["_memory"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def publish_memory(self, elements: list[Any]) -> None:
        with self._lock:
            if self._memory is None:
                self._memory = elements

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        mode = None if state is None else state["mode"]
        if self.filename:
            if mode == "read" or (mode is None and os.path.exists(self.filename)):
                return FileCacheReader(self.filename, 0 if state is None else state["index"])
            return CacheWriter(self, ctx, state)
        with self._lock:
            memory = self._memory
        if mode == "read" or (mode is None and memory is not None):
            if memory is None:
                raise ValueError(f"{self.name}: cannot resume reading a cache that is gone")
            return MemoryCacheReader(memory, 0 if state is None else state["index"])
        return CacheWriter(self, ctx, state)


class MemoryCacheReader(ElementsIterator):
    """Replays a published cache; its state says it was reading, not writing."""

    def get_state(self) -> State:
        return {"mode": "read", "index": self.index}


class CacheWriter(ChunkedIterator):
    """Reads the input and records it; publishes only when the pass completes.

    Resuming a writer mid-pass continues the pass without caching it: the elements before the
    saved point are not in this process any more, and a partial cache must never be published.
    """

    def __init__(self, op: CacheOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.input = op.input.make_iterator(ctx, None if state is None else state["input"])
        self.inputs = (self.input,)
        self.recording = state is None
        self.elements: list[Any] = []
        self.file: BinaryIO | None = None
        self.tmp_path = ""
        self.records = 0
        if self.recording and op.filename:
            directory = os.path.dirname(os.path.abspath(op.filename))
            os.makedirs(directory, exist_ok=True)
            self.tmp_path = f"{op.filename}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in _finish/close
            self.file.write(MAGIC)

    def next_chunk(self, max_n: int) -> list[Any]:
        try:
            chunk = self.input.next_chunk(max_n)
        except BaseException:
            # The consumer may go on past an error, but the pass is no longer complete.
            self._abandon()
            raise
        if not self.recording:
            return chunk
        if not chunk:
            self._finish()
            return chunk
        if self.file is not None:
            for element in chunk:
                write_record(self.file, element)
            self.records += len(chunk)
        else:
            self.elements.extend(chunk)
        return chunk

    def _finish(self) -> None:
        self.recording = False
        if self.file is not None:
            self.file.write(_RECORD.pack(_END_MARK, self.records) + TRAILER_MAGIC)
            self.file.close()
            self.file = None
            os.replace(self.tmp_path, self.op.filename)
        else:
            self.op.publish_memory(self.elements)
            self.elements = []

    def get_state(self) -> State:
        return {"mode": "write", "input": self.input.get_state()}

    def _abandon(self) -> None:
        self.recording = False
        self.elements = []
        if self.file is not None:
            self.file.close()
            self.file = None
            os.unlink(self.tmp_path)

    def close(self) -> None:
        self.input.close()
        self._abandon()


def write_record(f: BinaryIO, element: Any) -> None:
    payload = pickle.dumps(element, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_RECORD.pack(len(payload), zlib.crc32(payload)))
    f.write(payload)


class FileCacheReader(NodeIterator):
    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = 0
        self.file: BinaryIO | None = open(path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self.count, self.records_end = self._check_file()
            while self.index < index:
                self._read(decode=False)
        except BaseException:
            self.close()
            raise

    def _corrupt(self, why: str) -> CacheFileError:
        return CacheFileError(
            f"cache file {self.path!r} is corrupt or truncated ({why}); "
            "delete it and the next complete pass will write it again"
        )

    def _check_file(self) -> tuple[int, int]:
        """The record count the trailer promises, and where the records must end."""
        assert self.file is not None
        if self.file.read(len(MAGIC)) != MAGIC:
            raise self._corrupt("bad header")
        tail = _RECORD.size + len(TRAILER_MAGIC)
        size = os.fstat(self.file.fileno()).st_size
        if size < len(MAGIC) + tail:
            raise self._corrupt("no trailer")
        self.file.seek(size - tail)
        mark, count = _RECORD.unpack(self.file.read(_RECORD.size))
        if mark != _END_MARK or self.file.read(len(TRAILER_MAGIC)) != TRAILER_MAGIC:
            raise self._corrupt("no trailer")
        self.file.seek(len(MAGIC))
        return int(count), size - tail

    def _read(self, decode: bool = True) -> Any:
        assert self.file is not None
        header = self.file.read(_RECORD.size)
        if len(header) < _RECORD.size:
            raise self._corrupt(f"record {self.index} is cut short")
        length, crc = _RECORD.unpack(header)
        if length == _END_MARK:
            raise self._corrupt(f"trailer after {self.index} of {self.count} records")
        payload = self.file.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            raise self._corrupt(f"record {self.index} fails its checksum")
        self.index += 1
        return pickle.loads(payload) if decode else None

    def __next__(self) -> Any:
        if self.index >= self.count:
            # A damaged count in the trailer would otherwise end the data early, silently.
            if self.file is not None and self.file.tell() != self.records_end:
                raise self._corrupt(f"records go on past the {self.count} the trailer counts")
            raise StopIteration
        return self._read()

    def get_state(self) -> State:
        return {"mode": "read", "index": self.index}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
