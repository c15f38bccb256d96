"""cache: keep the elements of one complete pass, in memory or in a file.

A pass that stops early (``take``, ``break``, an error) publishes nothing, so a cache never
holds a partial dataset. A writer's state is where its pass began and how many elements it
delivered: a restored writer reads those again and records them, so it publishes what the
uninterrupted pass would have, and later passes read the same cache. A memory cache reader's
state keeps where the pass that wrote the cache began, so a process that does not hold the
cache makes it again from there.

A cache file is data, never code. Each record holds one element's leaves as raw bytes with
their dtypes and shapes (``records.py``), checked against the dataset's element spec when
read, and a CRC32. The records are followed by metadata: their count, the element spec, and
what wrote them (the names of the input's ops, a digest of the code of their functions, its
cardinality). A file that is damaged or truncated, or that another pipeline wrote, raises
``CacheFileError`` naming the file and the place: it is never read as this pipeline's data,
and never silently replaced, since it may be the only copy of what it holds.

Layout: ``MAGIC``, the records, an end record holding the metadata (JSON), the metadata's
length and ``TRAILER_MAGIC``. A record is (index u64, length u64, CRC32 u32) and its payload;
the CRC covers the index, the length and the payload.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import uuid
import zlib
from typing import Any, BinaryIO, Protocol

import numpy as np

from feedline.errors import DataLossError, InvalidStateError
from feedline.ops.base import Op, UnaryOp, UnobservableSpec
from feedline.ops.in_memory import ElementsIterator
from feedline.ops.records import (
    FRAME,
    RecordError,
    decode_leaves,
    frame_intact,
    framed_record,
    leaves_of,
    pipeline_identity,
    spec_from_json,
    spec_outline,
    spec_to_json,
)
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, StageIterator, State
from feedline.runtime.states import frozen, known_end, state_dict, state_int, state_nested
from feedline.structure import flatten, pack_like, spec_of

MAGIC = b"FLCACHE\x02"
# Files of format 1 held pickles, which run code when loaded: they are refused, never read.
_MAGIC_1 = b"FLCACHE\x01"
TRAILER_MAGIC = b"FLCACHE-END"
FORMAT = "feedline-cache"
VERSION = 2
_RECORD = FRAME
_TAIL = struct.Struct("<Q")
_END_MARK = 2**64 - 1
# A restored writer reads its pass again in chunks of at most this many elements.
_REPLAY_CHUNK = 4096


class CacheFileError(DataLossError):
    """A cache file that is damaged, truncated, or was written by another pipeline."""


class Sink(Protocol):
    """Where a writing pass records its elements (memory, a cache file, snapshot shards)."""

    def add(self, chunk: list[Any]) -> None: ...
    def publish(self, start: State) -> None: ...
    def discard(self) -> None: ...


class CacheOp(UnaryOp):
    def __init__(self, input_op: Op, filename: str) -> None:
        super().__init__(input_op)
        self.filename = os.fspath(filename)
        self.name = f"cache({self.filename!r})" if self.filename else "cache"
        self._memory: list[Any] | None = None
        self._memory_start: State | None = None
        self._identity: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process fills its own cache, as a new run would.
        state = super().__getstate__()
        del state["_lock"]
        state["_memory"] = state["_memory_start"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def declared_spec(self) -> Any | None:
        """The input's element spec, or None where there is no element to find it from."""
        try:
            return self.input.element_spec()
        except UnobservableSpec:
            return None

    def identity(self) -> dict[str, Any]:
        """What a cache file records of the pipeline that wrote it (see ``pipeline_identity``)."""
        if self._identity is None:
            self._identity = pipeline_identity(self.input)
        return self._identity

    def make_sink(self) -> Sink:
        """Where a writing pass of this op records its elements."""
        return _FileSink(self) if self.filename else _MemorySink(self)

    def publish_memory(self, elements: list[Any], start: State) -> None:
        with self._lock:
            if self._memory is None:
                self._memory, self._memory_start = elements, start

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        if state is None:
            if self.filename and os.path.exists(self.filename):
                return FileCacheReader(self, None)
            with self._lock:
                memory, start = self._memory, self._memory_start
            if memory is not None and start is not None:
                return MemoryCacheReader(memory, 0, start)
            return CacheWriter(self, ctx, None)
        mode = state_dict(state, self.name, "mode")["mode"]
        if mode == "read" and self.filename:
            return FileCacheReader(self, state)
        if mode == "read":
            start = state_nested(state, "start", self.name)
            with self._lock:
                memory, memory_start = self._memory, self._memory_start
            if memory is not None and memory_start == start:
                index = state_int(state, "index", self.name, 0, len(memory))
                return MemoryCacheReader(memory, index, start)
            # This process does not hold that pass's cache: make it again from where it began.
            return CacheWriter(self, ctx, state)
        if mode in ("write", "pass"):
            return CacheWriter(self, ctx, state)
        raise InvalidStateError(
            self.name, "mode", f"is {mode!r:.60}, not 'read', 'write' or 'pass'"
        )


