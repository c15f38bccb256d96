"""What a stage's chunks are made of, shared by the async stage and the executors that run its
transform elsewhere (worker processes): an element that failed, the transform's signature, the
executor's protocol, and how many bytes an element holds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np


class Failed:
    """Stands in an output list for an element whose production raised."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


# (elements, their input positions) -> (outputs, indexes of the Failed ones, ascending)
Transform = Callable[[list[Any], Sequence[int]], tuple[list[Any], list[int]]]


class ChunkExecutor(Protocol):
    """Runs a stage's transform outside the stage's threads (``runtime/process/``).

    The stage's worker threads call ``run`` instead of the transform and wait for it, so
    ordering, state and errors stay the stage's; ``parallelism`` is then how many chunks run
    at once elsewhere.
    """

    # How long a chunk should take there: long enough to hide the cost of a hand-off.
    chunk_seconds: float

    def run(self, raw: list[Any], positions: Sequence[int]) -> tuple[list[Any], list[int], float]:
        """Like a ``Transform``, plus the CPU seconds the work took where it ran."""
        ...

    def resize(self, parallelism: int) -> None:
        """The stage's ``parallelism`` knob changed (0 still needs one runner)."""
        ...

    def warm(self) -> None:
        """Return once runners are up to take chunks at once (called on a thread of its own)."""
        ...

    def close(self) -> None: ...


def element_nbytes(element: Any) -> int:
    """Bytes an element holds: array buffers and byte strings (Python objects count 64)."""
    if isinstance(element, np.ndarray):
        return int(element.nbytes)
    if isinstance(element, bytes):
        return len(element)
    if isinstance(element, tuple):
        return sum(element_nbytes(e) for e in element)
    if isinstance(element, dict):
        return sum(element_nbytes(e) for e in element.values())
    if isinstance(element, np.generic):
        return int(element.nbytes)
    return 64


class RowList(list[Any]):
    """Outputs that are the rows of one array, ``stacked`` (results of worker processes):
    ``n`` of them in a row can go to a batch as a slice of it, with no copy."""

    __slots__ = ("stacked",)

    def __init__(self, stacked: np.ndarray) -> None:
        super().__init__(stacked)
        self.stacked = stacked
