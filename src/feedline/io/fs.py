"""Opening files for every reader: local paths with nothing extra, URLs through fsspec.

A name with a scheme (``memory://``, ``file://``, ``http://``, ``s3://``, ``gs://``...) is
opened with fsspec, the ``feedline[cloud]`` extra; a plain path with Python's ``open``. Readers
call only these functions, so every format takes the same names.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from types import ModuleType
from typing import IO, Any

from feedline.io.paths import match_files

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the '{module}' package: pip install 'feedline[{extra}]'"
        ) from error


def as_name(name: Any) -> str:
    """A file name given as str, bytes, a numpy scalar or an os.PathLike, as str."""
    if isinstance(name, bytes):
        return name.decode("utf-8")
    if hasattr(name, "item") and not isinstance(name, str):
        return as_name(name.item())
    return os.fspath(name)


def as_names(names: Any) -> list[str]:
    """One name or a sequence of them (not a Dataset: readers handle those by interleave)."""
    if isinstance(names, str | bytes) or hasattr(names, "__fspath__"):
        return [as_name(names)]
    if hasattr(names, "ndim") and names.ndim == 0:
        return [as_name(names)]
    return [as_name(n) for n in names]


def is_url(name: str) -> bool:
    return bool(_URL.match(name))


def _fsspec() -> ModuleType:
    return require("fsspec", "cloud", "Reading a URL")


def open_binary(name: str) -> IO[bytes]:
    """The file opened for reading bytes; a missing one raises ``FileNotFoundError`` naming it."""
    if not is_url(name):
        return open(name, "rb")
    try:
        return _fsspec().open(name, "rb").open()  # type: ignore[no-any-return]
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no such file: {name}") from error


def create_binary(name: str) -> IO[bytes]:
    """A new file opened for writing bytes (replacing one of that name)."""
    if not is_url(name):
        return open(name, "wb")
    return _fsspec().open(name, "wb").open()  # type: ignore[no-any-return]


def file_size(name: str) -> int:
    if not is_url(name):
        return os.path.getsize(name)
    fs, path = _fsspec().core.url_to_fs(name)
    return int(fs.size(path))


def exists(name: str) -> bool:
    if not is_url(name):
        return os.path.exists(name)
    fs, path = _fsspec().core.url_to_fs(name)
    return bool(fs.exists(path))


def glob(patterns: Sequence[str]) -> list[str]:
    """Names matching the patterns, sorted, with tf.data's rules for local paths; URLs by
    fsspec's glob, returned with their scheme."""
    local = [p for p in patterns if not is_url(p)]
    found = match_files(local) if local else []
    for pattern in patterns:
        if not is_url(pattern):
            continue
        fs, path = _fsspec().core.url_to_fs(pattern)
        found += [fs.unstrip_protocol(p) for p in fs.glob(path)]
    return sorted(found)
