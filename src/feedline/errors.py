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


def wrap_user_error(stage: str, position: int | None, error: BaseException) -> StageError:
    """The error a consumer sees when a user function raised ``error``; keeps it as cause."""
    wrapped = StageError(stage, position, f"{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped
