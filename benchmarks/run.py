"""Run the benchmark: every (system, workload) pair in its own subprocess, then the report.

    python -m benchmarks.run                 # everything (make bench)
    python -m benchmarks.run --quick         # smaller grids, 2 s runs: < 5 min (make bench-quick)
    python -m benchmarks.run --smoke         # tiny sizes: checks that every pair runs
    python -m benchmarks.run --workloads image,io_latency --systems feedline,torch

Workloads run one after another; within a workload every system runs back to back, so the
systems being compared saw about the same machine conditions, and feedline's AUTOTUNE runs
again after the peers (A-B-A: a shared machine's speed drifts within a workload, by up to 40%
here). Results are written after every pair, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from benchmarks import report, supervise, systems
from benchmarks.measure import describe_machine, usable_cores
from benchmarks.systems import RunSpec
from benchmarks.workloads import WORKLOADS, Workload, prepare_data

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Per configuration (the first one of a subprocess also pays for imports and data loading).
DEFAULT_TIMEOUT_S = {"full": 600.0, "quick": 90.0, "smoke": 120.0}
# A run stops pulling batches after this long (it still gets a dozen batches): the slowest
# systems (a plain loop over 4,000 GETs, Grain's thread pool at 2k elements/s over 2M
# elements) would otherwise take the whole run's time for a figure already well measured.
DEFAULT_MAX_SECONDS = {"full": 30.0, "quick": 2.0, "smoke": 5.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller grids, 2 s per run (< 5 min)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: not a measurement")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated ids")
    parser.add_argument(
        "--systems", default=",".join(systems.MODULES), help="comma-separated system modules"
    )
    parser.add_argument("--timeout", type=float, help="seconds per configuration, then killed")
    parser.add_argument("--max-seconds", type=float, help="stop pulling batches after this")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        help="one subprocess per configuration (default in full mode; memory figures are then "
        "not inflated by an earlier configuration), else one per (system, workload) pair",
    )
    parser.add_argument(
        "--again",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run feedline's AUTOTUNE configuration again after the peers of each workload "
        "(A-B-A: a machine whose speed drifts within a workload then favours no system; "
        "its cell is the better of the two runs)",
    )
    parser.add_argument("--data-dir", type=Path, default=RESULTS / "tmp" / "data")
    parser.add_argument("--out", type=Path, help="output stem: writes STEM.json, .md, .png")
    args = parser.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.isolate is None:
        args.isolate = args.mode == "full"
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT_S[args.mode]
    if args.max_seconds is None:
        args.max_seconds = DEFAULT_MAX_SECONDS[args.mode]
    if args.out is None:
        # Smoke numbers mean nothing: keep them away from the published results.
        args.out = RESULTS / ("tmp/smoke" if args.smoke else "latest")
    for name, known in (("workloads", WORKLOADS), ("systems", systems.MODULES)):
        chosen = [s.strip() for s in getattr(args, name).split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {name}: {', '.join(unknown)} (known: {', '.join(known)})")
        setattr(args, name, chosen)
    return args


def limit_for(
    workload: Workload, elements: int, args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    """The workload's ceiling, when it has one: cores / single-threaded time per element for
    CPU-bound work (measured now, in this run), or the consumer's own speed."""
    if workload.consumer_sleep_s:
        return {"limit_elements_per_s": workload.batch_size / workload.consumer_sleep_s}
    if not workload.cpu_bound:
        return {"limit_elements_per_s": None}
    timed = supervise.measure_limit(
        workload.name, elements, args.data_dir, args.timeout, logs / f"limit-{workload.name}.log"
    )
    if timed is None:
        return {"limit_elements_per_s": None, "limit_note": "single-threaded timing failed"}
    return {
        "limit_elements_per_s": usable_cores() / timed["wall_s_per_element"],
        "single_thread_s_per_element": timed["wall_s_per_element"],
        "single_thread_cpu_s_per_element": timed["cpu_s_per_element"],
    }


def with_best_limit(
    records: list[dict[str, Any]],
    workload: Workload,
    elements: int,
    args: argparse.Namespace,
    logs: Path,
    before: dict[str, Any],
) -> list[dict[str, Any]]:
    """``records`` of one workload against the higher of two single-threaded timings, one
    before its systems ran and one after. On a shared machine one short timing can catch a
    slow moment, which would make every fraction of the limit look better than it is."""
    if not before.get("single_thread_s_per_element"):
        return records
    after = limit_for(workload, elements, args, logs)
    if (after.get("limit_elements_per_s") or 0) <= before["limit_elements_per_s"]:
        return records
    print(
        f"   limit timed again after the systems: {after['limit_elements_per_s']:.4g}/s "
        f"(before: {before['limit_elements_per_s']:.4g}/s); fractions use the higher",
        flush=True,
    )
    rescored = []
    for record in records:
        rate, ceiling = record["elements_per_s"], after["limit_elements_per_s"]
        rescored.append(
            {**record, **after, "limit_fraction": rate / ceiling if rate and ceiling else None}
        )
    return rescored


