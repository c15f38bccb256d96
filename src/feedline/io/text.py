"""Text files: one element per line, as bytes without the line ending (like tf.data)."""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Sequence
from typing import IO, Any

from feedline.errors import InvalidStateError
from feedline.io.compressed import compression_name
from feedline.io.fs import as_name, file_size, open_binary
from feedline.ops.base import UNKNOWN, Op
from feedline.ops.interleave import InterleaveOp
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_int
from feedline.structure import STRING_DTYPE, TensorSpec


class TextLineOp(Op):
    def __init__(self, paths: Sequence[str], compression_type: str) -> None:
        super().__init__()
        self.paths = list(paths)
        self.compression = compression_name(compression_type)
        self.name = "text_lines"

    def cardinality(self) -> int:
        return 0 if not self.paths else UNKNOWN

    def compute_spec(self) -> Any:
        return TensorSpec((), STRING_DTYPE)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return TextLineIterator(self, state)


class TextLineIterator(StageIterator):
    """State: the file index and the line index in it. Uncompressed files also record the byte
    offset so resuming seeks instead of re-reading."""

    def __init__(self, op: TextLineOp, state: State | None) -> None:
        self.op = op
        self.file_index = 0
        self.line = 0
        self.offset = 0
        self.handle: IO[bytes] | None = None
        self.raw: IO[bytes] | None = None  # what a compressed handle reads from
        if state is not None:
            self._restore(state)

    def _restore(self, state: State) -> None:
        name = self.op.name
        self.file_index = state_int(state, "file", name, 0, len(self.op.paths))
        line = state_int(state, "line", name)
        offset = state_int(state, "offset", name)
        if self.file_index == len(self.op.paths):
            if line or offset:
                raise InvalidStateError(name, "line", f"is {line}, past the last file")
            return
        # Every line read is at least one byte (its line ending at least).
        if (line == 0) != (offset == 0) or line > offset:
            raise InvalidStateError(name, "offset", f"is {offset} after {line} lines")
        self._open()
        try:
            if self.op.compression == "":
                self._seek(offset)
                self.line = line
            else:
                self._replay(line, offset)
        except BaseException:
            self.close()
            raise

    def _seek(self, offset: int) -> None:
        """Go to ``offset``, which must be where a line of the file starts (or its end)."""
        assert self.handle is not None
        size = file_size(self.op.paths[self.file_index])
        if offset > size:
            raise InvalidStateError(self.op.name, "offset", f"is {offset}, past the file's end")
        if 0 < offset < size:
            self.handle.seek(offset - 1)
            if self.handle.read(1) != b"\n":
                raise InvalidStateError(self.op.name, "offset", f"is {offset}, inside a line")
        self.handle.seek(offset)
        self.offset = offset

    def _replay(self, lines: int, offset: int) -> None:
        """Read ``lines`` lines again (a compressed file cannot seek), which must end at
        ``offset`` bytes of the decompressed file."""
        assert self.handle is not None
        while self.line < lines:
            raw = self.handle.readline()
            if not raw:
                raise InvalidStateError(self.op.name, "line", f"is {lines}, past the file's end")
            self.line += 1
            self.offset += len(raw)
        if self.offset != offset:
            raise InvalidStateError(
                self.op.name, "offset", f"is {offset}, but {lines} lines end at {self.offset}"
            )

    def _open(self) -> None:
        path = self.op.paths[self.file_index]
        raw = open_binary(path)  # a local path, or a URL through fsspec
        if self.op.compression == "GZIP":
            self.raw = raw  # a GzipFile leaves the file it reads from open
            self.handle = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        elif self.op.compression == "ZLIB":
            with raw:
                self.handle = io.BytesIO(zlib.decompress(raw.read()))
        else:
            self.handle = raw
        self.line = 0
        self.offset = 0

    def _readline(self) -> bytes | None:
        while True:
            if self.handle is None:
                if self.file_index >= len(self.op.paths):
                    return None
                self._open()
            assert self.handle is not None
            raw = self.handle.readline()
            if raw:
                self.line += 1
                self.offset += len(raw)
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                # tf.data's line reader drops every '\r', not only one before the '\n'.
                return raw.replace(b"\r", b"") if b"\r" in raw else raw
            self._close_file()
            self.file_index += 1
            self.line = 0
            self.offset = 0

    def __next__(self) -> Any:
        line = self._readline()
        if line is None:
            raise StopIteration
        return line

    def next_chunk(self, max_n: int) -> list[Any]:
        out = []
        for _ in range(max_n):
            line = self._readline()
            if line is None:
                break
            out.append(line)
        return out

    def get_state(self) -> State:
        return {"file": self.file_index, "line": self.line, "offset": self.offset}

    def close(self) -> None:
        self._close_file()

    def _close_file(self) -> None:
        for f in (self.handle, self.raw):
            if f is not None:
                f.close()
        self.handle = self.raw = None


class TextLineInterleaveOp(InterleaveOp):
    """Lines of the files a dataset of filenames names, ``cycle_length`` files at a time.

    An interleave whose element spec is known without reading a line (a plain interleave
    observes its first element, which fails when every file is empty).
    """

    def __init__(self, filenames: Op, compression_type: str, cycle_length: int) -> None:
        compression_type = compression_name(compression_type)
        super().__init__(
            filenames,
            lambda f: _dataset(TextLineOp([as_name(f)], compression_type)),
            cycle_length,
            1,
            name="text_lines",
        )

    def compute_spec(self) -> Any:
        return TensorSpec((), STRING_DTYPE)


def _dataset(op: Op) -> Any:
    from feedline.dataset import Dataset

    return Dataset(op)
