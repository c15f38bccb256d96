"""A parallel interleave's reading on threads: what each open dataset's reader may hold, the
datasets of the next input elements opened ahead of the slots (files read before their turn,
in the same order), and, under AUTOTUNE, how many: one stage the tuner moves.

The slots' reading stages measure; this stage adds up their counters, so the tuner sees the
interleave's reading as one stage whose workers are its readers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from feedline.ops.base import AUTOTUNE
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator
from feedline.runtime.parallel import AsyncStage
from feedline.runtime.tunable import Knob, StageMetrics, Tunable

# Datasets opened ahead of the open slots under AUTOTUNE, as tf.data's "future elements"
# (two per slot): with AUTOTUNE's cycle length of 1, file after file, three are read at once.
DATASETS_AHEAD_UNDER_AUTOTUNE = 2
# What a slot reading on a thread may hold ready: this many elements, in chunks of up to half
# of them sized from the reading's cost (~10 ms of it), so elements cross threads up to 128 at
# a time (one at a time, a parallel read ran at 0.09x reading file after file), and a dataset
# opened ahead reads well before its turn; within this many bytes.
SLOT_BUFFER_ELEMENTS = 256
SLOT_BUFFER_BYTES = 4 * 2**20


def datasets_ahead(num_parallel_calls: int | None) -> int:
    """How many of the next input elements' datasets are opened (and read) ahead of the open
    slots: two under AUTOTUNE (tf.data's start); none otherwise (a fixed number of calls is
    at most the cycle length: the slots' readers are all the calls)."""
    return DATASETS_AHEAD_UNDER_AUTOTUNE if num_parallel_calls == AUTOTUNE else 0


@dataclass
class Ahead:
    """An input element read ahead of the slots, its dataset opened (``opened``), or the
    error opening it raised (raised in its turn), or neither (its opening was cut short: it
    is opened in its turn). With ``from_input``, ``error`` is the input's own, raised where
    the input would have raised it, and there is no element."""

    element: Any
    opened: StageIterator | None = None
    error: Exception | None = None
    from_input: bool = False


# Datasets opened ahead, at most: a reader each (a thread), and what its buffer holds.
MOST_AHEAD = 64
# The counters added up over the readers (the rest are levels, or samples, of one stage).
_SUMMED = (
    "elements",
    "chunks",
    "worked",
    "work_wall",
    "work_cpu",
    "consumer_wait",
    "worker_idle",
    "input_wall",
    "buffered_elements",
    "buffered_bytes",
    "errors",
)


class ReadersMetrics(StageMetrics):
    """The counters of an interleave's reading stages, open and closed, added up."""

    def __init__(self, readers: Callable[[], list[AsyncStage]]) -> None:
        super().__init__()
        self._readers = readers
        self._closed: dict[str, float] = dict.fromkeys(_SUMMED, 0.0)
        # Readers already in ``_closed``, which a list of readers taken a moment before may
        # still hold: each is counted once, in one or the other.
        self._retired: weakref.WeakSet[AsyncStage] = weakref.WeakSet()

    def retire(self, reader: AsyncStage) -> None:
        """``reader`` closed: what it counted stays in the sums (levels drop to nothing)."""
        counts = reader.metrics.snapshot()
        with self.lock:
            for name in _SUMMED:
                if not name.startswith("buffered"):
                    self._closed[name] += counts[name]
            self._retired.add(reader)

    def snapshot(self) -> dict[str, float]:
        readers = self._readers()
        with self.lock:
            total = dict(self._closed)
            readers = [r for r in readers if r not in self._retired]
        per_element = 0.0
        for reader in readers:
            counts = reader.metrics.snapshot()
            for name in _SUMMED:
                total[name] += counts[name]
            per_element = max(per_element, counts["bytes_per_element"])
        total["bytes_per_element"] = per_element
        return total


class DatasetsAhead(Tunable):
    """The ``parallelism`` knob: datasets opened ahead of the slots (a reader each). The
    interleave reads ``knobs["parallelism"].value`` when it opens the next ones."""

    def __init__(
        self,
        name: str,
        key: object,
        ctx: IterContext,
        start: int,
        readers: Callable[[], list[AsyncStage]],
        slots: int,
    ) -> None:
        self.name = name
        self.key = key
        self._ctx = ctx
        self._readers = readers
        self._slots = slots
        start = int(ctx.remembered(key).get("parallelism", start))
        self.knobs = {
            "parallelism": Knob("parallelism", start, 0, MOST_AHEAD, True, self._changed),
            "buffer_size": Knob("buffer_size", 1, 1, 1, False),
        }
        self.metrics: ReadersMetrics = ReadersMetrics(readers)
        # Told each new value (the interleave opens that many ahead from then on).
        self.on_change: Callable[[int], None] = lambda value: None
        self.max_buffer_bytes = 0  # each reader holds to its own limit
        self.solo_cpu_share = None
        ctx.register(self)

    def _changed(self) -> None:
        value = self.knobs["parallelism"].value
        self._ctx.remember(self.key, {"parallelism": value})
        self.on_change(value)

    @property
    def chunk_size(self) -> int:
        return 1

    @property
    def has_own_work(self) -> bool:
        return True  # reading is the work its readers do

    def projected_bytes(
        self, parallelism: int | None = None, buffer_size: int | None = None
    ) -> float:
        readers = self._readers()
        if not readers:
            return 0.0
        per_reader = sum(r.projected_bytes() for r in readers) / len(readers)
        ahead = self.knobs["parallelism"].value if parallelism is None else parallelism
        return per_reader * (self._slots + ahead)

    def expect_processes(self) -> None:
        pass  # reading stays on threads

    def close(self) -> None:
        self._ctx.unregister(self)

    def __repr__(self) -> str:
        return f"DatasetsAhead({self.name}: {self.knobs['parallelism'].value})"
