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
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from feedline.errors import StageCrashedError, StageError
from feedline.runtime.chunks import ChunkExecutor, Failed, RowList, Transform, element_nbytes
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.replay import ForcedOrder, Journal, read_forced_order
from feedline.runtime.stage_config import StageConfig
from feedline.runtime.states import state_dict, state_int, state_ranges
from feedline.runtime.tunable import (
    CHEAP_WORK_SECONDS,
    PROCESSES,
    PURE_WAITING_SHARE,
    Knob,
    StageMetrics,
    StartChoice,
    Tunable,
)

if TYPE_CHECKING:
    from feedline.runtime.process.executor import ExecutorSwitch

logger = logging.getLogger("feedline")

# A chunk is sized to take about this long to transform: long enough that a hand-off between
# threads is a small part of it, short enough to balance workers. A hand-off costs 50-60 us of
# CPU (wake-ups, the GIL changing hands; measured with two workers on 2 cores): at 2 ms chunks,
# Pillow decoding ran 12% below a plain thread pool; at 10 ms, level with it.
TARGET_CHUNK_SECONDS = 0.010
MAX_CHUNK = 4096
DEFAULT_MAX_BUFFER_BYTES = 256 * 2**20
# How long close() waits for a worker stuck in a user function before leaving it behind.
JOIN_TIMEOUT_SECONDS = 5.0


class CrashTraceback(Exception):
    """Where a stage's crash happened (the ``__cause__`` of its ``StageCrashedError``)."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


class _Chunk:
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


class AsyncStage(StageIterator, Tunable):
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
        # Where the transform runs when not on this stage's threads (which then dispatch to it).
        self.executor = executor
        self.deterministic = config.deterministic
        self._lock = threading.Lock()
        self._results_ready = threading.Condition(self._lock)
        self._space_free = threading.Condition(self._lock)
        # Workers above the parallelism wait here, apart: room in the buffer wakes one worker
        # on ``_space_free`` at a time, and that one must be able to use it.
        self._parked = threading.Condition(self._lock)
        # Reentrant: a garbage collection inside a worker's pull can close the pipeline this
        # stage belongs to, from that very thread.
        self._input_lock = threading.RLock()

        then: list[list[int]] = []
        if state is None:
            self._input = make_input(None)
            self._next_position = 0
            self._skip: list[list[int]] = []
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
        start = config.start_parallelism
        self._start_parallelism = None if "parallelism" in remembered else start
        self._auto_buffer = config.buffer_size is None
        self.max_buffer_bytes = DEFAULT_MAX_BUFFER_BYTES
        self.metrics = StageMetrics()
        if self._switch is not None and remembered.get("executor") == PROCESSES:
            executor = self._switch.new_executor()
        self.executor = executor
        if executor is not None:
            executor.resize(self.parallelism)

        self._open: dict[int, _Chunk] = {}  # issued, not fully delivered, by sequence number
        self._finished_order: list[int] = []  # ready chunks in finishing order (non-det mode)
        # Input ranges fully delivered while an older chunk is still open (non-det mode).
        self._retired_ranges: list[list[int]] = []
        self._issued = 0
        self._deliver_seq = 0
        self._end_seq: int | None = None
        self._reserved = 0  # elements taken (or about to be taken) from input, not delivered
        self._ready_bytes = 0
        self._seconds_per_element = 0.0
        self.solo_cpu_share: float | None = None
        self._waiting_confirmed = False
        self._bytes_per_element = 0.0
        self._chunk_size = 1
        # Wanted by the consumer (a batch) as stacked blocks of this many: chunks run on worker
        # processes then end at multiples of it, so that their results, stacked there, hold
        # whole batches.
        self._block_size = 0
        self._current: _Chunk | None = None
        self._workers: list[threading.Thread] = []
        self._closing = False
        self._closed = False
        self._crash: StageCrashedError | None = None
        self._crash_raised = False
        # States given out in finishing-order mode, still recording what is delivered.
        self._journals: list[weakref.ref[Journal]] = []
        # Restored from a state with an order to deliver first.
        self._replay: ForcedOrder | None = None
        if then:
            self._replay = ForcedOrder(then, self._input.get_state(), self._next_position, name)
        ctx.register(self)

    # -- sizing ------------------------------------------------------------------------------

    @property
    def parallelism(self) -> int:
        return self.knobs["parallelism"].value

    def buffer_limit(self, parallelism: int | None = None, buffer_size: int | None = None) -> int:
        """Elements that may be taken from the input and not yet delivered (with the knobs
        set as given, or as they are)."""
        if self._auto_buffer:
            workers = self.parallelism if parallelism is None else parallelism
            return max(2, 2 * max(1, workers) * self._whole_blocks(self._chunk_size))
        return self.knobs["buffer_size"].value if buffer_size is None else buffer_size

    def projected_bytes(
        self, parallelism: int | None = None, buffer_size: int | None = None
    ) -> float:
        elements = self.buffer_limit(parallelism, buffer_size)
        return min(elements * self._bytes_per_element, 1.5 * self.max_buffer_bytes)

    def _whole_blocks(self, size: int) -> int:
        """``size`` rounded up to whole blocks, when chunks on worker processes are cut at
        block boundaries (see ``_block_size``): what such a chunk then holds."""
        block = self._block_size
        if not block or self.executor is None:
            return size
        return -(-size // block) * block

    def _next_chunk_size(self) -> int:
        size = self._whole_blocks(self._chunk_size)
        if not self._auto_buffer:
            # Two chunks per worker fit in the user's buffer, so a worker refills while the
            # consumer drains (with one, they would take turns).
            room = self.knobs["buffer_size"].value // (2 * max(1, self.parallelism))
            size = min(size, max(1, room))
        if self._bytes_per_element:
            # A chunk in flight is outside the byte check at admission: keep all workers'
            # chunks together within half the limit, so a stage holds at most 1.5x of it.
            workers = 2 * max(1, self.parallelism)
            size = min(
                size, max(1, int(self.max_buffer_bytes / (workers * self._bytes_per_element)))
            )
        return size

    def _learn_cost(self, elements: int, seconds: float) -> None:
        if elements <= 0:
            return
        per = seconds / elements
        self._seconds_per_element = (
            per if self._seconds_per_element == 0 else 0.8 * self._seconds_per_element + 0.2 * per
        )
        target = TARGET_CHUNK_SECONDS if self.executor is None else self.executor.chunk_seconds
        ideal = target / max(self._seconds_per_element, 1e-9)
        # Grow at most x2 per chunk, so one cheap outlier cannot make a huge chunk.
        self._chunk_size = int(max(1, min(MAX_CHUNK, ideal, self._chunk_size * 2)))

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def has_own_work(self) -> bool:
        return self.transform is not None

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
            self._wake_all()
        self._ensure_workers()

    def _wake_all(self) -> None:
        self._space_free.notify_all()
        self._parked.notify_all()
        self._results_ready.notify_all()

    # -- workers -----------------------------------------------------------------------------

    def _ensure_workers(self) -> None:
        with self._lock:
            if self._closing or self._end_seq is not None:
                return
            self._workers = [t for t in self._workers if t.is_alive()]
            alive = {int(t.name.rsplit("-", 1)[1]) for t in self._workers}
            for index in range(self.parallelism):
                if index not in alive:
                    thread = threading.Thread(
                        target=self._work,
                        args=(index,),
                        name=f"feedline-{self.name}-{index}",
                        daemon=True,
                    )
                    self._workers.append(thread)
                    thread.start()
                    self.ctx.threads.track(self, thread)

    def _has_room(self, size: int) -> bool:
        if self._reserved == 0:
            return True  # always let one chunk through, whatever the limits
        return (
            self._reserved + size <= self.buffer_limit()
            and self._ready_bytes <= self.max_buffer_bytes
        )

    def _work(self, index: int) -> None:
        try:
            while True:
                with self._lock:
                    size = self._next_chunk_size()
                    idle = False
                    while not self._closing and self._end_seq is None:
                        if index >= self.parallelism:
                            # Not one of the stage's workers (any more): not idle, parked.
                            if idle:
                                idle = False
                                self.metrics.end_idle(index)
                            self._parked.wait()
                        elif self._has_room(size):
                            break
                        else:
                            if not idle:
                                idle = True
                                self.metrics.start_idle(index)
                            self._space_free.wait()
                        size = self._next_chunk_size()
                    if idle:
                        self.metrics.end_idle(index)
                    if self._closing or self._end_seq is not None:
                        return
                    self._reserved += size
                    # Room is handed on one worker at a time: waking every waiting worker for
                    # each retired chunk cost 256 threads more GIL hand-offs than the work
                    # itself (io_latency fell from 12k to 4k elements/s).
                    if self._has_room(self._next_chunk_size()):
                        self._space_free.notify()
                chunk = self._issue(size)
                if chunk is None:
                    return
                self._run(chunk)
        except BaseException as e:  # a worker must never die silently
            if not isinstance(e, StageError):  # a StageError says what happened itself
                logger.exception("feedline worker %s crashed", self.name)
            self._record_crash(e)

    def _record_crash(self, error: BaseException) -> None:
        """End the stage: the consumer raises a ``StageCrashedError`` once, after the chunks
        made before it. The chunks the crash stopped stay open, so the state still says to
        make them again."""
        if isinstance(error, StageCrashedError):
            crash = StageCrashedError(error.stage, error.position, error.message)
        else:
            crash = StageCrashedError(
                self.name, None, f"a worker crashed: {type(error).__name__}: {error}"
            )
        # The stage keeps the traceback as text: raised in the consumer's thread (inline), it
        # holds the consumer's frames, and the threads that keep this stage alive would keep
        # a dropped iterator from ever being collected.
        crash.__cause__ = CrashTraceback("".join(traceback.format_exception(error)))
        with self._lock:
            self._end_seq = self._end_seq if self._end_seq is not None else self._issued
            if self._crash is None:
                self._crash = crash
            self._wake_all()

    def _issue(self, size: int) -> _Chunk | None:
        """Pull the next chunk from the input; None (and the end recorded) when it is done.

        ``size`` elements were reserved by the caller; the reservation is corrected to what
        was actually pulled.
        """
        with self._input_lock:
            while True:
                if self._end_seq is not None or self._closing:
                    with self._lock:
                        self._reserved -= size
                    return None
                if self._replay is not None and self._replay.replaying:
                    return self._issue_replayed(size)
                start_state = self._input.get_state()
                start = self._next_position
                started = time.perf_counter()
                cpu_started = time.thread_time()
                failed = False
                wanted = size
                block = self._block_size
                if block and self.executor is not None:  # end at a block boundary
                    end = start + size
                    wanted = max(end - end % block, start - start % block + block) - start
                try:
                    raw: list[Any] = self._input.next_chunk(wanted)
                except StageCrashedError as e:
                    # Not an element: the input can make no more. This stage ends after what
                    # it made, and the input's state still holds the lost work.
                    with self._lock:
                        self._reserved -= size
                    self._record_crash(e)
                    return None
                except Exception as e:
                    raw, failed = [Failed(e)], True
                pull_seconds = time.perf_counter() - started
                if self.transform is None:
                    cpu = time.thread_time() - cpu_started
                    self.metrics.add_work(len(raw), pull_seconds, cpu)
                    self._learn_cost(len(raw), pull_seconds)
                self._next_position += len(raw)
                positions: Sequence[int] = range(start, self._next_position)
                if self._skip and raw:
                    raw, positions = self._drop_skipped(raw, positions)
                    if not raw:
                        continue  # all already delivered before the restore: pull again
                with self._lock:
                    seq = self._issued
                    self._issued += 1
                    self._reserved += len(raw) - size
                    if not raw:
                        self._end_seq = seq
                        self._wake_all()
                        return None
                    chunk = _Chunk(seq, start_state, start, self._next_position, positions)
                    chunk.outputs = raw
                    chunk.failures = [0] if failed else []
                    chunk.pull_seconds = pull_seconds
                    self._open[seq] = chunk
                return chunk

    def _drop_skipped(
        self, raw: list[Any], positions: Sequence[int]
    ) -> tuple[list[Any], list[int]]:
        """Drop elements a restored state says were already delivered. (``get_state`` counts
        every position pulled and not open as done, so ranges passed need not be kept.)"""
        kept, kept_positions = [], []
        for element, position in zip(raw, positions):
            if not any(a <= position < b for a, b in self._skip):
                kept.append(element)
                kept_positions.append(position)
        last = positions[-1]
        self._skip = [r for r in self._skip if r[1] > last + 1]
        return kept, kept_positions

    def _issue_replayed(self, size: int) -> _Chunk:
        """The next chunk of a restored forced order (under the input lock)."""
        replay = self._replay
        assert replay is not None
        raw, positions, forced = replay.next_chunk(size, self._pull_for_replay)
        with self._lock:
            seq = self._issued
            self._issued += 1
            self._reserved += len(raw) - size
            # Its state is the restored input's: every position from there on is accounted.
            chunk = _Chunk(seq, replay.start_state, replay.start, self._next_position, positions)
            chunk.outputs = raw
            self._open[seq] = chunk
            if forced:
                replay.seqs.append(seq)
        return chunk

    def _pull_for_replay(self, n: int) -> tuple[list[Any], Sequence[int], bool]:
        start = self._next_position
        raw: list[Any] = self._input.next_chunk(n)
        self._next_position += len(raw)
        positions: Sequence[int] = range(start, self._next_position)
        if self._skip and raw:
            kept, positions = self._drop_skipped(raw, positions)
            return kept, positions, True
        return raw, positions, bool(raw)

    def _run(self, chunk: _Chunk) -> None:
        """Transform a chunk (if this stage has a transform) and hand it to the consumer."""
        if self.transform is not None and chunk.outputs:
            started = time.perf_counter()
            cpu_started = time.thread_time()
            executor = self.executor
            elsewhere = 0.0  # CPU seconds spent outside this thread (in a worker process)
            if executor is None:
                chunk.outputs, chunk.failures = self.transform(chunk.outputs, chunk.positions)
            else:
                chunk.outputs, chunk.failures, elsewhere = executor.run(
                    chunk.outputs, chunk.positions
                )
            wall = time.perf_counter() - started
            cpu = time.thread_time() - cpu_started + elsewhere
            self.metrics.add_work(len(chunk.outputs), wall, cpu, chunk.pull_seconds)
            # A chunk is as long as its pull and its work: a slow input (a generator that
            # reads) with cheap work would otherwise grow chunks of many seconds, pulled one
            # at a time, each holding back every element after it.
            self._learn_cost(len(chunk.outputs), wall + chunk.pull_seconds)
            if executor is None and self.parallelism <= 1 and wall > 0:
                share = min(1.0, cpu / wall)
                solo = self.solo_cpu_share
                if solo is None or self._start_parallelism is not None:
                    # Before the workers start, the latest call alone: a first call's one-off
                    # wait (a lazy set-up) must not stand for the calls after it.
                    self.solo_cpu_share = share
                else:
                    self.solo_cpu_share = 0.8 * solo + 0.2 * share
        outputs = chunk.outputs
        per_element = element_nbytes(outputs[0]) if outputs else 0
        nbytes = per_element * len(outputs)
        self._bytes_per_element = max(self._bytes_per_element * 0.9, float(per_element))
        with self._lock:
            chunk.nbytes = nbytes
            chunk.ready = True
            self._ready_bytes += nbytes
            if not self.deterministic:
                self._finished_order.append(chunk.seq)
            with self.metrics.lock:
                self.metrics.chunks += 1
                self.metrics.buffered_bytes = self._ready_bytes
                self.metrics.buffered_elements = self._reserved
                self.metrics.bytes_per_element = self._bytes_per_element
            self._results_ready.notify_all()

    # -- consumer ----------------------------------------------------------------------------

    def _next_ready(self) -> _Chunk | None:
        """Block until the next chunk to deliver is ready; None at the end.

        Chunks are always delivered through the same ordered pick, whoever made them: with
        parallelism 0 the consumer makes the next chunk itself, but only once no worker chunk
        is still in flight (a worker may still be finishing one after a switch to inline).
        """
        if not self._workers and self.parallelism > 0:
            self._ensure_workers()  # later changes of parallelism start workers themselves
        waited_since = self.metrics.start_wait()
        try:
            while True:
                with self._lock:
                    chunk = self._pick_ready()
                    if chunk is not None or self._closing:
                        return chunk
                    if self._crash is not None:
                        if self._crash_raised:
                            return None  # the pass ended with the crash
                        self._crash_raised = True
                        # A copy: raised, it holds the consumer's frames, and the stage
                        # (which its threads keep alive) must not, or a dropped iterator
                        # could never be collected.
                        raised = copy.copy(self._crash)
                        raised.__cause__ = self._crash.__cause__
                        raise raised
                    if self._end_seq is not None and not self._open:
                        if self.executor is not None:
                            # Nothing more to run: let go of the worker processes now.
                            self.executor.close()
                        return None
                    inline = self.parallelism == 0 and all(c.ready for c in self._open.values())
                    if not inline:
                        self._results_ready.wait()
                        continue
                self._run_inline()
        finally:
            self.metrics.end_wait(waited_since)

    def has_ready(self) -> bool:
        """True when the next ``next()`` would not block (an element, an error or the end)."""
        chunk = self._current
        if chunk is not None and chunk.delivered < len(chunk.outputs):
            return True
        with self._lock:
            return (
                self._pick_ready(peek=True) is not None
                or self._crash is not None
                or (self._end_seq is not None and not self._open)
            )

    def _pick_ready(self, peek: bool = False) -> _Chunk | None:
        replay = self._replay
        if replay is not None and replay.gates:
            if not replay.seqs:
                return None  # the next forced chunk is not issued yet
            forced = self._open[replay.seqs[0]]
            return forced if forced.ready else None
        if self.deterministic:
            chunk = self._open.get(self._deliver_seq)
            if chunk is None or not chunk.ready:
                return None
            return chunk
        while self._finished_order:
            seq = self._finished_order[0]
            if seq in self._open:
                if not peek:
                    self._finished_order.pop(0)
                return self._open[seq]
            self._finished_order.pop(0)
        return None

    def _run_inline(self) -> None:
        """Make the next chunk in the consumer's thread (it is then picked like any other)."""
        with self._lock:
            size = self._next_chunk_size()
            self._reserved += size
        try:
            chunk = self._issue(size)
            if chunk is not None:
                self._run(chunk)
        except Exception as e:  # work sent elsewhere can fail whole (a worker died)
            self._record_crash(e)
        except BaseException as e:
            # SystemExit or KeyboardInterrupt from the function, in the consumer's thread:
            # it goes on up, and the chunk it stopped can never finish: a later next() must
            # not wait for it.
            self._record_crash(e)
            raise
        if self._start_parallelism is not None and self._seconds_per_element > 0:
            share = 1.0 if self.solo_cpu_share is None else self.solo_cpu_share
            waits = share < PURE_WAITING_SHARE
            if waits and not self._waiting_confirmed:
                # Many workers are started only for work that waits twice in a row: a first
                # call that waited on a lazy set-up would put a crowd of threads on work that
                # then computes.
                self._waiting_confirmed = True
                return
            start, self._start_parallelism = self._start_parallelism, None
            cost = self._seconds_per_element
            if cost < CHEAP_WORK_SECONDS:
                start = 0
                reason = f"{cost * 1e6:.0f} us per element: cheaper inline than a hand-off"
            elif waits:
                # Waiting is not bound by the cores: as many calls in flight as would keep
                # them busy were every call like this one. The tuner sees the calls after it,
                # and takes threads that turn out to compute down or to processes.
                # The pass's other stages need threads too: those still to choose, and those
                # made later.
                most = min(self.knobs["parallelism"].maximum, self.ctx.threads.start_share(self))
                cores = start
                start = most if most * share <= cores else int(cores / share)
                while start > 1 and self.projected_bytes(start) > self.max_buffer_bytes:
                    start //= 2
                reason = (
                    f"its first calls wait (cpu {share:.1%} of wall): workers to keep "
                    f"{cores} cores busy, within the maximum, the buffer's bytes and a share "
                    "of the pass's threads"
                )
            else:
                reason = f"its first call computes (cpu {share:.0%} of wall): a worker per core"
            applied = self.knobs["parallelism"].set(start)
            if applied < start:
                reason += f"; the pass's thread budget ({self.ctx.threads.limit}) left {applied}"
            self.start_choice = StartChoice(time.perf_counter(), "parallelism", 0, applied, reason)

    def _retire(self, chunk: _Chunk) -> None:
        with self._lock:
            del self._open[chunk.seq]
            replay = self._replay
            if replay is not None:
                if replay.seqs and replay.seqs[0] == chunk.seq:
                    replay.seqs.popleft()
                if not replay.replaying and not replay.seqs:
                    self._replay = None
            self._reserved -= len(chunk.outputs)
            with self.metrics.lock:
                self.metrics.elements += len(chunk.outputs)
            self._ready_bytes -= chunk.nbytes
            if self.deterministic:
                self._deliver_seq = chunk.seq + 1
            elif self._open:
                oldest = self._open[min(self._open)].start
                self._retired_ranges = [r for r in self._retired_ranges if r[1] > oldest]
                self._retired_ranges.append([chunk.start, chunk.end])
            else:
                self._retired_ranges = []
            with self.metrics.lock:
                self.metrics.buffered_bytes = self._ready_bytes
                self.metrics.buffered_elements = self._reserved
            self._space_free.notify()

    def __next__(self) -> Any:
        # Fast path for element-by-element consumers: no lock, no list.
        chunk = self._current
        if chunk is not None:
            i = chunk.delivered
            outputs = chunk.outputs
            if i + 1 < len(outputs) and not (chunk.failures and chunk.failures[0] == i):
                chunk.delivered = i + 1
                if self._journals:
                    self._journal(chunk.positions[i : i + 1])
                return outputs[i]
        taken = self.next_chunk(1)
        if not taken:
            raise StopIteration
        return taken[0]

    def _delivering(self) -> _Chunk | None:
        """The chunk the next element comes from, waited for if need be; None at the end."""
        chunk = self._current
        if chunk is None or chunk.delivered >= len(chunk.outputs):
            chunk = self._current = self._next_ready()
        return chunk

    def next_chunk(self, max_n: int) -> list[Any]:
        if self._closed:
            return []
        current = self._current
        if (
            (current is None or current.delivered >= len(current.outputs))
            and self.transform is None
            and self.parallelism == 0
        ):
            passed = self._pass_through(max_n)
            if passed is not None:
                return passed
        chunk = self._delivering()
        if chunk is None:
            return []
        start = chunk.delivered
        outputs = chunk.outputs
        stop = min(len(outputs), start + max_n)
        if chunk.failures:
            failure = chunk.failures[0]
            if failure == start:
                chunk.failures.pop(0)
                chunk.delivered += 1
                if self._journals:
                    self._journal(chunk.positions[start : start + 1])
                error = outputs[start].error
                # Once raised, the error's traceback reaches the consumer's frames: if this
                # stage (which its worker threads keep alive) held on to it, a dropped iterator
                # could never be collected and its workers would wait forever.
                outputs[start] = None
                with self.metrics.lock:
                    self.metrics.errors += 1
                self._retire_if_done(chunk)
                raise error
            stop = min(stop, failure)
        taken = outputs if start == 0 and stop == len(outputs) else outputs[start:stop]
        chunk.delivered = stop
        if self._journals:
            self._journal(chunk.positions[start:stop])
        self._retire_if_done(chunk)
        return taken

    def next_block(self, n: int) -> Any | None:
        self._block_size = n
        if self._closed or self.transform is None:  # only a map's workers stack results
            return None
        chunk = self._delivering()
        if chunk is None:
            return None
        outputs = chunk.outputs
        start = chunk.delivered
        if (
            type(outputs) is not RowList
            or start + n > len(outputs)
            or (chunk.failures and chunk.failures[0] < start + n)
        ):
            return None
        chunk.delivered = start + n
        if self._journals:
            self._journal(chunk.positions[start : start + n])
        self._retire_if_done(chunk)
        # Rows nothing else was given: the batch can be them in place.
        return outputs.stacked[start : start + n]

    def _pass_through(self, max_n: int) -> list[Any] | None:
        """An inline read-ahead stage with nothing in flight is a pass-through: the consumer
        pulls its input directly, with no chunk to book, only the metrics. None when there is
        something in flight (or to skip after a restore): then the usual path delivers it."""
        with self._input_lock:
            if self._open or self._skip or self._end_seq is not None or self._closing:
                return None
            started = self.metrics.start_wait()
            cpu_started = time.thread_time()
            try:
                taken: list[Any] = self._input.next_chunk(max_n)
            except Exception:
                self.metrics.end_wait(started)
                with self.metrics.lock:
                    self.metrics.errors += 1
                raise  # nothing is in flight: the error is the next thing to deliver
            if self._journals:
                self._journal(range(self._next_position, self._next_position + len(taken)))
            self._next_position += len(taken)
            # The consumer's wait was this stage's work: one update for both.
            self.metrics.end_wait(started, len(taken), time.thread_time() - cpu_started)
            if not taken:
                with self._lock:
                    self._end_seq = self._issued
            return taken

    def _retire_if_done(self, chunk: _Chunk) -> None:
        if chunk.delivered >= len(chunk.outputs):
            self._current = None
            self._retire(chunk)

    # -- state -------------------------------------------------------------------------------

    def _journal(self, positions: Sequence[int]) -> None:
        """Record delivered positions in every state given out that is still held."""
        with self._lock:
            alive = []
            for ref in self._journals:
                journal = ref()
                if journal is not None:
                    journal.record(positions)
                    alive.append(ref)
            self._journals = alive

    def get_state(self) -> State:
        with self._input_lock, self._lock:
            state = self._state()
            if self.deterministic:
                return state
            journal = Journal(state)
            owed = [] if self._replay is None else self._replay.still_forced(self._undelivered)
            journal["then"] = owed
            journal.pending = sum(b - a for a, b in owed)
            self._journals.append(weakref.ref(journal))
            return journal

    def _undelivered(self, seq: int) -> Sequence[int]:
        chunk = self._open[seq]
        return chunk.positions[chunk.delivered :]

    def _state(self) -> State:
        """Where the input resumes, and every position from there on already delivered:
        all those pulled and not still to deliver in an open chunk (or held for a forced
        order), and the restored state's skips not yet reached."""
        later_skips = [[max(a, self._next_position), b] for a, b in self._skip]
        later_skips = [r for r in later_skips if r[0] < r[1]]
        replay = self._replay
        held = [] if replay is None else [[p, p + 1] for p in replay.held]
        if replay is not None and replay.replaying:
            start_state, start = replay.start_state, replay.start
        elif self._open:
            oldest = min(self._open.values(), key=lambda c: c.start)
            start_state, start = oldest.start_state, oldest.start
        else:
            return {
                "input": self._input.get_state(),
                "start": self._next_position,
                "skip": later_skips,
            }
        to_deliver: list[list[int]] = held
        for chunk in self._open.values():
            rest = chunk.positions[chunk.delivered :]
            if isinstance(rest, range):
                if len(rest):
                    to_deliver.append([rest.start, rest.stop])
            else:
                to_deliver += [[p, p + 1] for p in rest]
        done: list[list[int]] = []
        at = start
        for a, b in _merge_ranges(to_deliver):
            if a > at:
                done.append([at, a])
            at = max(at, b)
        if at < self._next_position:
            done.append([at, self._next_position])
        return {"input": start_state, "start": start, "skip": _merge_ranges(done + later_skips)}

    # -- shutdown ----------------------------------------------------------------------------

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


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def default_parallelism() -> int:
    """Usable cores for this process (its CPU affinity), never fewer than one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)
