"""Exceptions feedline raises to users."""

from __future__ import annotations


class StageError(Exception):
    """A user function (or a stage's own check) failed while producing an element.

    ``stage`` names the pipeline stage (e.g. ``"map(decode)"``), ``position`` is the index of the
    element *entering* that stage in the current pass, and the original exception, with its
    traceback, is chained as ``__cause__``.
    """

    def __init__(self, stage: str, position: int | None, message: str) -> None:
        where = f"stage {stage!r}" + (f" at element {position}" if position is not None else "")
        super().__init__(f"{where}: {message}")
        self.stage = stage
        self.position = position
        self.message = message

    def __reduce__(self) -> tuple[type[StageError], tuple[str, int | None, str]]:
        # Copied or pickled (to another process) with its own arguments, not the message's.
        return type(self), (self.stage, self.position, self.message)


def wrap_user_error(stage: str, position: int | None, error: BaseException) -> StageError:
    """The error a consumer sees when a user function raised ``error``; keeps it as cause."""
    wrapped = StageError(stage, position, f"{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


class StageCrashedError(StageError):
    """A stage can produce no more elements: a worker process died, a worker thread was killed
    by a ``BaseException``, or results could not come back. Unlike a ``StageError`` raised for
    one element's failure, it ends the pass: ``ignore_errors()`` does not skip it, and every
    later ``next()`` raises it again (the elements after it were never made)."""


class InvalidStateError(ValueError):
    """An iterator state this pipeline could not have written: a field missing, of the wrong
    type or out of range. Raised before any element is produced, naming the op and the field."""

    def __init__(self, owner: str, field: str, problem: str) -> None:
        super().__init__(f"invalid iterator state for {owner}: {field!r} {problem}")
        self.owner = owner
        self.field = field


class DataLossError(RuntimeError):
    """A file feedline reads (a cache, a saved dataset) is damaged, truncated, or was written by
    another pipeline: its data cannot be trusted. The message names the file and the place."""
