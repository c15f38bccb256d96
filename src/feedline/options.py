"""User-facing options, mutable like tf.data's so ported code works.

``Dataset.with_options`` takes a deep copy, so changing an ``Options`` object after attaching it
changes nothing (a dataset is immutable). Fields left at ``None`` are "not set": merging keeps
the value set last, and the runtime fills in defaults.

Every attribute of ``tf.data.Options`` (TensorFlow 2.21) is spelled here as tf.data spells it,
and is one of three things:

- **mapped** onto what feedline has: ``deterministic`` (and its old name
  ``experimental_deterministic``), ``autotune.enabled``, ``autotune.cpu_budget``,
  ``autotune.ram_budget`` (bytes, as in tf.data), ``threading.private_threadpool_size`` (the
  worker threads of one pass, all its stages together: ``autotune.max_threads``; where both are
  set the smaller holds, as both are caps), ``experimental_threading`` (tf.data's old name of
  ``threading``), ``experimental_distribute.auto_shard_policy`` (an ``AutoShardPolicy``, read
  where a dataset is sharded for distributed training, as in tf.data: ``feedline.distribute``);
- **accepted, and not applicable**, because feedline already does what every value asks, or the
  option is about a mechanism feedline does not have and changes no element:
  ``threading.max_intra_op_parallelism`` (feedline never splits one call of an op across
  threads, so every bound holds already), ``experimental_optimization.*`` (tf.data's graph
  rewrites, such as fusing two maps: feedline runs the pipeline as written, and a rewrite never
  changes the elements), ``experimental_symbolic_checkpoint`` (feedline's states are always
  symbolic: positions, never buffered elements), ``experimental_external_state_policy`` (what
  to do with functions' state when a checkpoint serialises the graph: feedline's states never
  hold functions), ``dataset_name`` and ``framework_type`` (labels for tf.data's metrics);
- **refused** with an ``AttributeError`` saying why, where feedline cannot do what the option
  asks: ``autotune.autotune_algorithm``, ``autotune.initial_parallelism``,
  ``autotune.min_parallelism`` (feedline has one tuner, which starts from what it measures and
  may run a stage inline), ``experimental_slack``, ``experimental_warm_start``,
  ``experimental_service.*`` (there is no tf.data service), and
  ``experimental_distribute.num_devices`` (set by tf.distribute strategies).

Any other name is refused with an ``AttributeError`` naming the nearest valid one: a misspelt
option must never be accepted and ignored.
"""

from __future__ import annotations

import copy
import difflib
import enum
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

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


class AutoShardPolicy(enum.IntEnum):
    """How a dataset is split between the workers of a distributed job: tf.data's
    ``tf.data.experimental.AutoShardPolicy``, with its members and values."""

    OFF = -1
    AUTO = 0
    FILE = 1
    DATA = 2
    HINT = 3


# -- value checks: each returns the value to store, or raises where the user assigns ----------


def _any(value: Any, what: str) -> Any:
    return value


def _bool(value: Any, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool | np.bool_):
        raise TypeError(f"{what} must be a bool or None, got {type(value).__name__} {value!r}")
    return None if value is None else bool(value)


def _count(value: Any, what: str) -> int | None:
    """A non-negative int or None (tf.data reads 0 as "the default" for its budgets)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int or None, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _executor(value: Any, what: str) -> str | None:
    return None if value is None else check_executor(value, what)


def _shard_policy(value: Any, what: str) -> AutoShardPolicy | None:
    """An ``AutoShardPolicy``, its name, its value, or tf.data's enum member of that name."""
    if value is None:
        return None
    name = getattr(value, "name", value)
    try:
        if isinstance(name, str):
            return AutoShardPolicy[name.upper()]
        if not isinstance(value, bool):
            return AutoShardPolicy(int(value))
    except (KeyError, ValueError, TypeError):
        pass
    members = ", ".join(m.name for m in AutoShardPolicy)
    raise ValueError(f"{what} must be an AutoShardPolicy ({members}), got {value!r}")


def _external_state_policy(value: Any, what: str) -> str | None:
    """tf.data's ``ExternalStatePolicy`` (WARN, IGNORE, FAIL), as a member or its name."""
    if value is None:
        return None
    name = getattr(value, "name", value)
    if not isinstance(name, str) or name.upper() not in ("WARN", "IGNORE", "FAIL"):
        raise ValueError(f"{what} must be WARN, IGNORE or FAIL, got {value!r}")
    return name.upper()


