"""The consumer's side of an ``AsyncStage``: delivering finished chunks, in sequence order
or in the order they finish, element by element, as lists or as stacked blocks.

With parallelism 0 the consumer makes the next chunk itself (``_run_inline``), and the first
such calls measure the work to choose the parallelism the stage starts with
(``stage/start.py``). Locking rules: ``stage/core.py``.
"""

from __future__ import annotations

import time
from typing import Any

from feedline.runtime.chunks import RowList
from feedline.runtime.stage.core import Chunk
from feedline.runtime.stage.positions import StateSide
from feedline.runtime.stage.start import (
    CLEARLY_COSTLY_SECONDS,
    choose_read_ahead,
    choose_start,
    waits,
)
from feedline.runtime.stage.workers import WorkerSide
from feedline.runtime.tunable import StartChoice


class ConsumerSide(WorkerSide, StateSide):
    """``__next__``, ``next_chunk``, ``next_block`` and ``has_ready``: what the consumer's
    thread calls. The fast paths read the current chunk with no lock (see ``core.py``)."""

    def _next_ready(self) -> Chunk | None:
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
                        raise self._crash  # the pass raises a copy: see pipeline._pulls
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

    def _pick_ready(self, peek: bool = False) -> Chunk | None:
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
        if self._start_parallelism is not None and self._sizer.seconds_per_element > 0:
            self._choose_start()

    def _choose_start(self) -> None:
        """Set the parallelism to start with from the calls made inline so far."""
        share = 1.0 if self.solo_cpu_share is None else self.solo_cpu_share
        cost = self._sizer.last_seconds_per_element
        if self._first_cost is None:
            # The choice waits for a second chunk, what the first does once only set apart:
            # a first call that waited on a lazy set-up would put a crowd of threads on work
            # that then computes (many are started only for work that waits twice in a
            # row), and one that paid the function's first-call costs would put a worker
            # per core on work cheaper than a hand-off (x + 1: 29-70 us for the first
            # element, 2-5 us for each of the next two; on 2 threads it ran at half its
            # inline rate until the tuner took it back).
            self._first_cost = cost
            if waits(share) or cost < CLEARLY_COSTLY_SECONDS:
                return
        cost = min(cost, self._first_cost)
        cores, self._start_parallelism = self._start_parallelism, None
        assert cores is not None
        knob = self.knobs["parallelism"]
        start, reason = choose_start(
            cores,
            cost,
            share,
            lambda: min(knob.maximum, self.ctx.threads.start_share(self)),
            self.projected_bytes,
            self.max_buffer_bytes,
        )
        applied = knob.set(start)
        if applied < start:
            reason += f"; the pass's thread budget ({self.ctx.threads.limit}) left {applied}"
        self.start_choice = StartChoice(time.perf_counter(), "parallelism", 0, applied, reason)

    def _retire(self, chunk: Chunk) -> None:
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

    def _delivering(self) -> Chunk | None:
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
                outputs[start] = None  # delivered: its frames go now, not with the chunk
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
        self._sizer.block_size = n
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
            first_calls = self._first_calls
            chosen = first_calls is not None and first_calls.add(started, time.perf_counter())
        if chosen:
            self._choose_read_ahead()
        return taken

    def _choose_read_ahead(self) -> None:
        """Start reading ahead on a thread if the consumer's first calls say it pays (once
        the input lock is let go: a worker started now takes it)."""
        first_calls, self._first_calls = self._first_calls, None
        assert first_calls is not None
        chosen = choose_read_ahead(first_calls.gaps, first_calls.pulls)
        if chosen is None:
            return  # the tuner's rule decides later, on its windows
        value, reason = chosen
        applied = self.knobs["parallelism"].set(value)
        if applied < value:
            return  # no thread left in the pass's budget: the tuner notes it
        self.start_choice = StartChoice(time.perf_counter(), "parallelism", 0, applied, reason)

    def _retire_if_done(self, chunk: Chunk) -> None:
        if chunk.delivered >= len(chunk.outputs):
            self._current = None
            self._retire(chunk)
