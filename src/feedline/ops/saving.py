"""save / load: a dataset's elements in a directory of feedline's own format, and loading the
directories ``tf.data.Dataset.save`` writes (``tf_snapshot.py``).

Format 3, written now. ``element_spec.json`` records the format version, the element spec
(nesting included), the number of elements, the compression, the size of the data in bytes
(decompressed), and a CRC32 of these. ``elements.bin`` (``elements.bin.gz`` with GZIP) holds
one framed record per element (``records.py``, as cache files do): its index, its length and a
CRC32, then its leaves as raw bytes with their dtypes and shapes: 120 MB of float32 take
120 MB and some 60 bytes per element. Never pickle: loading decodes no code, and checks each
record's place, checksum and leaves (against the element spec: nesting, dtypes, ranks) and the
count, so a damaged or edited save raises ``DataLossError`` naming the file and the record, and
never yields a wrong element.

Formats 1 and 2 (one JSON line per element, its leaves base64-encoded: a third larger than
the data) are still read, with the checks they allow.

Saving writes new files and then moves them into place, so an interrupted save leaves any
earlier one intact.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from feedline.errors import DataLossError, InvalidStateError
from feedline.ops.base import Op
from feedline.ops.in_memory import decode_elements
from feedline.ops.records import (
    FRAME,
    RecordError,
    decode_leaves,
    frame_intact,
    framed_record,
    leaves_of,
    spec_from_json,
    spec_to_json,
)
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import TensorSpec, flatten, pack_like, same_nesting

FORMAT = "feedline-saved-dataset"
VERSION = 3
METADATA = "element_spec.json"
COMPRESSIONS = (None, "GZIP")
# The metadata's fields in each format version this module reads.
_FIELDS = {
    1: {"format", "version", "element_spec", "cardinality", "compression"},
    2: {"format", "version", "element_spec", "cardinality", "compression", "checksum"},
    3: {"format", "version", "element_spec", "cardinality", "compression", "checksum", "bytes"},
}
# The data file of each format (the ".gz" of GZIP added).
_DATA_NAMES = {1: "elements.jsonl", 2: "elements.jsonl", 3: "elements.bin"}


def check_compression(compression: str | None) -> str | None:
    value = compression or None
    if value not in COMPRESSIONS:
        raise ValueError(f"compression must be None or 'GZIP', got {compression!r}")
    return value


def _data_file(path: str, version: int, compression: str | None) -> str:
    return os.path.join(path, _DATA_NAMES[version] + (".gz" if compression == "GZIP" else ""))


def _open(file: str, write: bool, compression: str | None) -> io.BufferedIOBase:
    # Binary, so that an element's offset (the iterator's state) is a plain, cheap byte count.
    if compression == "GZIP":
        return gzip.GzipFile(file, "wb" if write else "rb")
    return open(file, "wb") if write else open(file, "rb")


def _checksum(fields: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(fields, sort_keys=True).encode("utf-8"))


def save_elements(elements: Iterable[Any], spec: Any, path: str, compression: str | None) -> None:
    spec_json = spec_to_json(spec, "save")  # refuses what cannot be saved before writing anything
    leaf_specs = flatten(spec)
    os.makedirs(path, exist_ok=True)
    data = _data_file(path, VERSION, compression)
    count = size = 0
    try:
        with _open(data + ".tmp", True, compression) as out:
            for element in elements:
                try:
                    leaves = leaves_of(element, spec, leaf_specs)
                except TypeError as e:
                    raise TypeError(
                        f"save cannot store element {count}: {e} (the element spec is {spec})"
                    ) from None
                for buffer in framed_record(count, leaves):
                    out.write(buffer)
                    size += len(buffer)
                count += 1
    except BaseException:
        os.remove(data + ".tmp")
        raise
    fields = {
        "format": FORMAT,
        "version": VERSION,
        "element_spec": spec_json,
        "cardinality": count,
        "compression": compression,
        "bytes": size,
    }
    meta = os.path.join(path, METADATA)
    with open(meta + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**fields, "checksum": _checksum(fields)}, f)
    os.replace(data + ".tmp", data)
    os.replace(meta + ".tmp", meta)
    for version in (1, 3):  # the data files of other formats and compressions: stale now
        for other in (None, "GZIP"):
            stale = _data_file(path, version, other)
            if stale != data and os.path.exists(stale):
                os.remove(stale)


def _read_metadata(meta: str) -> dict[str, Any]:
    """The metadata in ``meta``, its fields checked; a DataLossError if it is damaged."""
    try:
        with open(meta, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        where = os.path.dirname(meta)
        raise FileNotFoundError(f"no saved dataset at {where!r}: {meta} is missing") from None
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError):
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DataLossError(f"{meta} is not from feedline's save, or it is damaged")
    version = metadata.get("version")
    if type(version) is not int or version not in _FIELDS or set(metadata) != _FIELDS[version]:
        raise DataLossError(f"{meta} is damaged or from another feedline: its fields are wrong")
    if version >= 2:
        fields = {key: value for key, value in metadata.items() if key != "checksum"}
        if metadata["checksum"] != _checksum(fields):
            raise DataLossError(f"{meta} is damaged: it fails its checksum")
    count, size = metadata["cardinality"], metadata.get("bytes", 0)
    if (
        type(count) is not int
        or count < 0
        or type(size) is not int
        or size < 0
        or metadata["compression"] not in COMPRESSIONS
    ):
        raise DataLossError(
            f"{meta} is damaged: a cardinality of {count!r:.60}, a size of {size!r:.60} or a "
            f"compression of {metadata['compression']!r:.60}"
        )
    try:
        metadata["element_spec"] = spec_from_json(metadata["element_spec"])
    except RecordError as e:
        raise DataLossError(f"{meta} is damaged: {e}") from None
    return metadata


class LoadOp(Op):
    """The elements a ``save`` wrote to ``path`` (or ``tf.data.Dataset.save``), read lazily."""

    def __init__(self, path: str, element_spec: Any, compression: str | None) -> None:
        super().__init__()
        self.name = f"load({path})"
        if is_tf_save(path):
            from feedline.ops.tf_snapshot import TfSave

            saved: Any = TfSave(path, compression)
            saved_spec, self.count = saved.spec, saved.count
            self.tf_save: Any = saved
        else:
            self.tf_save = None
            metadata = _read_metadata(os.path.join(path, METADATA))
            if compression is not None and compression != metadata["compression"]:
                raise ValueError(
                    f"the dataset at {path!r} was saved with compression "
                    f"{metadata['compression']!r}, not {compression!r}"
                )
            self.version: int = metadata["version"]
            self.compression: str | None = metadata["compression"]
            self.file = _data_file(path, self.version, self.compression)
            self.count = metadata["cardinality"]
            self.size: int = metadata.get("bytes", 0)
            saved_spec = metadata["element_spec"]
        if element_spec is not None and not _fits(element_spec, saved_spec):
            raise ValueError(f"element_spec {element_spec} does not fit the saved {saved_spec}")
        self.spec = saved_spec if element_spec is None else element_spec
        self.leaf_specs = flatten(self.spec)

    def cardinality(self) -> int:
        return int(self.count)

    def compute_spec(self) -> Any:
        return self.spec

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        if self.tf_save is not None:
            return self.tf_save.make_iterator(self, state)
        if self.version >= 3:
            return RecordIterator(self, state)
        return LineIterator(self, state)


def is_tf_save(path: str) -> bool:
    """Whether ``path`` holds what ``tf.data.Dataset.save`` writes rather than feedline's."""
    return not os.path.exists(os.path.join(path, METADATA)) and os.path.exists(
        os.path.join(path, "snapshot.metadata")
    )


def _fits(given: Any, saved: Any) -> bool:
    """Whether elements of ``saved`` may be read as ``given`` (a user's element_spec)."""
    return same_nesting(given, saved) and all(
        isinstance(g, TensorSpec) and g.is_compatible_with(s)
        for g, s in zip(flatten(given), flatten(saved))
    )


class SavedFileIterator(StageIterator):
    """Reads a saved data file front to back. State: the byte offset of the next element (in
    the decompressed stream with GZIP), and its index."""

    unit = "element"

    def __init__(self, op: LoadOp, state: State | None) -> None:
        self.op = op
        self.offset = 0
        self.index = 0
        if state is not None:
            self.offset = state_int(state, "offset", op.name)
            self.index = state_int(state, "index", op.name, 0, op.count)
            if (self.offset == 0) != (self.index == 0):
                raise InvalidStateError(
                    op.name, "offset", f"is {self.offset}, for element {self.index}"
                )
        # The first element read after a restore must be where the state says it is.
        self.resumed = self.index > 0
        self.file: io.BufferedIOBase | None = None

    def _damaged(self, why: str) -> DataLossError:
        return DataLossError(
            f"saved dataset file {self.op.file!r} is damaged at {self.unit} {self.index + 1} "
            f"(byte {self.offset}): {why}"
        )

    def _not_this_file(self, why: str) -> InvalidStateError:
        return InvalidStateError(
            self.op.name,
            "offset",
            f"is {self.offset}, where in {self.op.file!r} {why}: the state is not from this "
            "file, or the file changed since",
        )

    def _open(self) -> io.BufferedIOBase:
        try:
            file = _open(self.op.file, False, self.op.compression)
        except FileNotFoundError:
            raise self._damaged("the file is missing") from None
        self.file = file
        if self.offset:
            try:
                self._seek(file)
            except (OSError, EOFError, zlib.error) as e:
                raise self._damaged(f"it cannot be read: {e}") from e
        return file

    def _seek(self, file: io.BufferedIOBase) -> None:
        file.seek(self.offset)

    def _read(self, read: Any, *args: Any) -> Any:
        """``read(*args)`` on the open file; damage if it cannot be read."""
        try:
            return read(*args)
        except (OSError, EOFError, zlib.error) as e:
            raise self._damaged(f"it cannot be read: {e}") from e

    def _at_end(self) -> None:
        """Nothing more in the file: the end, if every element was read."""
        if self.index < self.op.count and self.resumed:
            raise self._not_this_file("the file ends")
        if self.index < self.op.count:
            raise self._damaged(f"the file ends after {self.index} of {self.op.count} elements")
        raise StopIteration

    def get_state(self) -> State:
        return {"offset": self.offset, "index": self.index}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class RecordIterator(SavedFileIterator):
    """Format 3: framed records of raw leaves."""

    unit = "record"

    def __next__(self) -> Any:
        file = self.file if self.file is not None else self._open()
        header = self._read(file.read, FRAME.size)
        if not header:
            self._at_end()
        if len(header) < FRAME.size:
            if self.resumed:  # where the state points, no record begins
                raise self._not_this_file("no whole record begins")
            raise self._damaged("the record is cut short")
        index, length, _ = FRAME.unpack(header)
        if index != self.index:
            if self.resumed:
                raise self._not_this_file(f"record {index} is there, not record {self.index}")
            raise self._damaged(f"record {index} is where record {self.index} belongs")
        self.resumed = False
        if self.index >= self.op.count:
            raise self._damaged(f"records go on past the {self.op.count} elements saved")
        # Bounded by the size saved, so a damaged length asks for no more memory than that.
        if length > self.op.size - self.offset - FRAME.size:
            raise self._damaged(f"its length {length} runs past the data's end")
        payload = np.empty(length, dtype=np.uint8)
        if self._read(file.readinto, payload.data) != length:
            raise self._damaged("the record is cut short")
        if not frame_intact(header, payload.data):
            raise self._damaged("the record fails its checksum")
        try:
            leaves = decode_leaves(payload, self.op.leaf_specs)
        except RecordError as e:
            raise self._damaged(f"{e} (the element spec is {self.op.spec})") from None
        self.offset += FRAME.size + length
        self.index += 1
        return pack_like(self.op.spec, leaves)


