"""Exceptions feedline raises to users."""

from __future__ import annotations

import copy


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


def copy_to_raise(error: BaseException) -> BaseException:
    """A copy of ``error`` to raise to the user (the original if it cannot be copied).

    Raised, an error holds the user's frames, and through them the iterator. The original
    may still be held from within the pipeline, which its worker and tuner threads keep
    alive: by the list a map's chunk was copied from, by another error's traceback through
    the frames it was made in. Were it the one raised, a dropped iterator could never be
    collected and those threads would run forever.
    """
    try:
        raised = copy.copy(error)
    except Exception:  # an exception class whose arguments do not rebuild it
        return error
    raised.__cause__ = error.__cause__
    raised.__context__ = error.__context__
    raised.__suppress_context__ = error.__suppress_context__
    return raised.with_traceback(error.__traceback__)


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