class MemoryCacheReader(ElementsIterator):
    """Replays a published cache; its state says it was reading, and where the pass that
    wrote the cache began."""

    def __init__(self, elements: list[Any], index: int, start: State) -> None:
        super().__init__(elements, index)
        self.start = start

    def get_state(self) -> State:
        return {"mode": "read", "index": self.index, "start": self.start}


class _MemorySink:
    def __init__(self, op: CacheOp) -> None:
        self.op = op
        self.elements: list[Any] = []

    def add(self, chunk: list[Any]) -> None:
        # Every later epoch hands out these very arrays: made read-only (as tf.data's tensors
        # are immutable), a training loop writing into its batch cannot change what later
        # epochs read; feedline.torch then copies them rather than share them.
        for element in chunk:
            for leaf in flatten(element):
                if type(leaf) is np.ndarray:
                    leaf.flags.writeable = False
        self.elements.extend(chunk)

    def publish(self, start: State) -> None:
        self.op.publish_memory(self.elements, start)

    def discard(self) -> None:
        self.elements = []


class _FileSink:
    """Records elements in a private temporary file, moved into place when published."""

    def __init__(self, op: CacheOp) -> None:
        self.op = op
        self.spec = op.declared_spec()
        # Refuses elements that cannot be stored (datasets, objects) before writing anything.
        self.spec_json = None if self.spec is None else spec_to_json(self.spec, op.name)
        self.leaf_specs = [] if self.spec is None else flatten(self.spec)
        self.count = 0
        directory = os.path.dirname(os.path.abspath(op.filename))
        os.makedirs(directory, exist_ok=True)
        self.tmp_path = f"{op.filename}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.file: BinaryIO | None = open(self.tmp_path, "wb")  # noqa: SIM115 - see discard
        self.file.write(MAGIC)

    def add(self, chunk: list[Any]) -> None:
        assert self.file is not None
        for element in chunk:
            if self.spec is None:  # no spec to be found from the input: the first element's
                self.spec = spec_of(element)
                self.spec_json = spec_to_json(self.spec, self.op.name)
                self.leaf_specs = flatten(self.spec)
            try:
                leaves = leaves_of(element, self.spec, self.leaf_specs)
            except TypeError as e:
                raise TypeError(
                    f"{self.op.name} cannot store element {self.count}: {e} "
                    f"(the element spec is {self.spec})"
                ) from None
            for buffer in framed_record(self.count, leaves):
                self.file.write(buffer)
            self.count += 1

    def publish(self, start: State) -> None:
        assert self.file is not None
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "count": self.count,
            "element_spec": self.spec_json,
            **self.op.identity(),
        }
        meta = json.dumps(metadata).encode("utf-8")
        self.file.write(_RECORD.pack(_END_MARK, len(meta), zlib.crc32(meta)) + meta)
        self.file.write(_TAIL.pack(len(meta)) + TRAILER_MAGIC)
        self.file.close()
        self.file = None
        os.replace(self.tmp_path, self.op.filename)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)


