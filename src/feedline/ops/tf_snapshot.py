"""Loading the directories ``tf.data.Dataset.save`` writes (TensorFlow 2.x), without TensorFlow.

The layout (``tensorflow/core/data/snapshot_utils.cc``, snapshot format version 2)::

    snapshot.metadata                        a SnapshotMetadataRecord proto: the run id, one
                                             dtype per component, the element count, finalized
    dataset_spec.pb                          a StructuredValue proto: the element spec
    <run id>/<shard>.shard/<checkpoint>.snapshot
                                             TFRecord files (GZIP-compressed with
                                             compression="GZIP"), one record per component
                                             of each element: a serialized TensorProto

Each TensorProto holds its dtype, its shape and ``tensor_content``: the values' bytes, or for
strings the varint lengths of all of them followed by their bytes. The three messages are read
by the small protobuf wire decoder below (a dozen fields of three messages do not justify a
dependency on ``protobuf`` and TensorFlow's generated classes); the TFRecord framing and its
CRC32C checks are ``feedline.io.tfrecord``'s. Elements come shard by shard, in file order
(tf.data's default ``reader_func`` interleaves the shards, in an order that depends on the
machine). Anything the writer could not have written is a ``DataLossError`` naming the file;
tensors in any other form than ``tensor_content``, and the ``SNAPPY`` compression, are refused
with one too.
"""

from __future__ import annotations

import collections
import glob
import math
import os
from typing import Any

import numpy as np

from feedline.errors import DataLossError, InvalidStateError
from feedline.ops.base import Op
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import STRING_DTYPE, TensorSpec, flatten, pack_like, scalar_if_0d

# TensorFlow's DataType enum (types.proto) for the dtypes a numpy element can hold.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    7: STRING_DTYPE,
    8: np.dtype("<c8"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    17: np.dtype("<u2"),
    18: np.dtype("<c16"),
    19: np.dtype("<f2"),
    22: np.dtype("<u4"),
    23: np.dtype("<u8"),
}
_SNAPSHOT_VERSION = 2
_GZIP_MAGIC = b"\x1f\x8b"
# The read buffer of a shard file (tf.data's TFRecord default).
_BLOCK = 256 * 1024


