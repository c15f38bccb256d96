"""User-facing options, mutable like tf.data's so ported code works.

``Dataset.with_options`` takes a deep copy, so changing an ``Options`` object after attaching it
changes nothing (a dataset is immutable). Fields left at ``None`` are "not set": merging keeps
the value set last, and the runtime fills in defaults.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from feedline.runtime.machine import default_thread_budget

# Threads one tuned stage may use: enough calls in flight to hide object-store latency
# (tens of ms each); the tuner's RAM budget usually stops it well before this.
DEFAULT_MAX_PARALLELISM = 256
# Where map-like stages run their function: "thread", "process", or "auto" (feedline picks).
EXECUTORS = ("auto", "thread", "process")


def check_executor(value: Any, what: str = "executor") -> str:
    """``value`` if it names an executor, else a ValueError listing the choices."""
    if value not in EXECUTORS:
        choices = ", ".join(repr(e) for e in EXECUTORS)
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    return str(value)


@dataclass
class AutotuneOptions:
    """What the tuner may use. ``None`` means "measure it" (cores, available RAM), or the
    default: ``max_parallelism`` threads for one stage, ``max_threads`` for the worker threads
    of all the pass's stages together (stages the user gave a fixed ``num_parallel_calls``
    get it, and leave the tuned ones what remains)."""

    enabled: bool | None = None
    cpu_budget: int | None = None
    ram_budget: int | None = None
    max_parallelism: int | None = None
    max_threads: int | None = None


@dataclass
class Options:
    """Pipeline-wide options; attach with ``Dataset.with_options``."""

    deterministic: bool | None = None
    # The executor of map-like stages that do not name one; None means "auto".
    executor: str | None = None
    autotune: AutotuneOptions = field(default_factory=AutotuneOptions)

    def merge(self, other: Options) -> Options:
        """Options with every field ``other`` sets overriding this one's."""
        merged = copy.deepcopy(self)
        _merge_into(merged, other)
        return merged


def _merge_into(target: Any, source: Any) -> None:
    for f in fields(source):
        value = getattr(source, f.name)
        if isinstance(value, AutotuneOptions):
            _merge_into(getattr(target, f.name), value)
        elif value is not None:
            setattr(target, f.name, copy.deepcopy(value))


@dataclass(frozen=True)
class ResolvedOptions:
    """Options with every default filled in, as one run of a pipeline sees them."""

    deterministic: bool
    executor: str
    autotune_enabled: bool
    max_parallelism: int
    thread_budget: int
    autotune: AutotuneOptions

    @staticmethod
    def of(options: Options) -> ResolvedOptions:
        tune = options.autotune
        return ResolvedOptions(
            deterministic=True if options.deterministic is None else options.deterministic,
            executor=check_executor(
                "auto" if options.executor is None else options.executor, "Options.executor"
            ),
            autotune_enabled=True if tune.enabled is None else tune.enabled,
            max_parallelism=(
                DEFAULT_MAX_PARALLELISM if tune.max_parallelism is None else tune.max_parallelism
            ),
            thread_budget=default_thread_budget() if tune.max_threads is None else tune.max_threads,
            autotune=copy.deepcopy(tune),
        )