class CacheWriter(ChunkedIterator):
    """Reads the input and records it; publishes only when the pass completes.

    Once it stops recording (an error broke the pass, or a probe pass just looks at an element),
    it passes the input on, and its state is the input's.
    """

    def __init__(self, op: CacheOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.delivered = 0
        self.published = False
        replay = 0
        record = True
        if state is None:
            self.input = op.input.make_iterator(ctx, None)
            self.start = frozen(self.input.get_state())
            record = not ctx.probe
        elif state["mode"] == "pass":
            self.input = op.input.make_iterator(ctx, state_nested(state, "input", op.name))
            self.start = {}  # never recorded: this pass will not be cached
            record = False
        else:  # "write", or "read" of a memory cache this process does not hold
            replay = state_int(state, "index", op.name, 0, known_end(op.cardinality()))
            self.start = state_nested(state, "start", op.name)
            self.input = op.input.make_iterator(ctx, self.start)
        self.inputs = (self.input,)
        self.sink: Sink | None = None
        try:
            if record:
                self.sink = op.make_sink()
            self._replay(replay)
        except BaseException:
            self.close()
            raise

    def _replay(self, count: int) -> None:
        """Read and record the ``count`` elements the saved pass had delivered."""
        while self.delivered < count:
            chunk = self.input.next_chunk(min(count - self.delivered, _REPLAY_CHUNK))
            if not chunk:
                raise InvalidStateError(
                    self.op.name,
                    "index",
                    f"is {count}: the pass it resumes has only {self.delivered} elements",
                )
            self._record(chunk)
            self.delivered += len(chunk)

    def next_chunk(self, max_n: int) -> list[Any]:
        try:
            chunk = self.input.next_chunk(max_n)
        except BaseException:
            # The consumer may go on past an error, but the pass is no longer complete.
            self._stop_recording()
            raise
        if self.sink is not None:
            if chunk:
                self._record(chunk)
            else:
                self._publish()
        self.delivered += len(chunk)
        return chunk

    def _record(self, chunk: list[Any]) -> None:
        assert self.sink is not None
        try:
            self.sink.add(chunk)
        except BaseException:
            self._stop_recording()
            raise

    def _publish(self) -> None:
        sink, self.sink = self.sink, None
        assert sink is not None
        try:
            sink.publish(self.start)
        except BaseException:
            sink.discard()
            raise
        self.published = True

    def get_state(self) -> State:
        if self.sink is not None:
            return {"mode": "write", "start": self.start, "index": self.delivered}
        if self.published and self.op.filename:
            return {"mode": "read", "index": self.delivered}
        if self.published:
            return {"mode": "read", "start": self.start, "index": self.delivered}
        return {"mode": "pass", "input": self.input.get_state()}

    def _stop_recording(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.discard()

    def close(self) -> None:
        self.input.close()
        self._stop_recording()


class FileCacheReader(StageIterator):
    """Reads a cache file's records in order; its state is the index of the next one."""

    def __init__(self, op: CacheOp, state: State | None) -> None:
        self.op = op
        self.path = op.filename
        index = 0 if state is None else state_int(state, "index", op.name)
        self.index = 0
        self.pos = len(MAGIC)
        try:
            self.file: io.BufferedReader | None = open(self.path, "rb")  # noqa: SIM115 - see close
        except FileNotFoundError:
            raise CacheFileError(f"cache file {self.path!r} is gone") from None
        try:
            self._open(index)
        except BaseException:
            self.close()
            raise

    def _corrupt(self, pos: int, why: str) -> CacheFileError:
        return CacheFileError(
            f"cache file {self.path!r} is corrupt or truncated at byte {pos} ({why}); "
            "delete it and the next complete pass will write it again"
        )

    def _foreign(self, why: str) -> CacheFileError:
        return CacheFileError(
            f"cache file {self.path!r} was not written by this pipeline ({why}); delete it "
            "and the next complete pass will write this pipeline's cache"
        )

    def _open(self, index: int) -> None:
        metadata = self._metadata()
        self.count: int = metadata["count"]
        mine = self.op.identity()
        for field, what in (("pipeline", "ops"), ("cardinality", "cardinality")):
            if metadata[field] != mine[field]:
                raise self._foreign(f"its {what}: {metadata[field]!r:.300}, here: {mine[field]!r}")
        if metadata["code"] != mine["code"]:
            raise self._foreign("the code of the functions of its ops differs")
        if mine["cardinality"] >= 0 and self.count != mine["cardinality"]:
            why = f"{self.count} records, where the dataset has {mine['cardinality']} elements"
            raise self._corrupt(self.records_end, why)
        self.template = self._template(metadata["element_spec"])
        self.leaf_specs = [] if self.template is None else flatten(self.template)
        if index > self.count:
            raise InvalidStateError(
                self.op.name, "index", f"is {index}: the cache file holds {self.count} elements"
            )
        assert self.file is not None
        self.file.seek(self.pos)
        while self.index < index:
            length = self._record_header()[0]
            self.pos += _RECORD.size + length
            self.file.seek(self.pos)
            self.index += 1

    def _metadata(self) -> dict[str, Any]:
        """The file's metadata, once its layout and checksum are checked."""
        assert self.file is not None
        magic = self.file.read(len(MAGIC))
        if magic == _MAGIC_1:
            raise self._foreign("an older feedline wrote it, in a format that is not read")
        if magic != MAGIC:
            raise self._corrupt(0, "not a cache file's header")
        size = os.fstat(self.file.fileno()).st_size
        tail = _TAIL.size + len(TRAILER_MAGIC)
        if size < len(MAGIC) + _RECORD.size + tail:
            raise self._corrupt(size, "no trailer")
        self.file.seek(size - tail)
        (meta_len,) = _TAIL.unpack(self.file.read(_TAIL.size))
        if self.file.read(len(TRAILER_MAGIC)) != TRAILER_MAGIC:
            raise self._corrupt(size - len(TRAILER_MAGIC), "no trailer")
        end = size - tail - meta_len - _RECORD.size
        if end < len(MAGIC):
            raise self._corrupt(size - tail, "the trailer's metadata length is wrong")
        self.file.seek(end)
        mark, length, crc = _RECORD.unpack(self.file.read(_RECORD.size))
        meta = self.file.read(meta_len)
        if mark != _END_MARK or length != meta_len or zlib.crc32(meta) != crc:
            raise self._corrupt(end, "the metadata fails its checksum")
        self.records_end = end
        try:
            metadata = json.loads(meta)
        except (ValueError, RecursionError):
            metadata = None
        if not isinstance(metadata, dict) or set(metadata) != _METADATA_FIELDS:
            raise self._corrupt(end, "the metadata is not a cache file's")
        if metadata["format"] != FORMAT or metadata["version"] != VERSION:
            raise self._foreign(f"its format is {metadata['format']!r} {metadata['version']!r}")
        count = metadata["count"]
        if type(count) is not int or count < 0:
            raise self._corrupt(end, f"a record count of {count!r}")
        return metadata

    def _template(self, stored: Any) -> Any:
        """The spec records are read with: the dataset's, where the input gives one, after
        checking that the file's agrees with it; the file's otherwise."""
        declared = self.op.declared_spec()
        if stored is None:
            if self.count:
                raise self._corrupt(self.records_end, "records without an element spec")
            return declared
        try:
            stored_spec = spec_from_json(stored)
        except RecordError as e:
            raise self._corrupt(self.records_end, str(e)) from None
        if declared is None:
            return stored_spec
        try:
            agree = spec_outline(spec_to_json(declared, self.op.name)) == spec_outline(stored)
        except TypeError:  # this dataset's elements cannot be stored: no file holds them
            agree = False
        if not agree:
            raise self._foreign(f"it holds elements of {stored_spec}, this dataset {declared}")
        return declared

    def _record_header(self) -> tuple[int, bytes]:
        """The length and header of the record at ``pos`` (the file is past its header)."""
        assert self.file is not None
        if self.pos >= self.records_end:
            raise self._corrupt(self.pos, f"the records end after {self.index} of {self.count}")
        head = self.file.read(_RECORD.size)
        if len(head) < _RECORD.size:
            raise self._corrupt(self.pos, f"record {self.index} is cut short")
        index, length, _ = _RECORD.unpack(head)
        if index != self.index:
            raise self._corrupt(self.pos, f"record {self.index} is not where it belongs")
        if length > self.records_end - self.pos - _RECORD.size:
            raise self._corrupt(self.pos, f"record {self.index} runs past the records' end")
        return length, head

    def __next__(self) -> Any:
        if self.index >= self.count:
            # A damaged count would otherwise end the data early, silently.
            if self.pos != self.records_end:
                raise self._corrupt(self.pos, f"records go on past the {self.count} counted")
            raise StopIteration
        assert self.file is not None
        length, head = self._record_header()
        payload = np.empty(length, dtype=np.uint8)
        if self.file.readinto(payload.data) != length:
            raise self._corrupt(self.pos, f"record {self.index} is cut short")
        if not frame_intact(head, payload.data):
            raise self._corrupt(self.pos, f"record {self.index} fails its checksum")
        try:
            leaves = decode_leaves(payload, self.leaf_specs)
        except RecordError as e:
            raise self._corrupt(self.pos, f"record {self.index}: {e}") from None
        self.pos += _RECORD.size + length
        self.index += 1
        return pack_like(self.template, leaves)

    def get_state(self) -> State:
        return {"mode": "read", "index": self.index}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_METADATA_FIELDS = {"format", "version", "count", "element_spec", "pipeline", "code", "cardinality"}
