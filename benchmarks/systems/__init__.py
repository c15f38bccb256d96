"""The systems under comparison, one module each, behind one small interface.

A system module has:

- ``NAME``: the name used on the command line (``--systems``);
- ``REQUIRES``: the importable modules it needs (checked without importing them, so the driver
  never pays for importing tensorflow or torch);
- ``specs(workload, mode) -> list[RunSpec]``: the configurations to run, each tagged with the
  system name it is recorded under (``feedline`` for AUTOTUNE, ``feedline-oracle`` for a fixed
  grid setting, ...);
- ``build(workload, config, elements, data_dir) -> OpenIterator``: builds the pipeline (outside
  the timed window) and returns a function that creates its iterator (inside it).

The consumer loop, timing and sampling are shared (``benchmarks.measure``): a system module
only describes its pipeline.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from benchmarks.workloads import Workload

OpenIterator = Callable[[], Iterator[Any]]

# Config value for "let the system choose" (tf.data.AUTOTUNE, fl.AUTOTUNE): JSON-friendly.
AUTOTUNE = "AUTOTUNE"

MODULES: dict[str, str] = {
    "feedline": "benchmarks.systems.feedline",
    "feedline+torch": "benchmarks.systems.feedline_torch",
    "tf.data": "benchmarks.systems.tfdata",
    "torch": "benchmarks.systems.torch_loader",
    "grain": "benchmarks.systems.grain_dataset",
    "plain": "benchmarks.systems.plain",
}

# Every record's ``system``, in table order.
SYSTEM_ORDER = (
    "feedline",
    "feedline-oracle",
    "feedline+torch",
    "tf.data",
    "tf.data-oracle",
    "torch",
    "grain",
    "plain",
)


@dataclass(frozen=True)
class RunSpec:
    """One configuration of one system: what a record's ``system`` and ``config`` say."""

    system: str
    module: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.config.items()) or "default"


def load(name: str) -> ModuleType:
    return importlib.import_module(MODULES[name])


def missing(name: str) -> str | None:
    """Why system ``name`` cannot run here (a module it needs is not installed), or None."""
    for module in load(name).REQUIRES:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def tuned_specs(
    workload: Workload, mode: str, system: str, module: str, forms: list[str | None]
) -> list[RunSpec]:
    """AUTOTUNE runs plus a hand-set (parallelism x prefetch buffer) grid recorded as
    ``<system>-oracle``, for the tf.data-like systems; ``forms`` are alternative ways to
    write the per-element work, each run at AUTOTUNE, ``[None]`` for a system with one way.
    The grid runs only the last form (the system's fastest way, e.g. TF ops), to keep the
    full run's length in bounds.

    A parallelism of 0 means the map runs sequentially (``num_parallel_calls=None``); a
    workload without per-element work has no map and so no parallelism to set.
    """
    has_map = workload.make_fn is not None
    specs = [
        RunSpec(system, module, _knobs(form, AUTOTUNE if has_map else None, AUTOTUNE))
        for form in forms
    ]
    parallelism, buffers = workload.grid(mode)
    for p in parallelism if has_map else (None,):
        for b in buffers:
            specs.append(RunSpec(f"{system}-oracle", module, _knobs(forms[-1], p, b)))
    return specs


def _knobs(form: str | None, parallelism: int | str | None, prefetch: int | str) -> dict[str, Any]:
    config: dict[str, Any] = {} if form is None else {"form": form}
    if parallelism is not None:
        config["num_parallel_calls"] = parallelism
    config["prefetch"] = prefetch
    return config
