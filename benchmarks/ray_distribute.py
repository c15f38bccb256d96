"""feedline.ray on this machine: a GIL-bound map, local AUTOTUNE vs distribute(num_workers=2);
a waiting map (20 ms per element) on 1 and 2 actors; the cost of a call. One machine: Ray's
actors compete with the caller for the same 2 cores, so this cannot show a multi-machine win.

    .venv/bin/python -m benchmarks.ray_distribute
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import feedline as fl
import feedline.ray as flr

N_CPU = 1500  # elements of ~2 ms of pure Python each


def burn(x):
    s = 0
    for i in range(60_000):
        s += i ^ x
    return s


def wait20(x):
    time.sleep(0.02)
    return x


def run(ds):
    """(elements/s over the whole pass, elements/s from the first element on, elements)."""
    t0 = time.perf_counter()
    with ds.iterator() as it:
        next(it)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in it)
        stats = it.stats()
        actors = flr.actors(it)
        hist = flr.history(it)
    t2 = time.perf_counter()
    return {
        "rate_total": n / (t2 - t0),
        "rate_steady": (n - 1) / (t2 - t1),
        "first_s": t1 - t0,
        "n": n,
        "knobs": [s["knobs"] for s in stats["stages"]],
        "actors": [(a["actor"], a["elements"]) for a in actors],
        "history": [f"{h['time']:.1f}s {h['old']}->{h['new']} {h['reason']}" for h in hist],
    }


class Results(dict):
    """Printed as each comes in: a late failure loses nothing."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(key, json.dumps(value, default=str), flush=True)


def main():
    import ray
    from feedline.ray.cluster import local_init_args, loopback_only

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="feedline-ray-bench-")
    with loopback_only(ray):
        ray.init(num_cpus=2, **local_init_args(tmp, 256 * 2**20))
    out = Results()
    try:
        cpu = fl.Dataset.range(N_CPU)
        out["gil_local_autotune"] = run(cpu.map(burn, num_parallel_calls=fl.AUTOTUNE))
        out["gil_distribute_1"] = run(cpu.map(burn).apply(flr.distribute(num_workers=1)))
        out["gil_distribute_2"] = run(cpu.map(burn).apply(flr.distribute(num_workers=2)))
        out["gil_distribute_autotune"] = run(
            cpu.map(burn).apply(flr.distribute(fl.AUTOTUNE, max_workers=2))
        )
        io = fl.Dataset.range(300)
        out["wait_1_actor"] = run(io.map(wait20).apply(flr.distribute(num_workers=1, num_shards=8)))
        out["wait_2_actors"] = run(
            io.map(wait20).apply(flr.distribute(num_workers=2, num_shards=8))
        )
        # The cost of a call: 64 KiB batches, no work, one actor.
        import numpy as np

        blocks = fl.Dataset.range(4000).map(lambda x: np.zeros(8192, np.float64))
        out["cheap_local"] = run(blocks)
        out["cheap_1_actor"] = run(blocks.apply(flr.distribute(num_workers=1, num_shards=4)))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
