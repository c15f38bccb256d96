"""The floor: a single-threaded Python loop calling the element function and stacking batches.

Batches are made with ``np.array``, which stacks equal-shaped arrays like ``np.stack`` and is
several times faster on Python scalars (the overhead workload): a floor must be a fair one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from benchmarks.systems import OpenIterator, RunSpec
from benchmarks.workloads import Workload

NAME = "plain"
REQUIRES: tuple[str, ...] = ()


def specs(workload: Workload, mode: str) -> list[RunSpec]:
    return [RunSpec("plain", NAME, {"loop": "single-threaded"})]


def build(workload: Workload, config: dict[str, Any], elements: int, data_dir: str) -> OpenIterator:
    fn = workload.element_fn(data_dir)
    size = workload.batch_size

    def batches() -> Iterator[np.ndarray]:
        batch: list[Any] = []
        for i in range(elements):
            x = workload.source_index(i)
            batch.append(x if fn is None else fn(x))
            if len(batch) == size:
                yield np.array(batch)
                batch = []
        if batch:
            yield np.array(batch)

    return batches
