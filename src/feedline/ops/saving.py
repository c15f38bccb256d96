"""save / load: a dataset's elements in a directory of feedline's own format.

``element_spec.json`` records the format version, the element spec (nesting included), the
number of elements, the compression, and a CRC32 of these. ``elements.jsonl`` (``.jsonl.gz``
with GZIP) holds one JSON line per element, ``[index, crc32, leaves]``: its leaves encoded as
in iterator states, and the CRC32 of their JSON. Loading checks each line's place, checksum and
leaves (against the element spec) and the count, so a damaged or edited save raises
``DataLossError`` naming the file and the line, and never yields a wrong element. Format 1
(lines of bare leaves, no checksums) is still read, with the checks it allows.

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

from feedline.errors import DataLossError, InvalidStateError
from feedline.ops.base import Op
from feedline.ops.in_memory import decode_elements, encode_elements
from feedline.ops.records import RecordError, leaves_of, spec_from_json, spec_to_json
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import TensorSpec, flatten, same_nesting

FORMAT = "feedline-saved-dataset"
VERSION = 2
METADATA = "element_spec.json"
COMPRESSIONS = (None, "GZIP")
# The metadata's fields in each format version this module reads.
_FIELDS = {
    1: {"format", "version", "element_spec", "cardinality", "compression"},
    2: {"format", "version", "element_spec", "cardinality", "compression", "checksum"},
}


def check_compression(compression: str | None) -> str | None:
    value = compression or None
    if value not in COMPRESSIONS:
        raise ValueError(f"compression must be None or 'GZIP', got {compression!r}")
    return value


def _data_file(path: str, compression: str | None) -> str:
    return os.path.join(path, "elements.jsonl" + (".gz" if compression == "GZIP" else ""))


def _open(file: str, write: bool, compression: str | None) -> io.BufferedIOBase:
    # Binary, so that a line's offset (the iterator's state) is a plain, cheap byte count.
    if compression == "GZIP":
        return gzip.GzipFile(file, "wb" if write else "rb")
    return open(file, "wb") if write else open(file, "rb")


def _checksum(fields: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(fields, sort_keys=True).encode("utf-8"))


def save_elements(elements: Iterable[Any], spec: Any, path: str, compression: str | None) -> None:
    spec_json = spec_to_json(spec, "save")  # refuses what cannot be saved before writing anything
    leaf_specs = flatten(spec)
    os.makedirs(path, exist_ok=True)
    data = _data_file(path, compression)
    count = 0
    try:
        with _open(data + ".tmp", True, compression) as out:
            for element in elements:
                try:
                    leaves_of(element, spec, leaf_specs)
                except TypeError as e:
                    raise TypeError(
                        f"save cannot store element {count}: {e} (the element spec is {spec})"
                    ) from None
                leaves = json.dumps(encode_elements([element])[0])
                crc = zlib.crc32(leaves.encode("ascii"))
                out.write(f"[{count}, {crc}, {leaves}]\n".encode("ascii"))
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
    }
    meta = os.path.join(path, METADATA)
    with open(meta + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**fields, "checksum": _checksum(fields)}, f)
    os.replace(data + ".tmp", data)
    os.replace(meta + ".tmp", meta)
    stale = _data_file(path, "GZIP" if compression is None else None)
    if os.path.exists(stale):
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
    count = metadata["cardinality"]
    if type(count) is not int or count < 0 or metadata["compression"] not in COMPRESSIONS:
        raise DataLossError(
            f"{meta} is damaged: a cardinality of {count!r:.60} or a "
            f"compression of {metadata['compression']!r:.60}"
        )
    try:
        metadata["element_spec"] = spec_from_json(metadata["element_spec"])
    except RecordError as e:
        raise DataLossError(f"{meta} is damaged: {e}") from None
    return metadata


class LoadOp(Op):
    """The elements a ``save`` wrote to ``path``, read lazily, line by line."""

    def __init__(self, path: str, element_spec: Any, compression: str | None) -> None:
        super().__init__()
        metadata = _read_metadata(os.path.join(path, METADATA))
        if compression is not None and compression != metadata["compression"]:
            raise ValueError(
                f"the dataset at {path!r} was saved with compression "
                f"{metadata['compression']!r}, not {compression!r}"
            )
        self.version: int = metadata["version"]
        self.compression: str | None = metadata["compression"]
        self.file = _data_file(path, self.compression)
        self.count: int = metadata["cardinality"]
        saved_spec = metadata["element_spec"]
        if element_spec is not None and not _fits(element_spec, saved_spec):
            raise ValueError(f"element_spec {element_spec} does not fit the saved {saved_spec}")
        self.spec = saved_spec if element_spec is None else element_spec
        self.leaf_specs = flatten(self.spec)
        self.name = f"load({path})"

    def cardinality(self) -> int:
        return self.count

    def compute_spec(self) -> Any:
        return self.spec

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return LoadIterator(self, state)


def _fits(given: Any, saved: Any) -> bool:
    """Whether elements of ``saved`` may be read as ``given`` (a user's element_spec)."""
    return same_nesting(given, saved) and all(
        isinstance(g, TensorSpec) and g.is_compatible_with(s)
        for g, s in zip(flatten(given), flatten(saved))
    )


class LoadIterator(StageIterator):
    """State: the byte offset of the next line (in the decompressed stream with GZIP), and
    the index of its element."""

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
        # The first line read after a restore must be where the state says it is.
        self.resumed = self.index > 0
        self.file: io.BufferedIOBase | None = None

    def _damaged(self, why: str) -> DataLossError:
        return DataLossError(
            f"saved dataset file {self.op.file!r} is damaged at line {self.index + 1} "
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
                file.seek(self.offset - 1)
                before = file.read(1)
            except (OSError, EOFError, zlib.error) as e:
                raise self._damaged(f"it cannot be read: {e}") from e
            if before != b"\n":
                raise self._not_this_file("no line starts there")
        return file

    def __next__(self) -> Any:
        file = self.file if self.file is not None else self._open()
        try:
            line = file.readline()
        except (OSError, EOFError, zlib.error) as e:
            raise self._damaged(f"it cannot be read: {e}") from e
        if not line:
            if self.index < self.op.count and self.resumed:
                raise self._not_this_file("the file ends")
            if self.index < self.op.count:
                raise self._damaged(f"the file ends after {self.index} of {self.op.count} elements")
            raise StopIteration
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

    def get_state(self) -> State:
        return {"offset": self.offset, "index": self.index}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
