"""Steady-state A/B of feedline executors against the machine's own ceiling, in rounds.

Each round times the workload's function single-threaded (the limit: 2 x that rate), then
two plain processes running it side by side (what the machine really gives), then each
pipeline; every figure is a fraction of the limit taken in the same round, so slow drifts of
a shared machine cancel. Medians over the rounds are printed.

    python -m benchmarks.steady_ab --workload image --configs thr2,proc2,auto --rounds 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import feedline as fl
from benchmarks.workloads import WORKLOADS, prepare_data

DATA = Path(__file__).parent / "results" / "tmp" / "data"
CONFIGS: dict[str, dict[str, Any]] = {
    "thr2": {"num_parallel_calls": 2, "executor": "thread"},
    "proc2": {"num_parallel_calls": 2, "executor": "process"},
    "auto": {"num_parallel_calls": fl.AUTOTUNE},
}


def _rate(fn: Any, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - started)


def _loop(workload: str, n: int, out: Any) -> None:
    out.put(_rate(WORKLOADS[workload].element_fn(str(DATA)), n))


def two_processes(workload: str, n: int) -> float:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_loop, args=(workload, n, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return float(out.get() + out.get())


def pipeline(fn: Any, n: int, skip: int, config: dict[str, Any]) -> float:
    ds = fl.Dataset.range(n).map(fn, **config).batch(32).prefetch(fl.AUTOTUNE)
    started, count = 0.0, 0
    for j, batch in enumerate(ds):
        if j == skip:
            started, count = time.perf_counter(), 0
        elif j > skip:
            count += len(batch)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="image")
    parser.add_argument("--configs", default="thr2,proc2,auto")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--elements", type=int, default=3000)
    parser.add_argument("--skip-batches", type=int, default=15)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    prepare_data(workload, DATA)
    fn = workload.element_fn(str(DATA))
    names = args.configs.split(",")
    fractions: dict[str, list[float]] = {name: [] for name in ["2procs", *names]}
    for _ in range(args.rounds):
        limit = 2 * _rate(fn, 200)
        fractions["2procs"].append(two_processes(args.workload, 300) / limit)
        for name in names:
            rate = pipeline(fn, args.elements, args.skip_batches, CONFIGS[name])
            fractions[name].append(rate / limit)
    for name, values in fractions.items():
        print(
            f"{name:8s} median {statistics.median(values):.2f} of the limit  "
            f"{[round(v, 2) for v in values]}"
        )


if __name__ == "__main__":
    main()
