"""What an op asks of its ``AsyncStage``: the stage's name and knob settings, fixed per pass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageConfig:
    """How one ``AsyncStage`` runs, as its op decides it (the tuner may then move the knobs).

    - ``parallelism``: worker threads to start with (0 runs the transform inline);
      ``parallelism_tunable`` lets the tuner move it within [0, ``max_parallelism``].
    - ``buffer_size``: elements taken from the input and not yet delivered; None lets the
      stage size it from the parallelism and chunk size. ``buffer_tunable``: the tuner moves it.
    - ``deterministic``: deliver in input order (False: in the order chunks finish).
    - ``start_parallelism``: run the first chunk inline to learn its cost, then start that
      many workers unless the work is too cheap to be worth a hand-off.
    - ``choose_read_ahead``: a read-ahead stage (no transform) starting inline watches its
      consumer's first calls and starts its thread if the consumer has work to overlap.
    - ``key``: what identifies the op across the stages of one run (so a later epoch starts
      where the tuner left an earlier one); None makes the stage its own.
    """

    name: str
    parallelism: int
    parallelism_tunable: bool
    max_parallelism: int
    buffer_size: int | None
    buffer_tunable: bool
    deterministic: bool
    start_parallelism: int | None = None
    choose_read_ahead: bool = False
    key: object = None
