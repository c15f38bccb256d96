"""feedline: AUTOTUNE everywhere (the headline), plus a fixed-settings grid (the oracle)."""

from __future__ import annotations

from typing import Any

from benchmarks.systems import AUTOTUNE, OpenIterator, RunSpec, tuned_specs
from benchmarks.workloads import Workload

NAME = "feedline"
REQUIRES = ("feedline",)


def specs(workload: Workload, mode: str) -> list[RunSpec]:
    return tuned_specs(workload, mode, "feedline", NAME, [None])


def build(workload: Workload, config: dict[str, Any], elements: int, data_dir: str) -> OpenIterator:
    import feedline as fl

    def knob(value: Any) -> Any:
        return fl.AUTOTUNE if value == AUTOTUNE else (value or None)

    stop, repeat = workload.source(elements)
    ds = fl.Dataset.range(stop)
    if repeat:
        ds = ds.repeat()
    fn = workload.element_fn(data_dir)
    if fn is not None:
        ds = ds.map(fn, num_parallel_calls=knob(config["num_parallel_calls"]))
    ds = ds.batch(workload.batch_size).prefetch(knob(config["prefetch"]))
    return ds.__iter__
