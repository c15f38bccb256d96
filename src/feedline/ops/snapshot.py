"""snapshot: persist a dataset's elements on its first complete pass, and read them back on
every later pass, in this run or the next (tf.data's ``Dataset.snapshot``).

As in tf.data, ``path`` holds one snapshot per pipeline: a directory named by the pipeline's
fingerprint (its ops, the code of their functions, its cardinality), so two pipelines given one
path do not read each other's elements, and an edited pipeline writes anew. A pass that stops
early (``take``, ``break``, an error) publishes nothing: the directory appears, complete, when a
pass ends (written aside, then renamed into place).

The directory is feedline's own format, not tf.data's: shard files of records framed and
encoded as in cache files (``records.py``: raw arrays and bytes, never pickle; each record with
its index and a CRC32), and ``snapshot.json`` beside them (the element spec, the shards with
their record counts and sizes, the fingerprint), written last. **It does not read snapshots
tf.data wrote** (nor does tf.data read these): tf.data's are TFRecord-framed, snappy-compressed
tensor protos.

Elements go to shard ``shard_func(element)`` (a non-negative int; all to shard 0 by default).
On reading, ``reader_func(datasets)`` gets a Dataset whose elements are Datasets, one per shard
in shard order, and returns the dataset to read; by default the shards are interleaved one
element at a time, which gives the written order back wherever ``shard_func`` deals elements
round-robin (tf.data's default, ``index % n``, with ``n`` the shard count), and on any machine.

``compression``: ``"AUTO"`` (none: records stay raw arrays, read without decoding), ``None`` or
``""`` (none), or ``"GZIP"`` (each shard file one gzip stream). tf.data's ``"SNAPPY"`` is
refused: no snappy codec is installed with feedline. A snapshot is read with the compression it
was written with.

A state of a reading pass is the reader's state (shard files resume by seeking to a record; a
gzip stream by decompressing up to it); a writing pass is the cache's writer (``CacheWriter``
with shard files for its sink) and resumes as a cache does, by reading its input again from
where the pass began and recording what it had delivered.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import uuid
import zlib
from typing import IO, Any

import numpy as np

from feedline.errors import DataLossError, InvalidStateError, StageError, wrap_user_error
from feedline.ops.base import Op, call_with_element
from feedline.ops.cache import CacheOp, CacheWriter, Sink
from feedline.ops.in_memory import DatasetSpec, ElementsOp, as_dataset
from feedline.ops.records import (
    FRAME,
    RecordError,
    decode_leaves,
    frame_intact,
    framed_record,
    leaves_of,
    spec_from_json,
    spec_outline,
    spec_to_json,
)
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_dict, state_int, state_nested
from feedline.structure import flatten, pack_like

FORMAT = "feedline-snapshot"
VERSION = 1
METADATA = "snapshot.json"
SHARD_MAGIC = b"FLSNAP\x01\n"
_COMPRESSIONS = {"AUTO": "", "": "", "GZIP": "GZIP"}


def check_compression(value: str | None) -> str:
    """The stored compression ("" or "GZIP") that ``value`` asks for."""
    chosen = _COMPRESSIONS.get((value or "").upper())
    if chosen is None:
        raise ValueError(
            f"snapshot compression must be 'AUTO', 'GZIP' or None, got {value!r} (SNAPPY, "
            "tf.data's default, needs a codec feedline does not install)"
        )
    return chosen


def shard_name(shard: int) -> str:
    return f"shard-{shard:08d}.flsnap"


class SnapshotOp(CacheOp):
    """A cache whose writing pass records into shard files (``make_sink``), and whose later
    passes read them through ``reader_func``; the writing pass and its states are the cache's
    (``CacheWriter``)."""

    def __init__(
        self, input_op: Op, path: str, compression: str | None, reader_func: Any, shard_func: Any
    ) -> None:
        super().__init__(input_op, "")
        self.path = path
        self.compression = check_compression(compression)
        self.reader_func = reader_func
        self.shard_func = shard_func
        self.name = f"snapshot({path!r})"

    @property
    def directory(self) -> str:
        """Where this pipeline's snapshot lives: ``path`` / its fingerprint."""
        text = json.dumps(self.identity(), sort_keys=True).encode("utf-8")
        return os.path.join(self.path, hashlib.sha256(text).hexdigest()[:16])

    def make_sink(self) -> Sink:
        return _ShardSinks(self)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        mode = None if state is None else state_dict(state, self.name, "mode")["mode"]
        if mode == "files" or (mode is None and os.path.exists(self.directory)):
            inner = None if state is None else state_nested(state, "reader", self.name)
            return SnapshotReader(self.reader().make_iterator(ctx, inner))
        if mode in (None, "write", "read", "pass"):
            return CacheWriter(self, ctx, state)
        raise InvalidStateError(self.name, "mode", f"is {mode!r:.60}, not a snapshot pass's")

    def reader(self) -> Op:
        """The op reading the published snapshot: ``reader_func`` over its shards."""
        from feedline.dataset import Dataset  # the Dataset module imports the ops

        directory = self.directory
        metadata = _read_metadata(directory, self)
        spec, compression = metadata["spec"], metadata["compression"]
        shards = [
            as_dataset(ShardOp(os.path.join(directory, shard_name(s)), n, size, spec, compression))
            for s, n, size in metadata["shards"]
        ]
        datasets = as_dataset(ElementsOp(shards, DatasetSpec(spec), "snapshot_shards"))
        if self.reader_func is None:
            chosen = datasets.interleave(lambda d: d, cycle_length=max(len(shards), 1))
        else:
            chosen = self.reader_func(datasets)
            if not isinstance(chosen, Dataset):
                raise TypeError(
                    f"{self.name}: reader_func must return a Dataset, got {type(chosen).__name__}"
                )
        return chosen._op


