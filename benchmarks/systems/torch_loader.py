"""The PyTorch DataLoader: a map-style dataset, default collation, a grid over num_workers.

Always runs num_workers=0 and 2 (what most users write), plus the workload's parallelism grid;
the report's "torch" column is the best of them. Everything else stays at its default
(prefetch_factor=2, fork start method on Linux), as a user would leave it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.systems import OpenIterator, RunSpec
from benchmarks.workloads import ElementFn, Workload

NAME = "torch"
REQUIRES = ("torch",)
# Beyond this many worker processes the machine (2 cores) spends its time forking and paging.
MAX_WORKERS = 32


class IndexedWork:
    """Map-style dataset: item ``i`` is the work on source element ``i``. A plain class (the
    DataLoader only needs ``__len__`` and ``__getitem__``) so torch is imported lazily."""

    def __init__(self, workload: Workload, elements: int, fn: ElementFn | None) -> None:
        self.workload = workload
        self.elements = elements
        self.fn = fn

    def __len__(self) -> int:
        return self.elements

    def __getitem__(self, i: int) -> Any:
        x = self.workload.source_index(i)
        return x if self.fn is None else self.fn(x)


def specs(workload: Workload, mode: str) -> list[RunSpec]:
    parallelism, _ = workload.grid(mode)
    workers = sorted({0, 2, *(p for p in parallelism if p <= MAX_WORKERS)})
    return [RunSpec("torch", NAME, {"num_workers": w}) for w in workers]


def build(workload: Workload, config: dict[str, Any], elements: int, data_dir: str) -> OpenIterator:
    from torch.utils.data import DataLoader

    dataset = IndexedWork(workload, elements, workload.element_fn(data_dir))
    loader: DataLoader[Any] = DataLoader(
        dataset,  # type: ignore[arg-type]  # duck-typed map-style dataset (see IndexedWork)
        batch_size=workload.batch_size,
        num_workers=config["num_workers"],
    )
    return loader.__iter__
