"""What the tuner did and why, in one history: its knob writes, each with its reason, the
stages' own start choices and events, where the thread budget stopped a scale-up, and the
budgets it cannot keep (warnings, also on the log)."""

from __future__ import annotations

import logging
import threading
import time

from feedline.autotune.budget import Budget
from feedline.autotune.experiments import Decision, TunerState
from feedline.autotune.limits import ram_floor_warning, thread_budget_words
from feedline.autotune.windows import Snapshots
from feedline.runtime.tunable import Knob, StartChoice, Tunable

logger = logging.getLogger("feedline.autotune")
# What users must see even with the tuner's own log quiet: a budget that cannot be kept.
warnings_logger = logging.getLogger("feedline")


class DecisionLog:
    """The history of one pass's tuning (``state.history``), written from the tuner's thread
    and read from the user's (``stats()``, the report)."""

    def __init__(self, state: TunerState, started: float) -> None:
        self.state = state
        self._started = started
        self._lock = threading.Lock()
        self.warnings: list[str] = []
        self._warned: set[object] = set()
        self._start_choices_recorded: set[object] = set()
        self._events_recorded: dict[object, int] = {}  # stage key -> its events recorded
        # (stage key, parallelism) at which the thread budget stopped a scale-up, said once.
        self._budget_noted: set[tuple[object, int]] = set()

    def history(self) -> list[Decision]:
        with self._lock:
            return list(self.state.history)

    def set(self, stage: Tunable, knob: Knob, value: int, reason: str) -> int:
        """Set ``knob`` with ``reason`` (recorded if its value changed); the value applied."""
        old = knob.value
        applied = knob.set(value)
        if applied != old:
            self.record(
                Decision(
                    time.perf_counter() - self._started, stage.name, knob.name, old, applied, reason
                )
            )
        return applied

    def record(self, decision: Decision) -> None:
        with self._lock:
            self.state.history.append(decision)
        logger.debug("%s", decision)

    def record_start_choices(self, snapshots: Snapshots) -> None:
        """What stages chose from their first calls, into the history with the rest."""
        for key, (stage, _) in snapshots.items():
            choice = stage.start_choice
            if choice is not None and key not in self._start_choices_recorded:
                self._start_choices_recorded.add(key)
                if choice not in stage.events:
                    self._record_choice(stage, choice)
            events = stage.events
            for event in events[self._events_recorded.get(key, 0) : len(events)]:
                self._record_choice(stage, event)
            self._events_recorded[key] = len(events)

    def _record_choice(self, stage: Tunable, choice: StartChoice) -> None:
        self.record(
            Decision(
                choice.at - self._started,
                stage.name,
                choice.knob,
                choice.old,
                choice.new,
                choice.reason,
            )
        )

    def check_ram_floor(self, snapshots: Snapshots, worker_rss: float, budget: Budget) -> None:
        """Say once, for each stage running on workers, if even one worker (``worker_rss``
        bytes each) holds more than the RAM budget: the tuner cannot keep to it, and the user
        would not know."""
        for key, (stage, now) in snapshots.items():
            if key in self._warned:
                continue
            warning = ram_floor_warning(stage, now["bytes_per_element"], worker_rss, budget)
            if warning is None:
                continue
            self._warned.add(key)
            with self._lock:
                self.warnings.append(warning)
            warnings_logger.warning("%s", warning)

    def note_thread_budget(self, stage: Tunable, knob: Knob, wanted: int) -> None:
        """Record, once at each value, that the thread budget stopped a scale-up of ``knob``."""
        noted = (stage.key, knob.value)
        if noted not in self._budget_noted:
            self._budget_noted.add(noted)
            reason = f"no more workers: {thread_budget_words(knob, wanted)}"
            self.record(
                Decision(
                    time.perf_counter() - self._started,
                    stage.name,
                    knob.name,
                    knob.value,
                    knob.value,
                    reason,
                )
            )