class ProtoError(ValueError):
    """Bytes that are not the protobuf message expected."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtoError(f"a varint runs past byte {pos}")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if byte < 0x80:
            return value, pos


def proto_fields(buf: bytes) -> dict[int, list[Any]]:
    """A message's fields by number, each a list of its values in order: ints for varints and
    fixed-width numbers, bytes for length-delimited ones (strings, messages, packed lists)."""
    fields: dict[int, list[Any]] = collections.defaultdict(list)
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ProtoError(f"field {number} of {length} bytes runs past the message")
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ProtoError(f"field {number} runs past the message")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        else:
            raise ProtoError(f"field {number} has wire type {wire}")
        fields[number].append(value)
    return fields


def _repeated_varints(values: list[Any]) -> list[int]:
    """A repeated enum or integer field, packed (bytes) or not (ints), as ints."""
    out: list[int] = []
    for value in values:
        if isinstance(value, bytes):
            pos = 0
            while pos < len(value):
                number, pos = _varint(value, pos)
                out.append(number)
        else:
            out.append(value)
    return out


def _one(fields: dict[int, list[Any]], number: int, default: Any) -> Any:
    values = fields.get(number)
    return values[-1] if values else default  # protobuf: the last occurrence wins


def _dtype(number: int) -> np.dtype:
    if number not in _DTYPES:
        raise ProtoError(f"TensorFlow dtype {number}, which no numpy element holds")
    return _DTYPES[number]


def _shape(buf: bytes) -> tuple[int | None, ...] | None:
    """A TensorShapeProto: dims (field 2, each a Dim with size 1), unknown_rank (3)."""
    fields = proto_fields(buf)
    if _one(fields, 3, 0):
        return None
    dims = []
    for dim in fields.get(2, []):
        size = _one(proto_fields(dim), 1, 0)
        size = size - (1 << 64) if size >= 1 << 63 else size  # int64: -1 is unknown
        dims.append(None if size < 0 else size)
    return tuple(dims)


def spec_from_structured_value(buf: bytes, depth: int = 0) -> Any:
    """An element spec from a StructuredValue proto (``nested_structure_coder``'s encoding):
    tensor specs (33), tuples and lists (52, 51), dicts (53) and namedtuples (54)."""
    if depth > 64:
        raise ProtoError("the element spec nests too deeply")
    fields = proto_fields(buf)
    if 33 in fields:
        spec = proto_fields(fields[33][-1])
        return TensorSpec(_shape(_one(spec, 2, b"")), _dtype(_one(spec, 3, 0)))
    for number in (52, 51):
        if number in fields:
            parts = proto_fields(fields[number][-1]).get(1, [])
            return tuple(spec_from_structured_value(p, depth + 1) for p in parts)
    if 53 in fields:
        out = {}
        for entry in proto_fields(fields[53][-1]).get(1, []):
            pair = proto_fields(entry)
            key = _one(pair, 1, b"").decode("utf-8")
            out[key] = spec_from_structured_value(_one(pair, 2, b""), depth + 1)
        return {key: out[key] for key in sorted(out)}  # a proto map has no order: tf.nest's
    if 54 in fields:
        named = proto_fields(fields[54][-1])
        names, values = [], []
        for entry in named.get(2, []):
            pair = proto_fields(entry)
            names.append(_one(pair, 1, b"").decode("utf-8"))
            values.append(spec_from_structured_value(_one(pair, 2, b""), depth + 1))
        kind = collections.namedtuple(_one(named, 1, b"").decode("utf-8") or "Element", names)  # type: ignore[misc]
        return kind(*values)
    raise ProtoError(f"an element spec of a kind feedline does not read (fields {sorted(fields)})")


def decode_tensor(buf: bytes, spec: TensorSpec) -> Any:
    """The value of a serialized TensorProto, which must be of ``spec``'s dtype and rank."""
    fields = proto_fields(buf)
    dtype = _dtype(_one(fields, 1, 0))
    if dtype != spec.dtype:
        raise ProtoError(f"a tensor of {dtype} where {spec} belongs")
    shape = _shape(_one(fields, 2, b""))
    if shape is None or None in shape:
        raise ProtoError("a tensor without a full shape")
    if spec.shape is not None and len(shape) != len(spec.shape):
        raise ProtoError(f"a tensor of shape {shape} where {spec} belongs")
    if set(fields) - {1, 2, 3, 4}:
        raise ProtoError("a tensor stored other than as tensor_content, which is not read")
    content = _one(fields, 4, b"")
    count = math.prod(d for d in shape if d is not None)
    if dtype == STRING_DTYPE:
        lengths, pos = [], 0
        for _ in range(count):
            length, pos = _varint(content, pos)
            lengths.append(length)
        if pos + sum(lengths) != len(content):
            raise ProtoError("string lengths that do not add up to the tensor's bytes")
        value = np.empty(count, dtype=object)
        for i, length in enumerate(lengths):
            value[i] = content[pos : pos + length]
            pos += length
    else:
        if len(content) != count * dtype.itemsize:
            raise ProtoError(f"{len(content)} bytes for a {shape} tensor of {dtype}")
        value = np.frombuffer(content, dtype=dtype).copy()
    return scalar_if_0d(value.reshape(shape))


class TfSave:
    """What ``tf.data.Dataset.save`` wrote at ``path``: spec, count and shard files."""

    def __init__(self, path: str, compression: str | None) -> None:
        if compression not in (None, "GZIP"):
            raise ValueError(f"compression must be None or 'GZIP', got {compression!r}")
        self.path = path
        meta_file = os.path.join(path, "snapshot.metadata")
        try:
            with open(meta_file, "rb") as f:
                meta = proto_fields(f.read())
            with open(os.path.join(path, "dataset_spec.pb"), "rb") as f:
                self.spec = spec_from_structured_value(f.read())
            run_id = _one(meta, 2, b"").decode("utf-8")
            dtypes = [_dtype(d) for d in _repeated_varints(meta.get(5, []))]
        except (OSError, ProtoError, UnicodeDecodeError) as e:
            raise DataLossError(f"{path!r} is not a tf.data save feedline reads: {e}") from None
        version = _one(meta, 4, 0)
        if version != _SNAPSHOT_VERSION or not _one(meta, 1000, 0):
            raise DataLossError(
                f"{meta_file!r}: snapshot format {version}"
                + ("" if _one(meta, 1000, 0) else ", not finalized (the save did not finish)")
                + f"; feedline reads finished saves of format {_SNAPSHOT_VERSION}"
            )
        self.leaf_specs = flatten(self.spec)
        if [s.dtype for s in self.leaf_specs] != dtypes or os.sep in run_id or not run_id:
            raise DataLossError(f"{meta_file!r} does not agree with dataset_spec.pb")
        self.count: int = _one(meta, 6, 0)
        pattern = os.path.join(glob.escape(path), glob.escape(run_id), "*.shard", "*.snapshot")
        self.files = sorted(glob.glob(pattern))
        if self.count and not self.files:
            raise DataLossError(f"{path!r}: the shard files of run {run_id} are missing")
        self.compression = compression

    def file_compression(self, file: str) -> str:
        """The file's compression in ``feedline.io.tfrecord``'s spelling."""
        if self.compression is not None:
            return self.compression
        with open(file, "rb") as f:
            return "GZIP" if f.read(2) == _GZIP_MAGIC else ""

    def make_iterator(self, op: Op, state: State | None) -> StageIterator:
        return TfSaveIterator(self, op.name, state)


class TfSaveIterator(StageIterator):
    """State: the shard file being read, the byte offset of the next element's first record
    in it (decompressed), and the index of that element."""

    def __init__(self, save: TfSave, name: str, state: State | None) -> None:
        self.save = save
        self.name = name
        self.file = self.offset = self.index = 0
        if state is not None:
            self.file = state_int(state, "file", name, 0, max(len(save.files) - 1, 0))
            self.offset = state_int(state, "offset", name)
            self.index = state_int(state, "index", name, 0, save.count)
        self.reader: Any = None
        self.records: collections.deque[bytes] = collections.deque()
        self.done = False

    def _open(self) -> Any:
        from feedline.io.tfrecord import open_records

        name = self.save.files[self.file]
        try:
            reader = open_records(name, self.save.file_compression(name), _BLOCK, self.offset)
        except InvalidStateError as e:
            raise InvalidStateError(self.name, "offset", str(e)) from None
        self.reader = reader
        return reader

    def _record(self) -> bytes | None:
        """The next record of the current file, or None at its end."""
        while not self.records:
            if self.done:
                return None
            reader = self.reader if self.reader is not None else self._open()
            out: list[bytes] = []
            self.done = reader.read(out)
            self.records.extend(out)
        return self.records.popleft()

    def __next__(self) -> Any:
        while self.file < len(self.save.files):
            leaves, size = self._element()
            if leaves is not None:
                self.offset += size
                self.index += 1
                if self.index > self.save.count:
                    raise self._damaged(f"it holds more than the {self.save.count} elements saved")
                return pack_like(self.save.spec, leaves)
            self.close()
            self.file, self.offset, self.done = self.file + 1, 0, False
        if self.index < self.save.count:
            raise self._damaged(f"the files end after {self.index} of {self.save.count} elements")
        raise StopIteration

    def _element(self) -> tuple[list[Any] | None, int]:
        """The next element's leaves in the current file (None at its end), and its size."""
        leaves: list[Any] = []
        size = 0
        for spec in self.save.leaf_specs:
            record = self._record()
            if record is None:
                if leaves:
                    raise self._damaged("the file ends inside an element")
                return None, 0
            try:
                leaves.append(decode_tensor(record, spec))
            except ProtoError as e:
                raise self._damaged(str(e)) from None
            size += len(record) + 16  # its TFRecord framing: length, two CRCs
        return leaves, size

    def _damaged(self, why: str) -> DataLossError:
        file = self.save.files[min(self.file, len(self.save.files) - 1)]
        return DataLossError(
            f"tf.data save {self.save.path!r}: {file!r} is damaged at element {self.index} "
            f"(byte {self.offset}): {why}"
        )

    def get_state(self) -> State:
        return {"file": self.file, "offset": self.offset, "index": self.index}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.records.clear()
