"""feedline feeding a torch loop: the AUTOTUNE pipeline with ``feedline.torch.to_torch`` on top,
so it hands out torch tensors as the DataLoader does (its conversion cost is in the figure)."""

from __future__ import annotations

from typing import Any

from benchmarks.systems import AUTOTUNE, OpenIterator, RunSpec
from benchmarks.systems import feedline as feedline_system
from benchmarks.workloads import Workload

NAME = "feedline+torch"
REQUIRES = ("feedline", "torch")


def specs(workload: Workload, mode: str) -> list[RunSpec]:
    has_map = workload.make_fn is not None
    config = {"num_parallel_calls": AUTOTUNE if has_map else None, "prefetch": AUTOTUNE}
    return [RunSpec(NAME, __name__, config)]


def build(workload: Workload, config: dict[str, Any], elements: int, data_dir: str) -> OpenIterator:
    from feedline.torch import to_torch

    open_pipeline = feedline_system.build(workload, config, elements, data_dir)
    return lambda: iter(to_torch(open_pipeline()))
