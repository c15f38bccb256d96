"""The workers' side of an ``AsyncStage``: threads that pull chunks from the input (taking
turns, under the input lock), transform them outside any lock, and file them as ready.

The consumer's thread runs ``_issue`` and ``_run`` too when the stage is inline (parallelism
0). Locking rules: ``stage/core.py``.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from feedline.errors import StageCrashedError, StageError
from feedline.runtime.chunks import Failed, element_nbytes
from feedline.runtime.stage.core import Chunk, StageCore

logger = logging.getLogger("feedline")

# A worker let go (the parallelism lowered) waits this long to be taken back, as a change
# that did not pay is, within an experiment's windows; then it ends.
PARKED_SECONDS = 2.0


class CrashTraceback(Exception):
    """Where a stage's crash happened (the ``__cause__`` of its ``StageCrashedError``)."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


class WorkerSide(StageCore):
    """Starting workers, and what each does: reserve room, ``_issue`` a chunk, ``_run`` it."""

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

    def release_parked(self) -> None:
        """End the workers parked now (let go by a lower parallelism) without waiting for
        PARKED_SECONDS: another stage needs their share of the pass's thread budget."""
        with self._lock:
            self._end_parked = True  # until the parallelism is lowered again
            self._parked.notify_all()
            self._space_free.notify_all()  # those not yet parked

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
                            # Not one of the stage's workers (any more): not idle, parked,
                            # at hand should the tuner take the change back. Still not needed
                            # a while later, it ends: a parked thread holds a share of the
                            # pass's thread budget that another stage may need (246 parked
                            # left the next map 2 threads of the 16 it wanted).
                            if idle:
                                idle = False
                                self.metrics.end_idle(index)
                            woken = not self._end_parked and self._parked.wait(PARKED_SECONDS)
                            if index >= self.parallelism and (not woken or self._end_parked):
                                # Out of the list now: a raise from here on starts a new
                                # worker at this index rather than count on this one.
                                me = threading.current_thread()
                                self._workers = [t for t in self._workers if t is not me]
                                return
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
                    # each retired chunk costs hundreds of threads more GIL hand-offs than
                    # the work itself.
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

    def _issue(self, size: int) -> Chunk | None:
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
                block = self._sizer.block_size
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
                    chunk = Chunk(seq, start_state, start, self._next_position, positions)
                    if not isinstance(positions, range):
                        self._plain_from_seq = seq + 1
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

    def _issue_replayed(self, size: int) -> Chunk:
        """The next chunk of a restored forced order (under the input lock)."""
        replay = self._replay
        assert replay is not None
        raw, positions, forced = replay.next_chunk(size, self._pull_for_replay)
        with self._lock:
            seq = self._issued
            self._issued += 1
            self._reserved += len(raw) - size
            # Its state is the restored input's: every position from there on is accounted.
            chunk = Chunk(seq, replay.start_state, replay.start, self._next_position, positions)
            self._plain_from_seq = seq + 1
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

    def _run(self, chunk: Chunk) -> None:
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
        sizer = self._sizer
        sizer.learn_bytes(per_element)
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
                self.metrics.bytes_per_element = sizer.bytes_per_element
            self._results_ready.notify_all()
