"""The asynchronous stage: worker threads run a chunk transform ahead of the consumer.

One class serves parallel ``map``, ``random_map`` and ``prefetch`` (a transform that does
nothing, one worker): workers take turns pulling a chunk from the input (under the input
lock, noting the input's state and position first), transform it outside the lock, and file
the result under a sequence number. The consumer delivers results in sequence order — so the
output order is the sequential order whatever the parallelism — or, with
``deterministic=False``, in the order they finish.

Knobs (``runtime/tunable.py``) change while the stage runs: ``parallelism`` is the number of
worker threads (0 runs the transform inline in the consumer's thread, with no hand-off at
all); ``buffer_size`` bounds the elements taken from the input and not yet delivered. A
separate byte limit bounds what finished results may hold.

State: the consumer's position is the oldest chunk not fully delivered — its input state and
start position — plus the positions already delivered after that point. Restoring reopens
the input there and drops those positions before transforming, so a resumed pass yields
exactly what the original would have, in either order mode.

A stage that delivers in finishing order records in the states it gives out the order it
delivers in after them, and restored, delivers in that order first (``runtime/replay.py``), so
a reader that replays it by position meets the same elements: the same multiset as one pass.

A stage that crashed (a worker died, a ``BaseException`` stopped the work) raises a
``StageCrashedError`` once, after the chunks made before it, and then ends; its state still
points at the work that was lost, so a restore makes exactly that again.

The stage is one object built from one mixin per job, over a shared core
(``runtime/stage/``): ``core.py`` (the fields, the chunks, and the locking rules every side
follows), ``sizing.py`` (chunk sizes and buffer limits learnt from the work), ``workers.py``
(the workers' side: issue and run chunks), ``consumer.py`` (the consumer's side: deliver them),
``positions.py`` (the state), ``start.py`` (the starting parallelism). This module puts them
together: construction, knob changes and shutdown.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from feedline.runtime.chunks import ChunkExecutor, Transform
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.replay import ForcedOrder, read_forced_order
from feedline.runtime.stage.consumer import ConsumerSide
from feedline.runtime.stage.sizing import ChunkSizer
from feedline.runtime.stage.start import FirstCalls
from feedline.runtime.stage_config import StageConfig
from feedline.runtime.states import state_dict, state_int, state_ranges
from feedline.runtime.tunable import PROCESSES, Knob, StageMetrics

if TYPE_CHECKING:
    from feedline.runtime.process.executor import ExecutorSwitch

logger = logging.getLogger("feedline")

DEFAULT_MAX_BUFFER_BYTES = 256 * 2**20
# How long close() waits for a worker stuck in a user function before leaving it behind.
JOIN_TIMEOUT_SECONDS = 5.0


class AsyncStage(ConsumerSide):
    """A parallel ``map``, ``random_map`` or ``prefetch`` running ahead of its consumer."""

    def __init__(
        self,
        config: StageConfig,
        *,
        ctx: IterContext,
        make_input: Callable[[State | None], StageIterator],
        transform: Transform | None,
        state: State | None,
        executor: ChunkExecutor | None = None,
        executor_switch: ExecutorSwitch | None = None,
    ) -> None:
        """``executor_switch``: offered to the tuner as an ``executor`` knob (threads or
        processes)."""
        name = config.name
        self.name = name
        self.key = config.key if config.key is not None else object()
        self.ctx = ctx
        self.transform = transform
        self.executor = executor
        self.deterministic = config.deterministic
        self._lock = threading.Lock()
        self._results_ready = threading.Condition(self._lock)
        self._space_free = threading.Condition(self._lock)
        # Workers above the parallelism wait here, apart: room in the buffer wakes one worker
        # on ``_space_free`` at a time, and that one must be able to use it.
        self._parked = threading.Condition(self._lock)
        self._end_parked = False
        self._parallelism_seen = 0  # as of the last change of knobs
        # Reentrant: a garbage collection inside a worker's pull can close the pipeline this
        # stage belongs to, from that very thread.
        self._input_lock = threading.RLock()

        then: list[list[int]] = []
        if state is None:
            self._input = make_input(None)
            self._next_position = 0
            self._skip = []
        else:
            state = state_dict(state, name, "input", "start", "skip")
            self._next_position = state_int(state, "start", name)
            self._skip = state_ranges(state, "skip", name)
            then = read_forced_order(state, name, self._next_position, self._skip)
            self._input = make_input(state["input"])
        self.inputs = (self._input,)

        self.knobs = {
            "parallelism": Knob(
                "parallelism",
                config.parallelism,
                0,
                config.max_parallelism,
                config.parallelism_tunable,
                self._knobs_changed,
            ),
            "buffer_size": Knob(
                "buffer_size",
                config.buffer_size or 1,
                1,
                1 << 20,
                config.buffer_tunable,
                self._knobs_changed,
            ),
        }
        self._switch = executor_switch
        if executor_switch is not None:
            self.knobs["executor"] = executor_switch.attach(self, self._lock, self._knobs_changed)
        # What the tuner chose for this op in an earlier stage of the same run (an earlier epoch
        # under repeat) is where this one starts.
        remembered = ctx.remembered(self.key)
        for knob_name, value in remembered.items():
            self.knobs[knob_name]._value = value
        self._parallelism_seen = self.parallelism
        start = config.start_parallelism
        self._start_parallelism = None if "parallelism" in remembered else start
        choose = config.choose_read_ahead and "parallelism" not in remembered
        self._first_calls = FirstCalls() if choose else None
        self._sizer = ChunkSizer(auto_buffer=config.buffer_size is None)
        self.max_buffer_bytes = DEFAULT_MAX_BUFFER_BYTES
        self.metrics = StageMetrics()
        if self._switch is not None and remembered.get("executor") == PROCESSES:
            executor = self._switch.new_executor()
        self.executor = executor
        if executor is not None:
            executor.resize(self.parallelism)

        self._open = {}
        self._finished_order = []
        self._retired_ranges = []
        self._issued = 0
        self._plain_from_seq = 0
        self._deliver_seq = 0
        self._end_seq = None
        self._reserved = 0
        self._ready_bytes = 0
        self.solo_cpu_share = None
        self._first_cost = None
        self._current = None
        self._workers = []
        self._closing = False
        self._closed = False
        self._crash = None
        self._crash_raised = False
        self._journals = []
        self._replay = None
        if then:
            self._replay = ForcedOrder(then, self._input.get_state(), self._next_position, name)
        ctx.register(self)

    @property
    def has_own_work(self) -> bool:
        return self.transform is not None

    def start(self) -> None:
        """Start the workers now rather than at the first ``next()``: a stage opened ahead
        of its turn reads meanwhile."""
        if self.parallelism > 0:
            self._ensure_workers()

    def expect_processes(self) -> None:
        if self._switch is not None:
            self._switch.expect()

    def _knobs_changed(self) -> None:
        self.ctx.remember(self.key, {name: knob.value for name, knob in self.knobs.items()})
        if self.executor is not None:
            self.executor.resize(self.parallelism)
        if self._switch is not None:
            self._switch.resize(self.parallelism)
        with self._lock:
            if self.parallelism < self._parallelism_seen:
                self._end_parked = False  # the workers let go now wait to be taken back
            self._parallelism_seen = self.parallelism
            self._wake_all()
        self._ensure_workers()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._closing = True
            self._wake_all()
        # Before joining: a dispatcher still waiting on a worker finishes (or is stopped with
        # the pool) on its own.
        if self._switch is not None:
            self._switch.close()
        if self.executor is not None:
            self.executor.close()
        current = threading.current_thread()
        deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
        threads = self._workers + (self._switch.threads if self._switch is not None else [])
        for thread in threads:
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    logger.warning(
                        "%s: worker %s is still inside a user function; leaving it behind",
                        self.name,
                        thread.name,
                    )
        with self._input_lock:
            self._input.close()
        self._open.clear()
        self._current = None  # its results must not outlive the stage
        self._replay = None
        self.ctx.unregister(self)


def default_parallelism() -> int:
    """Usable cores for this process (its CPU affinity), never fewer than one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)
