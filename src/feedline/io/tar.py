"""WebDataset ``.tar`` shards: ``TarShardDataset`` reads samples, ``TarShardWriter`` writes them.

The WebDataset convention (webdataset's ``tariterators``): a member ``dir/name.seg.png``
has the key ``dir/name`` (its path up to the first dot of its base name) and the extension
``seg.png`` (the rest, lower-cased); consecutive members with the same key make one sample.
Members that are not regular files, names without a dot in their base name, and metadata
names (``__...__``) are skipped, as webdataset skips them.

Shards are read with Python's ``tarfile`` in stream mode, so any file object serves (fsspec's
too), gzip/bz2/xz shards included; members are never extracted to disk.
"""

from __future__ import annotations

import functools
import io
import re
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import numpy as np

from feedline.errors import DataLossError, InvalidStateError
from feedline.io import fs
from feedline.io.files import parallel_reads, read_files
from feedline.ops.base import UNKNOWN, Op
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.states import state_dict, state_int
from feedline.structure import STRING_DTYPE, TensorSpec

KEY = "__key__"
# webdataset's own patterns: the key/extension split and the metadata names it skips.
_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
# The first bytes of the compressions tarfile's stream mode undoes: gzip, bzip2, xz.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# What tarfile raises on a block of zeros, the end-of-archive marker (not in typeshed's stubs).
_END_OF_ARCHIVE = tarfile.EOFHeaderError  # type: ignore[attr-defined]