def make_record(
    spec: RunSpec,
    workload: Workload,
    elements: int,
    result: dict[str, Any],
    limit: dict[str, Any],
    machine: dict[str, Any],
    mode: str,
) -> dict[str, Any]:
    """One latest.json record: identity, the measured figures (None when not measured)."""
    rate = result.get("elements_per_s")
    ceiling = limit.get("limit_elements_per_s")
    stall = result.get("stall_fraction") if workload.consumer_sleep_s else None
    note = result.get("note")
    received = result.get("elements")
    if received is not None and not result.get("time_capped") and received != elements:
        # A pipeline that ends early (or late) did different work: flag it, keep the figures.
        note = f"expected {elements} elements, got {received}"
    record: dict[str, Any] = {
        "system": spec.system,
        "workload": workload.name,
        "config": spec.label,
        "settings": spec.config,
        "status": result.get("status"),
        "error": result.get("error"),
        "elements": result.get("elements"),
        "time_capped": result.get("time_capped"),
        "elements_per_s": rate,
        "steady_state_elements_per_s": rate,
        "end_to_end_elements_per_s": result.get("end_to_end_elements_per_s"),
        "time_to_first_batch_s": result.get("time_to_first_batch_s"),
        "wall_s": result.get("wall_s"),
        "peak_rss_mib": result.get("peak_rss_mib"),
        "baseline_rss_mib": result.get("baseline_rss_mib"),
        "end_pss_mib": result.get("end_pss_mib"),
        "cpu_s": result.get("cpu_s"),
        "stall_fraction": stall,
        **limit,
        "limit_fraction": rate / ceiling if rate and ceiling else None,
        "teardown_s": result.get("teardown_s"),
        "note": note,
        "mode": mode,
        "machine": machine,
    }
    return {k: _finite(v) for k, v in record.items()}


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined figure is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    machine = describe_machine()
    logs = RESULTS / "tmp" / "logs"
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    for name in args.workloads:
        workload = WORKLOADS[name]
        elements = workload.sizes.get(args.mode)
        print(f"== {name}: {elements} elements ({args.mode})", flush=True)
        prepare_data(workload, args.data_dir)
        limit = limit_for(workload, elements, args, logs)
        first_record = len(records)
        for system in args.systems:
            module = systems.load(system)
            specs: list[RunSpec] = module.specs(workload, args.mode)
            reason = systems.missing(system)
            if reason is not None:
                result = {"status": "skipped", "error": reason}
                records += [
                    make_record(s, workload, elements, result, limit, machine, args.mode)
                    for s in specs
                ]
                print(f"   {system}: skipped ({reason})", flush=True)
                continue
            groups = [[s] for s in specs] if args.isolate else [specs]
            for group in groups:
                records += run_group(system, workload, group, elements, limit, machine, args)
            write_json(records, output(args, ".json"))
        if args.again and "feedline" in args.systems and systems.missing("feedline") is None:
            headline = systems.load("feedline").specs(workload, args.mode)[0]
            again = RunSpec(headline.system, headline.module, {**headline.config, "run": "again"})
            records += run_group("feedline", workload, [again], elements, limit, machine, args)
        records[first_record:] = with_best_limit(
            records[first_record:], workload, elements, args, logs, limit
        )
        write_json(records, output(args, ".json"))
    print(f"== done in {time.monotonic() - started:.0f} s", flush=True)
    return records


def run_group(
    system: str,
    workload: Workload,
    group: list[RunSpec],
    elements: int,
    limit: dict[str, Any],
    machine: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Run ``group`` (configurations of one system) in one subprocess; their records."""
    log = RESULTS / "tmp" / "logs" / f"{workload.name}-{system}-{group[0].label}.log"
    results = supervise.run_configs(
        system,
        workload.name,
        group,
        elements,
        args.data_dir,
        args.timeout,
        args.max_seconds,
        log,
    )
    records = []
    for spec, result in zip(group, results, strict=True):
        record = make_record(spec, workload, elements, result, limit, machine, args.mode)
        records.append(record)
        print(f"   {report.one_line(record)}", flush=True)
    return records


def output(args: argparse.Namespace, suffix: str) -> Path:
    return args.out.parent / (args.out.name + suffix)


def write_json(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    records = run(args)
    write_json(records, output(args, ".json"))
    report.write(records, output(args, ".md"), output(args, ".png"))
    print(f"wrote {args.out}.json, .md, .png")


if __name__ == "__main__":
    main()