# Field metadata: the check that reads what is assigned to the field.
_BOOL = {"check": _bool}
_COUNT = {"check": _count}
_ANY = {"check": _any}


class OptionGroup:
    """Options with a fixed set of names: tf.data's spellings are read as the ``ALIASES`` say,
    the names in ``REFUSED`` raise with the reason, and any other unknown name raises an
    ``AttributeError`` naming the nearest valid one (never set and silently ignored)."""

    PATH: ClassVar[str] = "Options"
    # tf.data's name -> this group's field of the same meaning.
    ALIASES: ClassVar[dict[str, str]] = {}
    # tf.data's name -> why feedline cannot honour it.
    REFUSED: ClassVar[dict[str, str]] = {}

    def __init__(self, **settings: Any) -> None:
        """Every option unset (groups empty), then ``settings`` assigned by name, each checked
        as an assignment is (tf.data's ``Options()`` takes none; feedline's, any option)."""
        for f in fields(self):  # type: ignore[arg-type]
            value = f.default_factory() if f.default_factory is not MISSING else None
            object.__setattr__(self, f.name, value)
        for name, value in settings.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        name = self._known(name)
        spec = self.__dataclass_fields__[name]  # type: ignore[attr-defined]
        if "check" in spec.metadata:
            value = spec.metadata["check"](value, f"{self.PATH}.{name}")
        elif not isinstance(value, spec.default_factory):
            raise TypeError(
                f"{self.PATH}.{name} is a group of options: set its attributes, "
                f"e.g. {self.PATH}.{name}.{fields(spec.default_factory)[0].name}"
            )
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Reached only for names that are not fields: aliases, refused and unknown names.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self, self._known(name))

    def _known(self, name: str) -> str:
        """The field ``name`` stands for; an AttributeError if there is none."""
        own = [f.name for f in fields(self)]  # type: ignore[arg-type]
        if name in own:
            return name
        if name in self.ALIASES:
            return self.ALIASES[name]
        if name in self.REFUSED:
            raise AttributeError(
                f"{self.PATH}.{name} (a tf.data option) is not supported by feedline: "
                f"{self.REFUSED[name]}"
            )
        valid = own + list(self.ALIASES)
        nearest = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
        hint = f"; did you mean {self.PATH}.{nearest[0]}?" if nearest else ""
        raise AttributeError(
            f"{type(self).__name__} has no option {name!r}{hint} (valid: {', '.join(valid)})"
        )


_ONE_TUNER = (
    "feedline has one tuner, which starts each stage from what it measures and may run it "
    "inline; give the stage a fixed num_parallel_calls instead"
)


@dataclass(init=False)
class AutotuneOptions(OptionGroup):
    """What the tuner may use (tf.data's ``AutotuneOptions``). ``None`` means "measure it"
    (cores, available RAM), or the default: ``max_parallelism`` threads for one stage,
    ``max_threads`` for the worker threads of all the pass's stages together (stages the user
    gave a fixed ``num_parallel_calls`` get it, and leave the tuned ones what remains)."""

    PATH: ClassVar[str] = "Options.autotune"
    REFUSED: ClassVar[dict[str, str]] = {
        "autotune_algorithm": _ONE_TUNER,
        "initial_parallelism": _ONE_TUNER,
        "min_parallelism": _ONE_TUNER,
    }

    enabled: bool | None = field(default=None, metadata=_BOOL)
    cpu_budget: int | None = field(default=None, metadata=_COUNT)
    ram_budget: int | None = field(default=None, metadata=_COUNT)
    max_parallelism: int | None = field(default=None, metadata=_COUNT)
    max_threads: int | None = field(default=None, metadata=_COUNT)


@dataclass(init=False)
class ThreadingOptions(OptionGroup):
    """tf.data's ``ThreadingOptions``: ``private_threadpool_size`` caps the worker threads of
    one pass (as ``autotune.max_threads``; 0 is tf.data's "default"); ``max_intra_op_parallelism``
    is accepted and has nothing to bound (see the module's notes)."""

    PATH: ClassVar[str] = "Options.threading"

    private_threadpool_size: int | None = field(default=None, metadata=_COUNT)
    max_intra_op_parallelism: int | None = field(default=None, metadata=_COUNT)