class LineIterator(SavedFileIterator):
    """Formats 1 and 2: one JSON line per element."""

    unit = "line"

    def _seek(self, file: io.BufferedIOBase) -> None:
        file.seek(self.offset - 1)
        if file.read(1) != b"\n":
            raise self._not_this_file("no line starts there")

    def __next__(self) -> Any:
        file = self.file if self.file is not None else self._open()
        line = self._read(file.readline)
        if not line:
            self._at_end()
        if not line.endswith(b"\n"):
            raise self._damaged("the line is cut short")
        leaves = self._leaves(line)
        if self.index >= self.op.count:
            raise self._damaged(f"lines go on past the {self.op.count} elements saved")
        element = self._element(leaves)
        self.offset += len(line)
        self.index += 1
        return element

    def _leaves(self, line: bytes) -> Any:
        """The encoded leaves of ``line``, once its place and checksum are checked."""
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            raise self._damaged("the line is not JSON") from None
        if self.op.version == 1:
            return entry
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and type(entry[0]) is int
            and type(entry[1]) is int
        ):
            raise self._damaged("the line is not an element's [index, crc32, leaves]")
        index, crc, leaves = entry
        if index != self.index:
            if self.resumed:
                raise self._not_this_file(f"element {index} is there, not element {self.index}")
            raise self._damaged(f"element {index} is where element {self.index} belongs")
        self.resumed = False
        if zlib.crc32(json.dumps(leaves).encode("utf-8")) != crc:
            raise self._damaged("the line fails its checksum")
        return leaves

    def _element(self, leaves: Any) -> Any:
        try:
            element = decode_elements([leaves], self.op.spec)[0]
            leaves_of(element, self.op.spec, self.op.leaf_specs)
        except ValueError as e:  # leaves save could not have written
            raise self._damaged(str(e)) from None
        except TypeError as e:  # leaves of another spec
            raise self._damaged(f"{e} (the element spec is {self.op.spec})") from None
        return element
