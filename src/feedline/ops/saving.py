"""save / load: a dataset's elements in a directory of feedline's own format.

``element_spec.json`` records the format version, the element spec (nesting included), the
number of elements and the compression; ``elements.jsonl`` (``.jsonl.gz`` with GZIP) holds
one JSON line per element, its leaves encoded as in iterator states. Saving writes new files
and then moves them into place, so an interrupted save leaves any earlier one intact.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from feedline.ops.base import Op
from feedline.ops.in_memory import DatasetSpec, decode_elements, encode_elements
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import NodeIterator, State
from feedline.structure import STRING_DTYPE, TensorSpec, is_namedtuple

FORMAT = "feedline-saved-dataset"
VERSION = 1
METADATA = "element_spec.json"
COMPRESSIONS = (None, "GZIP")


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


def save_elements(elements: Iterable[Any], spec: Any, path: str, compression: str | None) -> None:
    spec_json = spec_to_json(spec)  # refuses what cannot be saved before writing anything
    os.makedirs(path, exist_ok=True)
    data = _data_file(path, compression)
    count = 0
    with _open(data + ".tmp", True, compression) as out:
        for element in elements:
            out.write(json.dumps(encode_elements([element])[0]).encode("ascii") + b"\n")
            count += 1
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "element_spec": spec_json,
        "cardinality": count,
        "compression": compression,
    }
    meta = os.path.join(path, METADATA)
    with open(meta + ".tmp", "w", encoding="utf-8") as f:
        json.dump(metadata, f)
    os.replace(data + ".tmp", data)
    os.replace(meta + ".tmp", meta)
    stale = _data_file(path, "GZIP" if compression is None else None)
    if os.path.exists(stale):
        os.remove(stale)


class LoadOp(Op):
    """The elements a ``save`` wrote to ``path``, read lazily, line by line."""

    def __init__(self, path: str, element_spec: Any, compression: str | None) -> None:
        super().__init__()
        meta = os.path.join(path, METADATA)
        try:
            with open(meta, encoding="utf-8") as f:
                metadata = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no saved dataset at {path!r}: {meta} is missing") from None
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise ValueError(f"{meta} is not from feedline's save (format {VERSION})")
        if compression is not None and compression != metadata["compression"]:
            raise ValueError(
                f"the dataset at {path!r} was saved with compression "
                f"{metadata['compression']!r}, not {compression!r}"
            )
        self.file = _data_file(path, metadata["compression"])
        self.compression = metadata["compression"]
        self.count = int(metadata["cardinality"])
        saved_spec = spec_from_json(metadata["element_spec"])
        self.spec = saved_spec if element_spec is None else element_spec
        self.name = f"load({path})"

    def cardinality(self) -> int:
        return self.count

    def compute_spec(self) -> Any:
        return self.spec

    def make_iterator(self, ctx: IterContext, state: State | None) -> NodeIterator:
        return LoadIterator(self, 0 if state is None else state["offset"])


class LoadIterator(NodeIterator):
    """State: the byte offset of the next line (in the decompressed stream with GZIP)."""

    def __init__(self, op: LoadOp, offset: int) -> None:
        self.op = op
        self.offset = offset
        self.file: io.BufferedIOBase | None = None

    def __next__(self) -> Any:
        if self.file is None:
            self.file = _open(self.op.file, False, self.op.compression)
            self.file.seek(self.offset)
        line = self.file.readline()
        if not line:
            raise StopIteration
        self.offset = self.file.tell()
        return decode_elements([json.loads(line)], self.op.spec)[0]

    def get_state(self) -> State:
        return {"offset": self.offset}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# -- element specs as JSON --------------------------------------------------------------------


def spec_to_json(spec: Any) -> Any:
    if isinstance(spec, TensorSpec):
        dtype = "string" if spec.dtype == STRING_DTYPE else spec.dtype.str
        return {"shape": None if spec.shape is None else list(spec.shape), "dtype": dtype}
    if is_namedtuple(spec):
        fields = list(type(spec)._fields)
        return {"namedtuple": type(spec).__name__, "fields": fields, "items": _parts(spec)}
    if isinstance(spec, tuple):
        return {"tuple": _parts(spec)}
    if isinstance(spec, dict):
        return {"dict": [[key, spec_to_json(value)] for key, value in spec.items()]}
    if isinstance(spec, DatasetSpec):
        raise TypeError("save cannot store elements that are datasets (from window)")
    raise TypeError(f"save cannot store an element spec of type {type(spec).__name__}")


def _parts(spec: tuple[Any, ...]) -> list[Any]:
    return [spec_to_json(part) for part in spec]


def spec_from_json(encoded: Any) -> Any:
    if "dtype" in encoded:
        dtype = STRING_DTYPE if encoded["dtype"] == "string" else np.dtype(encoded["dtype"])
        shape = encoded["shape"]
        return TensorSpec(None if shape is None else tuple(shape), dtype)
    if "namedtuple" in encoded:
        # The saving program's class is not importable here: an equivalent one is made.
        cls = collections.namedtuple(encoded["namedtuple"], encoded["fields"])  # type: ignore[misc]
        return cls(*(spec_from_json(part) for part in encoded["items"]))
    if "tuple" in encoded:
        return tuple(spec_from_json(part) for part in encoded["tuple"])
    # In the saved order (tf.data's load gives no stable order: its spec keeps keys in a map).
    return {key: spec_from_json(value) for key, value in encoded["dict"]}
