"""The benchmarked process: runs one system's configurations of one workload, in order.

It talks to the driver (``benchmarks.supervise``) over stdout lines starting with ``@@`` and
waits for a line on stdin at each step, so the driver can sample the process tree at exactly
the start and the end of the measured window::

    child: @@ready <label>      (pipeline built)     driver: samples, then "go"
    child: @@done <timing json> (last batch in hand) driver: samples, then "go"
    child: @@closed <json>      (iterator torn down)
    child: @@error <json>       (instead of ready/done when a configuration fails)

With ``--limit`` it instead times the element function single-threaded: ``@@limit <json>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from typing import Any

from benchmarks import measure, systems
from benchmarks.workloads import WORKLOADS, Workload

LIMIT_BUDGET_S = 2.0


def emit(kind: str, payload: Any = "") -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    sys.stdout.write(f"@@{kind} {text}\n")
    sys.stdout.flush()


def wait_for_driver() -> None:
    if not sys.stdin.readline():
        sys.exit("driver went away")


def run_config(
    workload: Workload,
    module: Any,
    config: dict[str, Any],
    elements: int,
    data_dir: str,
    max_seconds: float,
) -> None:
    try:
        open_iterator = module.build(workload, config, elements, data_dir)
    except Exception:
        emit("error", {"phase": "build", "error": traceback.format_exc(limit=8)})
        return
    emit("ready")
    wait_for_driver()
    batches = math.ceil(elements / workload.batch_size)
    try:
        timing, it = measure.consume(open_iterator, batches, workload.consumer_sleep_s, max_seconds)
    except Exception:
        emit("error", {"phase": "run", "error": traceback.format_exc(limit=8)})
        return
    emit("done", timing.as_dict())
    wait_for_driver()
    start = time.perf_counter()
    measure.close_iterator(it)
    emit("closed", {"teardown_s": time.perf_counter() - start})


def run_limit(workload: Workload, elements: int, data_dir: str) -> None:
    fn = workload.element_fn(data_dir)
    if fn is None:
        emit("error", {"phase": "limit", "error": f"{workload.name} has no per-element work"})
        return
    emit("limit", measure.time_per_element(fn, range(elements), LIMIT_BUDGET_S))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--elements", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--system", choices=sorted(systems.MODULES))
    parser.add_argument("--configs", default="[]", help="JSON list of config dicts")
    parser.add_argument("--limit", action="store_true", help="time the work single-threaded")
    parser.add_argument("--max-seconds", type=float, default=math.inf, help="time cap per run")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's banner goes to the log anyway
    workload = WORKLOADS[args.workload]
    if args.limit:
        run_limit(workload, args.elements, args.data_dir)
        return
    module = systems.load(args.system)
    for config in json.loads(args.configs):
        run_config(workload, module, config, args.elements, args.data_dir, args.max_seconds)


if __name__ == "__main__":
    main()
