"""The iterator users hold: one pass over a dataset, closable, resumable and observable."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from feedline.autotune.budget import budget_for
from feedline.autotune.tuner import RootCounters, Tuner
from feedline.errors import InvalidStateError, copy_to_raise
from feedline.options import Options
from feedline.runtime import closer
from feedline.runtime.context import IterContext, WorkerMemory
from feedline.runtime.iterator import EmptyIterator, StageIterator, State
from feedline.runtime.states import frozen, state_dict, state_nested
from feedline.runtime.tunable import ThreadBudget, Tunable

STATE_VERSION = 1
# Ops whose elements are batches of their input's, and ops whose elements are not theirs
# (what the consumer receives, for observers; the ops between keep what they are given).
_BATCHING = frozenset(
    {
        "batch",
        "padded_batch",
        "ragged_batch",
        "rebatch",
        "scheduled_batch",
        "bucket_by_sequence_length",
    }
)
_UNBATCHING = frozenset({"unbatch", "flat_map", "interleave", "text_lines"})


class DatasetIterator:
    """A pass over a dataset. Use it in a ``for`` loop, or ``with ds.iterator() as it:``.

    ``get_state()`` returns a small dict (picklable; JSON-able unless an op holds non-JSON
    values); ``dataset.iterator(state)`` or ``set_state(state)`` resume right after the last
    element returned, so outputs before + after equal one uninterrupted pass.
    ``stats()`` and ``report()`` show what each stage does and what AUTOTUNE decided.
    """

    def __init__(self, op: Any, options: Options, state: State | None = None) -> None:
        self._op = op
        self._options = options
        self._root: StageIterator = EmptyIterator()
        self._pulls = _pulls(self._root)
        self._ready: list[Any] = []  # the root's ready_list(), popped by __next__
        self._closed = True  # nothing open yet for _start to close
        self._tuner: Tuner | None = None
        self._start(state)
        if "torch.utils.data" in sys.modules:  # only a torch user's pass runs in a DataLoader
            from feedline.torch import warn_if_unsharded_in_worker

            warn_if_unsharded_in_worker(op)

    def _start(self, state: State | None) -> None:
        """Open the pass at ``state``; a state refused leaves this iterator as it was."""
        root_state = None
        if state is not None:
            root_state = self._check_state(state)
        closer.ensure_started()
        ctx = IterContext(self._options)
        try:
            root = self._op.make_iterator(ctx, root_state)
        except BaseException:
            # What the ops opened before one refused its part of the state.
            for stage in ctx.stages():
                if isinstance(stage, StageIterator):
                    stage.close()
            ctx.close()
            raise
        self.close()
        self._ctx, self._root = ctx, root
        self._pulls = _pulls(root)
        self._ready = []
        self._counters = RootCounters()
        self._started = time.perf_counter()
        self._tuner_checked = False
        self._tuner = None
        self._closed = False

    def _start_tuner(self) -> None:
        """Tune only what the user left to AUTOTUNE, and only when tuning is enabled."""
        self._tuner_checked = True
        options = self._ctx.options
        stages = self._ctx.stages()
        # A stage that tunes itself needs the tuner too: it records that stage's decisions.
        tunable = any(s.tuned_by_itself for s in stages) or any(
            knob.tunable for stage in stages for knob in stage.knobs.values()
        )
        if options.autotune_enabled and tunable:
            self._tuner = Tuner(
                self._ctx.stages,
                self._counters,
                budget_for(options.autotune),
                self._started,
                self._ctx.worker_memory,
            )
            # Recorded from the start, at the tuner's ticks: it.plot() after the loop shows
            # the whole run, with no thread of its own.
            from feedline.observe.timeline import follow

            self._tuner.on_tick = self._final_sample = follow(self)
            self._tuner.start()

    def _pipeline(self) -> list[str]:
        names = []
        stack = [self._op]
        while stack:
            op = stack.pop()
            names.append(op.name)
            stack.extend(reversed(op.inputs))
        return names

    def _check_state(self, state: State) -> State:
        """The root op's state, once the envelope shows ``state`` was saved from a pipeline
        of these ops by this version of feedline (each op then checks its own part)."""
        owner = "the pipeline"
        version = state_dict(state, owner, "version")["version"]
        if isinstance(version, bool) or version != STATE_VERSION:
            raise InvalidStateError(
                owner,
                "version",
                f"is {version!r}: not a state of this version of feedline ({STATE_VERSION})",
            )
        names = state_dict(state, owner, "pipeline")["pipeline"]
        if names != self._pipeline():
            raise InvalidStateError(
                owner,
                "pipeline",
                f"is {names!r}: the state was saved from a different pipeline "
                f"than {self._pipeline()}",
            )
        return state_nested(state, "root", owner)

    @property
    def unit(self) -> str:
        """What the consumer receives: "batches" when the pass ends in a batching op (past
        prefetches and options), else "elements"."""
        for name in self._pipeline():  # from the root down its first inputs
            kind = name.split("(")[0]
            if kind in _BATCHING:
                return "batches"
            if kind in _UNBATCHING:
                return "elements"
        return "elements"

    def __iter__(self) -> DatasetIterator:
        return self

    def __next__(self) -> Any:
        # Elements the root holds made and checked (a reader's block of records) are taken
        # here, with no call down the stages and no wait to time: at a few hundred
        # nanoseconds an element, that call and its timing cost as much as the reading.
        ready = self._ready
        if ready:
            try:
                element = ready.pop()
            except IndexError:  # another thread took the last one
                pass
            else:
                self._counters.delivered += 1
                return element
        # Outside any except clause: an error raised under one would chain to it, and
        # through its traceback keep this iterator alive (see _pulls).
        return self._pull()

    def _pull(self) -> Any:
        if self._closed:
            raise StopIteration
        if not self._tuner_checked:
            self._start_tuner()
        counters = self._counters
        started = counters.waiting_since = time.perf_counter()
        try:
            try:
                element = next(self._pulls)
            except ValueError:  # "generator already executing": another thread pulls too
                element = next(_pulls(self._root))
            if type(element) is _Raised:
                raise copy_to_raise(element.error)
        except KeyboardInterrupt:
            # Ctrl-C while waiting for data: stop every worker now rather than whenever the
            # traceback (which keeps this iterator alive) is dropped.
            self.close()
            raise
        finally:
            counters.wait += time.perf_counter() - started
            counters.waiting_since = None
        counters.delivered += 1
        self._ready = self._root.ready_list() or self._ready
        return element

    # -- the public view observers read (observe/view.py) ------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def started(self) -> float:
        return self._started

    @property
    def consumer(self) -> RootCounters:
        return self._counters

    @property
    def tuner(self) -> Tuner | None:
        return self._tuner

    def all_stages(self) -> list[Tunable]:
        return self._ctx.all_stages()

    @property
    def threads(self) -> ThreadBudget:
        return self._ctx.threads

    def worker_memory(self) -> list[WorkerMemory]:
        return self._ctx.worker_memory()

    def notes(self) -> list[str]:
        return self._ctx.notes()

    def buffered_bytes(self) -> int:
        """Bytes held by this pass's buffers right now (finished, undelivered elements)."""
        return sum(stage.metrics.buffered_bytes for stage in self._ctx.stages())

    def stats(self) -> dict[str, Any]:
        """Per stage: knobs, elements, time per element, CPU share, consumer wait, buffers;
        the consumer's side; and AUTOTUNE's decisions so far."""
        from feedline.observe.stats import collect_stats

        return collect_stats(self)

    def report(self, file: Any = None) -> str:
        """A table of ``stats()``, the bottleneck and what would help; printed and returned."""
        from feedline.observe.stats import format_report

        text = format_report(self.stats())
        print(text, file=file)
        return text

    def plot(self, path: Any) -> Any:
        """Write a PNG of buffers, parallelism, throughput and consumer wait over time, with
        AUTOTUNE's decisions marked; returns its ``Path``. Needs matplotlib
        (``feedline[viz]``). A tuned pass is recorded from its start, so this shows the whole
        run, during or after the loop; with AUTOTUNE off, call
        ``feedline.observe.timeline.record(self)`` before iterating."""
        from feedline.observe.plot import plot_iterator

        return plot_iterator(self, path)

    def get_state(self) -> State:
        return {
            "version": STATE_VERSION,
            "pipeline": self._pipeline(),
            "root": frozen(self._root.get_state()),
        }

    def set_state(self, state: State) -> None:
        """Resume at ``state``; if it is refused (``InvalidStateError``), this pass goes on
        where it was."""
        self._start(state)

    def close(self) -> None:
        """Stop the pass and release its resources; further ``next`` calls stop at once."""
        if not self._closed:
            self._closed = True
            self._ready = []
            if self._tuner is not None:
                self._tuner.stop()  # kept: stats() still shows its decisions
                self._final_sample()  # the timeline ends with the pass's last counters
            self._root.close()
            self._ctx.close()

    def __enter__(self) -> DatasetIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped by the user's code, closed at once (a partial pass's files are gone when
        # the loop is). Found on one of feedline's own threads, closed on the closer thread:
        # that thread may hold a lock the close needs (see runtime/closer.py). A finalizer
        # must never raise, e.g. during interpreter teardown.
        with contextlib.suppress(Exception):
            closer.from_finalizer(self.close)


class _Raised:
    """What the root's ``next`` raised, handed out of ``_pulls`` to be raised by the caller."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _pulls(root: StageIterator) -> Iterator[Any]:
    """The root's elements, each pulled from this generator's frame.

    A suspended generator's frame has no caller, so the stages' frames lead back no further
    than here. An error made on the consumer's thread and kept in a stage until its turn (a
    map run inline over a chunk) keeps the frames it was made in, and every frame its
    callers': without this, the consumer's, and in them the iterator, kept alive by every
    thread that keeps the stage (its workers, the tuner): a dropped iterator never collected.
    """
    while True:
        try:
            element = next(root)
        except BaseException as error:  # the caller raises a copy: see copy_to_raise
            element = _Raised(error)
        yield element