@dataclass(init=False)
class OptimizationOptions(OptionGroup):
    """tf.data's graph rewrites (``OptimizationOptions``), accepted and not applicable:
    feedline runs the pipeline as written, and no rewrite changes an element."""

    PATH: ClassVar[str] = "Options.experimental_optimization"

    apply_default_optimizations: bool | None = field(default=None, metadata=_BOOL)
    filter_fusion: bool | None = field(default=None, metadata=_BOOL)
    filter_parallelization: bool | None = field(default=None, metadata=_BOOL)
    inject_prefetch: bool | None = field(default=None, metadata=_BOOL)
    map_and_batch_fusion: bool | None = field(default=None, metadata=_BOOL)
    map_and_filter_fusion: bool | None = field(default=None, metadata=_BOOL)
    map_fusion: bool | None = field(default=None, metadata=_BOOL)
    map_parallelization: bool | None = field(default=None, metadata=_BOOL)
    noop_elimination: bool | None = field(default=None, metadata=_BOOL)
    parallel_batch: bool | None = field(default=None, metadata=_BOOL)
    seq_interleave_prefetch: bool | None = field(default=None, metadata=_BOOL)
    shuffle_and_repeat_fusion: bool | None = field(default=None, metadata=_BOOL)


@dataclass(init=False)
class DistributeOptions(OptionGroup):
    """tf.data's ``DistributeOptions``: ``auto_shard_policy`` (None reads as
    ``AutoShardPolicy.AUTO``), consulted where a dataset is sharded between workers."""

    PATH: ClassVar[str] = "Options.experimental_distribute"
    REFUSED: ClassVar[dict[str, str]] = {
        "num_devices": "tf.distribute sets it for its own strategies, which feedline has not",
    }

    auto_shard_policy: AutoShardPolicy | None = field(
        default=None, metadata={"check": _shard_policy}
    )


@dataclass(init=False)
class Options(OptionGroup):
    """Pipeline-wide options; attach with ``Dataset.with_options`` (tf.data's ``Options``,
    with its attribute names: see this module's notes for what each does here)."""

    PATH: ClassVar[str] = "Options"
    ALIASES: ClassVar[dict[str, str]] = {
        "experimental_deterministic": "deterministic",
        "experimental_threading": "threading",
    }
    REFUSED: ClassVar[dict[str, str]] = {
        "experimental_slack": "feedline's prefetch has no slack period (a TPU feature)",
        "experimental_warm_start": "feedline starts a stage's threads at its first element",
        "experimental_service": "feedline has no tf.data service",
    }

    deterministic: bool | None = field(default=None, metadata=_BOOL)
    # The executor of map-like stages that do not name one; None means "auto".
    executor: str | None = field(default=None, metadata={"check": _executor})
    autotune: AutotuneOptions = field(default_factory=AutotuneOptions)
    threading: ThreadingOptions = field(default_factory=ThreadingOptions)
    experimental_optimization: OptimizationOptions = field(default_factory=OptimizationOptions)
    experimental_distribute: DistributeOptions = field(default_factory=DistributeOptions)
    experimental_symbolic_checkpoint: bool | None = field(default=None, metadata=_BOOL)
    experimental_external_state_policy: str | None = field(
        default=None, metadata={"check": _external_state_policy}
    )
    dataset_name: str | None = field(default=None, metadata=_ANY)
    framework_type: list[str] | None = field(default=None, metadata=_ANY)

    def merge(self, other: Options) -> Options:
        """Options with every field ``other`` sets overriding this one's."""
        merged = copy.deepcopy(self)
        _merge_into(merged, other)
        return merged


def _merge_into(target: Any, source: Any) -> None:
    for f in fields(source):
        value = getattr(source, f.name)
        if isinstance(value, OptionGroup):
            _merge_into(getattr(target, f.name), value)
        elif value is not None:
            setattr(target, f.name, copy.deepcopy(value))


def _thread_budget(options: Options) -> int:
    """The worker threads of one pass: the smaller of the caps set, or the default."""
    # private_threadpool_size 0 is tf.data's "not set"; max_threads 0 is no worker threads
    # (every tuned stage inline).
    pool = options.threading.private_threadpool_size
    caps = [c for c in (options.autotune.max_threads, pool or None) if c is not None]
    return min(caps) if caps else default_thread_budget()


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
            thread_budget=_thread_budget(options),
            autotune=copy.deepcopy(tune),
        )
