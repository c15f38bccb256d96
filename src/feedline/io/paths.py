"""File-name matching with tf.data's rules, for ``Dataset.list_files``.

Unlike Python's ``glob``: a wildcard (``*``, ``?``, ``[...]``) matches within one path
component and matches names starting with a dot too, ``**`` is just ``*``, and every
pattern's matches are kept, so a file matched by two patterns is listed twice.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

_WILDCARDS = frozenset("*?[")


def _has_wildcard(component: str) -> bool:
    return any(c in _WILDCARDS for c in component)


def match_pattern(pattern: str) -> list[str]:
    """Paths matching one pattern, sorted."""
    if not _has_wildcard(pattern):
        return [pattern] if os.path.exists(pattern) else []
    absolute = pattern.startswith(os.sep)
    components = [c for c in pattern.split(os.sep) if c]
    candidates = [os.sep if absolute else ""]
    for component in components:
        next_candidates = []
        for base in candidates:
            if not _has_wildcard(component):
                path = os.path.join(base, component)
                if os.path.lexists(path):
                    next_candidates.append(path)
                continue
            try:
                names = os.listdir(base or ".")
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            next_candidates += [
                os.path.join(base, name) for name in names if fnmatch.fnmatchcase(name, component)
            ]
        candidates = next_candidates
    return sorted(candidates)


def match_files(patterns: Sequence[str]) -> list[str]:
    """Every pattern's matches, sorted together, duplicates kept (as tf.data lists them)."""
    return sorted(path for pattern in patterns for path in match_pattern(pattern))
