"""What both sides of an ``AsyncStage`` share: its chunks, its fields, and how they are locked.

Locking, the whole of it (every side module follows these rules):

- ``_lock`` (a plain ``Lock``) guards the bookkeeping: the open chunks and their ``ready`` /
  ``nbytes``, the sequence counters, ``_reserved`` and ``_ready_bytes``, ``_finished_order``,
  ``_retired_ranges``, ``_journals``, the end, the crash and ``_closing``. Its three conditions
  (``_results_ready``, ``_space_free``, ``_parked``) are on that same lock, so a waiter always
  re-checks what it waits for under the lock that changes it.
- ``_input_lock`` (an ``RLock``) makes workers take turns at the input: it guards ``_input``,
  ``_next_position``, ``_skip`` and ``_replay``'s pulling. It is taken *before* ``_lock``,
  never while holding it.
- A chunk's ``outputs``/``failures``/``delivered`` belong to whoever holds it: the worker that
  issued it until it is marked ready (under ``_lock``), then the consumer alone, which is why
  the consumer's fast path reads them with no lock.
- The sizer's estimates (``_sizer``) are written outside the locks, one float or int at a
  time: a reader may see the previous estimate, never a torn one, and estimates are only ever
  approximate.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from feedline.errors import StageCrashedError
from feedline.runtime.chunks import ChunkExecutor, Transform
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.replay import ForcedOrder, Journal
from feedline.runtime.stage.sizing import ChunkSizer
from feedline.runtime.stage.start import FirstCalls
from feedline.runtime.tunable import Knob, StageMetrics, Tunable

if TYPE_CHECKING:
    from feedline.runtime.process.executor import ExecutorSwitch


class Chunk:
    """Elements pulled together: input positions [start, end), of which ``positions`` were
    kept (a restored state may have dropped some), and their outputs once transformed."""

    __slots__ = (
        "delivered",
        "end",
        "failures",
        "nbytes",
        "outputs",
        "positions",
        "pull_seconds",
        "ready",
        "seq",
        "start",
        "start_state",
    )

    def __init__(
        self, seq: int, start_state: State, start: int, end: int, positions: Sequence[int]
    ) -> None:
        self.seq = seq
        self.start_state = start_state
        self.start = start
        self.end = end
        self.positions = positions
        self.outputs: list[Any] = []
        self.failures: list[int] = []  # indexes of Failed outputs, ascending
        self.ready = False
        self.delivered = 0
        self.nbytes = 0
        self.pull_seconds = 0.0  # taking it from the input, which workers do one at a time


class StageCore(StageIterator, Tunable):
    """The fields every side of the stage reads (set in ``AsyncStage.__init__``), and the
    sizing every side asks for. The sides are mixins over this one object, not helpers
    holding a reference to it: the hot paths then read ``self._x`` directly, with no extra
    hop per element."""

    name: str
    key: object
    ctx: IterContext
    transform: Transform | None
    # Where the transform runs when not on this stage's threads (which then dispatch to it).
    executor: ChunkExecutor | None
    deterministic: bool
    knobs: dict[str, Knob]
    metrics: StageMetrics
    max_buffer_bytes: int
    solo_cpu_share: float | None

    _lock: threading.Lock
    _results_ready: threading.Condition
    _space_free: threading.Condition
    _parked: threading.Condition
    _end_parked: bool  # workers beyond the parallelism end at once (see release_parked)
    _parallelism_seen: int
    _input_lock: threading.RLock
    _input: StageIterator
    _next_position: int
    _skip: list[list[int]]
    _switch: ExecutorSwitch | None
    _sizer: ChunkSizer
    # The parallelism the first calls' measurement sets (see ``start.py``); None once chosen.
    _start_parallelism: int | None
    _first_cost: float | None  # seconds per element of the first inline chunk, once run
    # A read-ahead stage's watch of its consumer's first calls (see ``start.py``); None
    # once chosen, or when the stage does not choose.
    _first_calls: FirstCalls | None

    _open: dict[int, Chunk]  # issued, not fully delivered, by sequence number
    _finished_order: list[int]  # ready chunks in finishing order (non-det mode)
    # Input ranges fully delivered while an older chunk is still open (non-det mode).
    _retired_ranges: list[list[int]]
    _issued: int
    # Chunks from this sequence number on hold plain ranges of positions, each starting where
    # the one before ended (earlier ones may have skipped positions or be replayed).
    _plain_from_seq: int
    _deliver_seq: int
    _end_seq: int | None
    _reserved: int  # elements taken (or about to be taken) from input, not delivered
    _ready_bytes: int
    _current: Chunk | None
    _workers: list[threading.Thread]
    _closing: bool
    _closed: bool
    _crash: StageCrashedError | None
    _crash_raised: bool
    # States given out in finishing-order mode, still recording what is delivered.
    _journals: list[weakref.ref[Journal]]
    # Restored from a state with an order to deliver first.
    _replay: ForcedOrder | None

    @property
    def parallelism(self) -> int:
        return self.knobs["parallelism"].value

    def _wake_all(self) -> None:
        self._space_free.notify_all()
        self._parked.notify_all()
        self._results_ready.notify_all()

    # -- sizing: the stage's knobs and executor, put to its ``ChunkSizer`` (once a chunk) ----

    def buffer_limit(self, parallelism: int | None = None, buffer_size: int | None = None) -> int:
        """Elements that may be taken from the input and not yet delivered (with the knobs
        set as given, or as they are)."""
        return self._sizer.buffer_limit(
            self.parallelism if parallelism is None else parallelism,
            self.knobs["buffer_size"].value if buffer_size is None else buffer_size,
            self.executor is not None,
        )

    def projected_bytes(
        self, parallelism: int | None = None, buffer_size: int | None = None
    ) -> float:
        elements = self.buffer_limit(parallelism, buffer_size)
        return min(elements * self._sizer.bytes_per_element, 1.5 * self.max_buffer_bytes)

    def _next_chunk_size(self) -> int:
        return self._sizer.next_size(
            self.parallelism,
            self.knobs["buffer_size"].value,
            self.max_buffer_bytes,
            self.executor is not None,
        )

    def _learn_cost(self, elements: int, seconds: float) -> None:
        executor = self.executor
        self._sizer.learn_cost(
            elements, seconds, None if executor is None else executor.chunk_seconds
        )

    @property
    def chunk_size(self) -> int:
        return self._sizer.chunk_size
