"""What observing a pass reads of it: a public view, so stats, report, timeline, live view,
plots, explain and the demo never reach into an iterator's private fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from feedline.autotune.tuner import RootCounters, Tuner
    from feedline.runtime.context import WorkerMemory
    from feedline.runtime.tunable import ThreadBudget, Tunable


class PassView(Protocol):
    """A pass as observers see it (``DatasetIterator`` is one)."""

    @property
    def closed(self) -> bool: ...

    @property
    def unit(self) -> str:
        """What the consumer receives: "batches" when the pass ends in a batching op (past
        prefetches), else "elements"."""
        ...

    @property
    def started(self) -> float:
        """``time.perf_counter()`` when the pass began."""
        ...

    @property
    def consumer(self) -> RootCounters:
        """What the consumer took and how long it waited."""
        ...

    @property
    def tuner(self) -> Tuner | None:
        """AUTOTUNE's tuner of this pass, once started (its history, budgets, warnings)."""
        ...

    @property
    def threads(self) -> ThreadBudget:
        """The pass's worker threads: its budget and the most alive at once."""
        ...

    def all_stages(self) -> list[Tunable]:
        """Every stage the pass made, closed ones included."""
        ...

    def worker_memory(self) -> list[WorkerMemory]: ...

    def buffered_bytes(self) -> int: ...

    def notes(self) -> list[str]:
        """Lines ops of the pass add to its report (``IterContext.note``)."""
        ...