def _read_metadata(directory: str, op: SnapshotOp) -> dict[str, Any]:
    """The published snapshot's metadata, checked: a ``DataLossError`` for anything this
    pipeline's writer could not have written there."""
    where = os.path.join(directory, METADATA)

    def damaged(why: str) -> DataLossError:
        return DataLossError(
            f"snapshot {where!r} {why}; delete {directory!r} and the next complete pass "
            "will write it again"
        )

    try:
        with open(where, "rb") as f:
            metadata = json.loads(f.read())
    except FileNotFoundError:
        raise damaged("is missing") from None
    except (ValueError, RecursionError):
        raise damaged("is not JSON") from None
    fields = {"format", "version", "compression", "element_spec", "shards", *op.identity()}
    if not isinstance(metadata, dict) or set(metadata) != fields:
        raise damaged("is not a feedline snapshot's metadata")
    if (metadata["format"], metadata["version"]) != (FORMAT, VERSION):
        raise damaged(f"has format {metadata['format']!r} {metadata['version']!r}")
    if any(metadata[k] != v for k, v in op.identity().items()):
        raise damaged("was written by another pipeline")
    if metadata["compression"] not in ("", "GZIP"):
        raise damaged(f"names a compression {metadata['compression']!r:.40}")
    shards = metadata["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(p, list) and len(p) == 3 and all(type(v) is int and v >= 0 for v in p)
        for p in shards
    ):
        raise damaged("lists its shards wrongly")
    try:
        spec = spec_from_json(metadata["element_spec"])
        declared = spec_to_json(op.input.element_spec(), op.name)
    except RecordError as e:
        raise damaged(f"holds a bad element spec: {e}") from None
    if spec_outline(declared) != spec_outline(metadata["element_spec"]):
        raise damaged(f"holds elements of {spec}, this dataset {op.input.element_spec()}")
    return {"spec": op.input.element_spec(), "shards": shards, **metadata}


class SnapshotReader(StageIterator):
    """Elements of the reader dataset; its state says it reads."""

    def __init__(self, reader: StageIterator) -> None:
        self.reader = reader
        self.inputs = (reader,)

    def __next__(self) -> Any:
        return next(self.reader)

    def next_chunk(self, max_n: int) -> list[Any]:
        return self.reader.next_chunk(max_n)

    def get_state(self) -> State:
        return {"mode": "files", "reader": self.reader.get_state()}


# -- shard files ------------------------------------------------------------------------------


