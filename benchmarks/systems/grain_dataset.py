"""Grain's MapDataset / IterDataset API, with thread prefetch or process prefetch.

Three shapes, as Grain users write them:

- ``threads`` with Grain's defaults (16 threads, 500-element buffer), batching after
  ``to_iter_dataset`` so each thread maps one element;
- ``threads`` hand-set: batch on the MapDataset, so each thread builds a whole batch, with the
  grid's thread count and buffer (in batches; 0 threads is Grain's advice for in-memory data);
- ``processes``: ``mp_prefetch`` over 2 spawned workers, each building batches on its own
  thread, Grain's answer to GIL-bound work.
"""

from __future__ import annotations

from typing import Any

from benchmarks.systems import OpenIterator, RunSpec
from benchmarks.workloads import Workload

NAME = "grain"
REQUIRES = ("grain",)
PROCESS_WORKERS = 2  # one per core on the reference machine


def specs(workload: Workload, mode: str) -> list[RunSpec]:
    parallelism, buffers = workload.grid(mode)
    configs: list[dict[str, Any]] = [
        {"prefetch": "threads", "batch": "after", "threads": "default"}
    ]
    configs += [
        {"prefetch": "threads", "batch": "before", "threads": p, "buffer": b}
        for p in parallelism
        for b in buffers
    ]
    configs.append({"prefetch": "processes", "batch": "before", "workers": PROCESS_WORKERS})
    return [RunSpec("grain", NAME, c) for c in configs]


def build(workload: Workload, config: dict[str, Any], elements: int, data_dir: str) -> OpenIterator:
    import grain

    stop, repeat = workload.source(elements)
    ds = grain.MapDataset.range(stop)
    if repeat:
        ds = ds.repeat()
    fn = workload.element_fn(data_dir)
    if fn is not None:
        ds = ds.map(fn)
    if config["batch"] == "after":
        pipeline = ds.to_iter_dataset(grain.ReadOptions()).batch(workload.batch_size)
    elif config["prefetch"] == "threads":
        options = grain.ReadOptions(
            num_threads=config["threads"], prefetch_buffer_size=config["buffer"]
        )
        pipeline = ds.batch(workload.batch_size).to_iter_dataset(options)
    else:
        sequential = grain.ReadOptions(num_threads=0)
        # Grain's workers read absl flags, which only an absl app parses: a plain script
        # must mark them parsed (with their defaults) or every worker fails at start.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        workers = grain.MultiprocessingOptions(num_workers=config["workers"])
        pipeline = ds.batch(workload.batch_size).to_iter_dataset(sequential).mp_prefetch(workers)
    return pipeline.__iter__