class _Damaged(Exception):
    def __init__(self, offset: int, problem: str) -> None:
        super().__init__(problem)
        self.offset = offset


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile ends an archive silently at a header it cannot read past its first member (a
    file cut at a member's end, a damaged header); these end it with an error instead. Only a
    block of zeros (the end-of-archive marker) ends it."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _CheckedTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            if isinstance(e, _END_OF_ARCHIVE):
                raise
            # Empty or cut short: the file ends early; otherwise the header is damaged.
            raise _Damaged(tarfile_.offset, f"no readable member header ({e})") from None


@dataclass
class _Member:
    offset: int  # of its first header block in the (uncompressed) archive
    key: str
    extension: str
    data: bytes


class _Shard:
    """One shard read member by member from ``offset`` (a member's first header block).

    An uncompressed file is read from there (a seek); a compressed one cannot seek, so its
    members before ``offset`` are read past."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self.handle: IO[bytes] = fs.open_binary(path)
        try:
            compressed = self.handle.read(6).startswith(_COMPRESSED)
            self.base = 0 if compressed else offset
            self.skip_to = offset if compressed else 0
            self.handle.seek(self.base)
            self.tar = tarfile.open(  # noqa: SIM115 - closed by close()
                fileobj=self.handle,
                mode="r|*" if compressed else "r|",  # a header read mid-file is no magic number
                tarinfo=_CheckedTarInfo,
            )
        except BaseException as e:
            self.handle.close()
            # tarfile reads the first header on opening.
            if isinstance(e, _Damaged | tarfile.TarError | EOFError | zlib.error):
                raise DataLossError(f"{path}: not a readable tar file at byte {offset}: {e}") from e
            raise

    def next_member(self) -> _Member | None:
        """The next sample file of the shard, or None at its end."""
        while True:
            where = self.base + self.tar.offset
            try:
                info = self.tar.next()
                if info is None:
                    return None
                # tarfile keeps every header it reads otherwise (webdataset empties it too).
                self.tar.members = []  # type: ignore[attr-defined]
                where = self.base + info.offset
                split = _SPLIT.match(info.name)
                if where < self.skip_to or not info.isreg() or split is None:
                    continue
                if _META.match(info.name):
                    continue
                body = self.tar.extractfile(info)
                assert body is not None  # a regular file has a body
                data = body.read()
            except _Damaged as e:
                where = self.base + e.offset
                raise DataLossError(f"{self.path}: at byte {where}: {e}") from None
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DataLossError(
                    f"{self.path}: truncated or damaged at byte {where}: {e}"
                ) from e
            return _Member(where, split.group(1), split.group(2).lower(), data)

    def close(self) -> None:
        self.tar.close()
        self.handle.close()


def _first_extensions(paths: Sequence[str]) -> list[str] | None:
    """The extensions of the first sample of the first shard that has one (None: none has)."""
    for path in paths:
        shard = _Shard(path, 0)
        try:
            first = shard.next_member()
            if first is None:
                continue
            extensions = [first.extension]
            member = shard.next_member()
            while member is not None and member.key == first.key:
                extensions.append(member.extension)
                member = shard.next_member()
            return sorted(set(extensions))
        finally:
            shard.close()
    return None


class TarShardOp(Op):
    def __init__(self, paths: list[str], extensions: list[str], declared: bool) -> None:
        super().__init__()
        self.paths = paths
        self.extensions = extensions
        self.declared = declared
        self.name = "tar_shards"

    def cardinality(self) -> int:
        return 0 if not self.paths else UNKNOWN

    def compute_spec(self) -> Any:
        return {k: TensorSpec((), STRING_DTYPE) for k in [KEY, *self.extensions]}

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return TarShardIterator(self, state)


class TarShardIterator(StageIterator):
    """State: ``shard`` (index in the paths), ``offset`` (the byte where the next sample's
    first member header starts) and ``key`` (that sample's key, checked on resuming; None at
    a shard's start). Resuming seeks there (in a compressed shard: reads up to it)."""

    def __init__(self, op: TarShardOp, state: State | None) -> None:
        self.op = op
        self.index = 0
        self.shard: _Shard | None = None
        self.pending: _Member | None = None  # the next sample's first member, already read
        if state is not None:
            self._restore(state)

    def _restore(self, state: State) -> None:
        name = self.op.name
        self.index = state_int(state, "shard", name, 0, len(self.op.paths))
        offset = state_int(state, "offset", name)
        key = state_dict(state, name, "key")["key"]
        if key is not None and not isinstance(key, str):
            raise InvalidStateError(name, "key", f"is {key!r}, not a string or None")
        if (offset == 0) != (key is None) or (self.index == len(self.op.paths) and offset):
            raise InvalidStateError(name, "key", f"is {key!r} at byte {offset}")
        if offset % tarfile.BLOCKSIZE:
            raise InvalidStateError(name, "offset", f"is {offset}, not at a tar block")
        if offset == 0:
            return
        try:
            self.shard = _Shard(self.op.paths[self.index], offset)
            self.pending = self.shard.next_member()
        except DataLossError as e:
            self.close()
            raise InvalidStateError(
                name, "offset", f"is {offset}, where no member starts: {e}"
            ) from e
        if self.pending is None or (self.pending.offset, self.pending.key) != (offset, key):
            self.close()
            raise InvalidStateError(name, "offset", f"is {offset}, not where {key!r} starts")

    def __next__(self) -> Any:
        while True:
            if self.shard is None:
                if self.index >= len(self.op.paths):
                    raise StopIteration
                try:
                    self.shard = _Shard(self.op.paths[self.index], 0)
                except Exception:
                    self.index += 1  # a shard that cannot be opened is left behind too
                    raise
                self._read_pending()
            if self.pending is None:
                self._next_shard()
                continue
            return self._sample()

    def _read_pending(self) -> None:
        """Read the next member; a damaged shard is left behind before the error goes up,
        so ``ignore_errors()`` goes on with the next shard."""
        assert self.shard is not None
        try:
            self.pending = self.shard.next_member()
        except DataLossError:
            self._next_shard()
            raise

    def _next_shard(self) -> None:
        if self.shard is not None:
            self.shard.close()
        self.shard, self.pending = None, None
        self.index += 1

    def _sample(self) -> dict[str, Any]:
        first = self.pending
        assert first is not None
        sample = {KEY: first.key.encode("utf-8"), first.extension: first.data}
        repeated = []
        self._read_pending()
        while self.pending is not None and self.pending.key == first.key:
            if self.pending.extension in sample:
                repeated.append(self.pending.extension)
            sample[self.pending.extension] = self.pending.data
            self._read_pending()
        where = f"{self.op.paths[self.index]}: sample {first.key!r} at byte {first.offset}"
        if repeated:
            raise ValueError(f"{where} has more than one member with extension {repeated}")
        return self._checked(sample, where)

    def _checked(self, sample: dict[str, Any], where: str) -> dict[str, Any]:
        wanted = self.op.extensions
        have = sorted(k for k in sample if k != KEY)
        if have == wanted:
            return sample
        missing = sorted(set(wanted) - set(have))
        if self.op.declared and not missing:
            return {k: sample[k] for k in [KEY, *wanted]}  # the extensions asked for
        raise ValueError(
            f"{where} has the extensions {have}, not {wanted}"
            + (
                ""
                if self.op.declared
                else " (those of the first sample): declare the ones to read with "
                "extensions=[...], which every sample must have"
            )
        )

    def get_state(self) -> State:
        if self.shard is not None and self.pending is None:
            return {"shard": self.index + 1, "offset": 0, "key": None}
        if self.pending is None:
            return {"shard": self.index, "offset": 0, "key": None}
        return {"shard": self.index, "offset": self.pending.offset, "key": self.pending.key}

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None


def _read_path(extensions: list[str] | None, path: Any) -> Any:
    """One shard of a Dataset of paths."""
    return TarShardDataset(path, extensions)


def _read_shard(extensions: list[str], declared: bool, path: Any) -> Any:
    """One shard of a list read in parallel, with the extensions found for the list."""
    from feedline.dataset import Dataset

    return Dataset(TarShardOp([fs.as_name(path)], extensions, declared))


def TarShardDataset(
    paths: Any,
    extensions: Sequence[str] | None = None,
    num_parallel_reads: int | None = None,
    *,
    shard: tuple[int, int] | None = None,
) -> Any:
    """WebDataset samples from ``.tar`` shards, shard after shard: one dict per sample, with
    ``"__key__"`` (bytes) and one ``bytes`` value per member extension (``"jpg"``,
    ``"cls"``...), as ``webdataset.WebDataset(paths)`` gives them undecoded.

    tf.data has no tar reader; this is the counterpart of ``webdataset.WebDataset`` and of
    torchdata's ``load_from_tar().webdataset()``. ``paths``: a path or URL, a list of them,
    or a Dataset of them. The element spec is ``{"__key__", *extensions}``, all string
    scalars. ``extensions``: the ones to read; every sample must have them (others are
    dropped). Without it they are those of the first sample of the first shard, read when
    the dataset is built; a later sample with other extensions is then an error naming it
    (never an element of another structure).

    ``num_parallel_reads``: ``n`` shards read at once, one sample from each in turn, or
    ``AUTOTUNE``, exactly as ``ParquetDataset``'s (tf.data's ``TFRecordDataset``'s order).

    ``shard=(n, i)``: every n-th shard from the i-th, the others never opened (this needs at
    least ``n`` shards; ``Dataset.shard(n, i)`` keeps tf.data's every-n-th-sample meaning).
    A damaged or truncated shard is a ``DataLossError`` naming the file and the byte offset
    (in the decompressed archive), after the samples before the damage; the sample being read
    is dropped, since the damaged header may have been one of its own. The error ends its
    shard: ``ignore_errors()`` goes on with the next. (Tar keeps no checksum of member data,
    only of headers: a flipped byte inside a member's data cannot be detected.)
    """
    from feedline.dataset import Dataset

    reads = parallel_reads(num_parallel_reads)
    if isinstance(paths, Dataset):
        if shard is not None:
            raise ValueError("shard=(n, i) splits a list of paths; shard a Dataset of them")
        chosen = None if extensions is None else list(extensions)
        return read_files(paths, functools.partial(_read_path, chosen), reads, "tar_shards")
    names = fs.as_names(paths)
    if extensions is None:
        found = _first_extensions(names)
        declared, wanted = False, [] if found is None else found
    else:
        declared, wanted = True, sorted({str(e).lower() for e in extensions})
        if KEY in wanted or not all(wanted):
            raise ValueError(f"extensions must be member extensions, got {list(extensions)}")
    if shard is not None:
        n, i = shard
        if not (isinstance(n, int) and isinstance(i, int) and 0 <= i < n):
            raise ValueError(f"shard must be (num_shards, index) with 0 <= index < n, got {shard}")
        if n > len(names):
            raise ValueError(
                f"shard=({n}, {i}) splits by file and there are {len(names)} shards: use "
                ".shard(n, i) to take every n-th sample instead"
            )
        names = names[i::n]
    if reads is None:
        return Dataset(TarShardOp(names, wanted, declared))
    files = Dataset.from_tensor_slices(np.array(names, dtype=object))
    return read_files(files, functools.partial(_read_shard, wanted, declared), reads, "tar_shards")


class TarShardWriter:
    """Writes samples into a WebDataset ``.tar`` shard (``webdataset.TarWriter``'s
    counterpart): ``write({"__key__": "000001", "jpg": b"...", "cls": 3})``.

    A value is ``bytes`` (or any buffer), ``str`` (written as UTF-8) or an ``int`` (written as
    its decimal text, webdataset's ``.cls`` convention). Members are written in the sample's
    order with fixed metadata (mode 0444, time 0), so the same samples make the same bytes.
    Use as a context manager, or call ``close()``: the end-of-archive marker is written then.
    """

    def __init__(self, path: Any) -> None:
        self.path = fs.as_name(path)
        self._handle = fs.create_binary(self.path)
        # Stream mode: only appends, so any fsspec file can be written.
        self._tar: tarfile.TarFile | None = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=self._handle, mode="w|"
        )
        self._last_key: str | None = None

    def write(self, sample: Mapping[str, Any]) -> None:
        if self._tar is None:
            raise ValueError(f"{self.path}: the writer is closed")
        key = _key(sample)
        if key == self._last_key:
            raise ValueError(f"key {key!r} again: consecutive samples would merge into one")
        members = [
            (_extension(ext, key), _payload(ext, v)) for ext, v in sample.items() if ext != KEY
        ]
        if not members:
            raise ValueError(f"sample {key!r} has no member besides {KEY!r}")
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._last_key = key

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._handle.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _key(sample: Mapping[str, Any]) -> str:
    if KEY not in sample:
        raise ValueError(f"a sample needs a {KEY!r}, got keys {sorted(sample)}")
    key = sample[KEY]
    key = key.decode("utf-8") if isinstance(key, bytes) else key
    split = _SPLIT.match(f"{key}.x") if isinstance(key, str) else None
    if split is None or split.group(1) != key:
        raise ValueError(f"{KEY} {key!r} must be a non-empty name without a dot in its last part")
    return key


def _extension(extension: Any, key: str) -> str:
    if (
        not isinstance(extension, str)
        or not extension
        or "/" in extension
        or extension != extension.lower()
        or extension.startswith("_")
    ):
        raise ValueError(
            f"sample {key!r}: {extension!r} is not an extension a reader gives back "
            "(non-empty, lower case, no '/', not starting with '_')"
        )
    return extension


def _payload(extension: str, value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return str(int(value)).encode("ascii")
    raise TypeError(
        f"{extension!r}: a member is bytes, str or int, got {type(value).__name__}; encode "
        "it first (e.g. json.dumps, PNG/JPEG bytes, np.save to a BytesIO)"
    )