class _ShardSinks:
    """The shard files of one writing pass, in a private directory renamed into place when
    the pass completes. A shard is ``SHARD_MAGIC`` then records framed as in cache files (index,
    length, CRC32: ``records.framed_record``); with GZIP, the whole file is one gzip stream."""

    def __init__(self, op: SnapshotOp) -> None:
        self.op = op
        self.spec = op.input.element_spec()
        # Refuses elements that cannot be stored (datasets, objects) before writing anything.
        self.spec_json = spec_to_json(self.spec, op.name)
        self.leaf_specs = flatten(self.spec)
        self.final = op.directory
        self.tmp = f"{self.final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.tmp)
        self.files: dict[int, IO[bytes]] = {}
        self.counts: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.position = 0

    def add(self, chunk: list[Any]) -> None:
        for element in chunk:
            shard = self._shard_of(element)
            try:
                leaves = leaves_of(element, self.spec, self.leaf_specs)
            except TypeError as e:
                raise StageError(
                    self.op.name, self.position, f"cannot store it: {e} (spec {self.spec})"
                ) from None
            f = self._file(shard)
            for buffer in framed_record(self.counts[shard], leaves):
                f.write(buffer)
                self.sizes[shard] += len(buffer)
            self.counts[shard] += 1
            self.position += 1

    def _shard_of(self, element: Any) -> int:
        if self.op.shard_func is None:
            return 0
        try:
            shard = call_with_element(self.op.shard_func, element)
        except Exception as e:
            raise wrap_user_error(self.op.name, self.position, e) from e
        if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or shard < 0:
            raise StageError(
                self.op.name,
                self.position,
                f"shard_func returned {shard!r}: it must return a non-negative int",
            )
        return int(shard)

    def _file(self, shard: int) -> IO[bytes]:
        f = self.files.get(shard)
        if f is None:
            f = open(os.path.join(self.tmp, shard_name(shard)), "wb")  # noqa: SIM115 - closed in _close
            if self.op.compression == "GZIP":
                f = gzip.GzipFile(fileobj=f, mode="wb")  # type: ignore[assignment]
            f.write(SHARD_MAGIC)
            self.files[shard], self.counts[shard], self.sizes[shard] = f, 0, len(SHARD_MAGIC)
        return f

    def _close(self) -> None:
        for f in self.files.values():
            inner = getattr(f, "fileobj", None)  # a GzipFile leaves its file open
            f.close()
            if inner is not None:
                inner.close()

    def publish(self, start: State) -> None:
        self._close()
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "compression": self.op.compression,
            "element_spec": self.spec_json,
            # Per shard: its number, its record count, and its (decompressed) size in bytes.
            "shards": [[s, self.counts[s], self.sizes[s]] for s in sorted(self.counts)],
            **self.op.identity(),
        }
        with open(os.path.join(self.tmp, METADATA), "wb") as meta:
            meta.write(json.dumps(metadata).encode("utf-8"))
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not os.path.isdir(self.final):
                raise
            # Another pass of this pipeline published first: the same elements, kept.
            shutil.rmtree(self.tmp, ignore_errors=True)

    def discard(self) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ShardOp(Op):
    """The records of one shard file, checked against the snapshot's element spec."""

    def __init__(self, path: str, count: int, size: int, spec: Any, compression: str) -> None:
        super().__init__()
        self.path = path
        self.count = count
        self.size = size
        self.spec = spec
        self.leaf_specs = flatten(spec)
        self.compression = compression
        self.name = f"snapshot_shard({os.path.basename(path)!r})"

    def cardinality(self) -> int:
        return self.count

    def compute_spec(self) -> Any:
        return self.spec

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return ShardReader(self, state)


class ShardReader(StageIterator):
    """State: the index of the next record and its byte offset in the (decompressed) shard;
    a restore seeks there (a gzip stream by decompressing up to it)."""

    def __init__(self, op: ShardOp, state: State | None) -> None:
        self.op = op
        self.index = 0
        self.pos = len(SHARD_MAGIC)
        try:
            raw = open(op.path, "rb")  # noqa: SIM115 - see close
        except FileNotFoundError:
            raise DataLossError(f"snapshot shard {op.path!r} is missing") from None
        self.raw: IO[bytes] | None = raw
        self.file: IO[bytes] | None = raw
        if op.compression == "GZIP":
            self.file = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        try:
            if self._read(len(SHARD_MAGIC)) != SHARD_MAGIC:
                raise self._damaged(0, "not a snapshot shard's header")
            if state is not None:
                self._seek(state)
        except BaseException:
            self.close()
            raise

    def _read(self, n: int) -> bytes:
        assert self.file is not None
        try:
            return self.file.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise self._damaged(self.pos, f"not a valid {self.op.compression} stream: {e}") from e

    def _seek(self, state: State) -> None:
        name = self.op.name
        index = state_int(state, "index", name, 0, self.op.count)
        pos = state_int(state, "offset", name, len(SHARD_MAGIC), self.op.size)
        assert self.file is not None
        self.file.seek(pos)
        head = self._read(FRAME.size)
        at_end = index == self.op.count and pos == self.op.size
        if not at_end and (len(head) < FRAME.size or FRAME.unpack(head)[0] != index):
            raise InvalidStateError(name, "offset", f"is {pos}: record {index} is not there")
        self.file.seek(pos)
        self.index, self.pos = index, pos

    def _damaged(self, pos: int, why: str) -> DataLossError:
        return DataLossError(f"snapshot shard {self.op.path!r} is damaged at byte {pos}: {why}")

    def __next__(self) -> Any:
        if self.index >= self.op.count:
            if self.pos != self.op.size or self._read(1):
                raise self._damaged(self.pos, f"records go on past the {self.op.count} counted")
            raise StopIteration
        head = self._read(FRAME.size)
        if len(head) < FRAME.size:
            raise self._damaged(self.pos, f"record {self.index} is cut short")
        index, length, _ = FRAME.unpack(head)
        if index != self.index or length > self.op.size - self.pos - FRAME.size:
            raise self._damaged(self.pos, f"record {self.index} is not where it belongs")
        payload = self._read(length)
        if len(payload) < length or not frame_intact(head, payload):
            raise self._damaged(self.pos, f"record {self.index} fails its checksum")
        try:
            leaves = decode_leaves(np.frombuffer(payload, dtype=np.uint8), self.op.leaf_specs)
        except RecordError as e:
            raise self._damaged(self.pos, f"record {self.index}: {e}") from None
        self.pos += FRAME.size + length
        self.index += 1
        return pack_like(self.op.spec, leaves)

    def get_state(self) -> State:
        return {"index": self.index, "offset": self.pos}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None
