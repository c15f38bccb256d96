"""``it.stats()`` and ``it.report()``: per-stage numbers, the bottleneck and what would help."""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

# (``_size`` serves the live view too.)
from feedline.autotune.budget import format_bytes as _size

# The report names a bottleneck by the same signs the tuner acts on.
from feedline.autotune.constants import INPUT_BOUND
from feedline.autotune.policy import GIL_CORES, mostly_waits
from feedline.autotune.windows import Reading, StageWindow
from feedline.runtime.tunable import PROCESSES

if TYPE_CHECKING:
    from feedline.observe.view import PassView

# Below this stall fraction the consumer is served: a stage waited on less is not blamed.
SERVED = 0.01
# A consumer that waits less than this share of the time is its own bottleneck: even an
# infinitely fast pipeline would raise its rate by less than that. (A consumer that sleeps
# between batches already waits ~1% on a plain Python loop: waking up costs 50-150 us.)
CONSUMER_BOUND = 0.05


def collect_stats(it: PassView) -> dict[str, Any]:
    elapsed = max(time.perf_counter() - it.started, 1e-9)
    by_key: dict[object, dict[str, Any]] = {}
    snapshots: dict[object, list[dict[str, float]]] = {}
    for stage in it.all_stages():
        m = stage.metrics.snapshot()
        with stage.metrics.lock:
            recent = list(stage.metrics.recent)
        snapshots.setdefault(stage.key, []).append(m)
        entry = by_key.setdefault(
            stage.key,
            # (Counters filled in below, from all the op's stages; the keys in this order.)
            {
                "name": stage.name,
                "elements": 0,
                "work_wall_s": 0.0,
                "work_cpu_s": 0.0,
                "consumer_wait_s": 0.0,
                "input_wall_s": 0.0,
                "errors": 0,
                "samples": [],
                "own_work": stage.has_own_work,
            },
        )
        # The latest stage made for an op (under repeat) has its current knobs and buffers.
        entry["knobs"] = {name: knob.value for name, knob in stage.knobs.items()}
        entry["solo_cpu_share"] = stage.solo_cpu_share
        entry["tuned"] = sorted(name for name, knob in stage.knobs.items() if knob.tunable)
        entry["refused"] = {
            name: knob.refusal for name, knob in stage.knobs.items() if knob.refusal is not None
        }
        entry["workers"] = stage.workers_detail()
        entry["buffered_elements"] = int(m["buffered_elements"])
        entry["buffered_bytes"] = int(m["buffered_bytes"])
        entry["bytes_per_element"] = m["bytes_per_element"]
        entry["errors"] += int(m["errors"])
        entry["samples"] += recent
    stages = []
    for key, entry in by_key.items():
        samples = entry.pop("samples")
        total = Reading.total(snapshots[key])
        # The whole pass so far, as one window.
        window: StageWindow[str] = StageWindow.between(entry["name"], Reading(), total, elapsed)
        entry["elements"] = int(total.elements)
        entry["work_wall_s"] = total.work_wall
        entry["work_cpu_s"] = total.work_cpu
        entry["consumer_wait_s"] = total.consumer_wait
        entry["input_wall_s"] = total.input_wall
        entry["mean_ms"] = window.mean_ms
        entry["p90_ms"] = 1000 * float(np.percentile(samples, 90)) if samples else 0.0
        entry["cpu_share"] = window.cpu_share
        entry["consumer_wait_fraction"] = window.consumer_wait
        stages.append(entry)
    counters = it.consumer
    consumer = {
        "elements": counters.delivered,
        "elapsed_s": elapsed,
        "wait_s": counters.wait,
        "stall_fraction": min(1.0, counters.wait / elapsed),
        "elements_per_s": counters.delivered / elapsed,
    }
    workers = it.worker_memory()
    tuner = it.tuner
    history = [asdict(d) for d in tuner.history] if tuner is not None else []
    stats = {
        "stages": stages,
        "consumer": consumer,
        "autotune": {
            "enabled": tuner is not None,
            "cpu_budget": tuner.budget.cpu if tuner else None,
            "ram_budget_bytes": tuner.budget.ram if tuner else None,
            "tuner_cpu_s": tuner.cpu_seconds if tuner else 0.0,
            "gil_free": tuner.gil_free() if tuner else False,
            "history": history,
        },
        "threads": {"budget": it.threads.limit, "peak": it.threads.peak},
        # Budgets the pipeline cannot keep (each said once, also on the "feedline" logger).
        "warnings": list(tuner.warnings) if tuner is not None else [],
        "buffered_bytes": it.buffered_bytes(),
        # Worker processes' memory is outside the buffers: the RAM budget counts both.
        "worker_processes": [asdict(w) for w in workers],
        "worker_rss_bytes": sum(w.rss_bytes for w in workers),
        "notes": it.notes(),
    }
    stats["bottleneck"] = find_bottleneck(stats)
    return stats


def input_bound(stage: dict[str, Any]) -> bool:
    """The stage spent more time taking elements from its input than on its own work."""
    return stage["input_wall_s"] > INPUT_BOUND * stage["work_wall_s"]


def find_bottleneck(stats: dict[str, Any]) -> dict[str, str]:
    """Name the limiting stage, say why, and suggest what would help."""
    consumer = stats["consumer"]
    stages = stats["stages"]
    if consumer["elements"] == 0:
        return {"stage": "-", "why": "nothing consumed yet", "advice": ""}
    if consumer["stall_fraction"] < CONSUMER_BOUND:
        step = (consumer["elapsed_s"] - consumer["wait_s"]) / consumer["elements"]
        capacity = _pipeline_seconds_per_element(stages, consumer)
        faster = f"{step / capacity:.1f}x" if capacity > 0 else "much"
        return {
            "stage": "consumer",
            "why": f"the consumer waits only {consumer['stall_fraction']:.1%} of the time",
            "advice": f"consumer-bound: the pipeline is {faster} faster than your training "
            "step; buffers and workers are kept small",
        }
    if not stages:
        return {
            "stage": "pipeline",
            "why": f"the consumer waits {consumer['stall_fraction']:.0%} of the time on "
            "stages that run inline",
            "advice": "use num_parallel_calls=AUTOTUNE on map and end with prefetch(AUTOTUNE)",
        }
    # A stage with no work of its own (prefetch) only passes on its input's slowness: blame
    # the stage doing work that is waited on, when there is one.
    waited = [s for s in stages if s["consumer_wait_fraction"] > SERVED]
    working = [s for s in waited if s["own_work"]]
    candidates = sorted(
        working or waited or stages, key=lambda s: s["consumer_wait_fraction"], reverse=True
    )
    # A stage whose time went to taking elements from its input is waiting on it: blame the
    # next stage with work of its own, if one is waited on, else the source itself.
    while len(candidates) > 1 and input_bound(candidates[0]):
        candidates.pop(0)
    worst = candidates[0]
    cpu = worst["cpu_share"]
    # Threads waiting for the GIL show little CPU each, yet together keep a core busy: only
    # work that uses little CPU in total is waiting (on I/O, latency).
    cores = worst["work_cpu_s"] / consumer["elapsed_s"]
    parallelism = worst["knobs"].get("parallelism", 0)
    why = (
        f"its consumer waits on it {worst['consumer_wait_fraction']:.0%} of the time; "
        f"{worst['mean_ms']:.3g} ms per element"
    )
    if input_bound(worst):
        # Its time went to taking elements from its input: more workers only queue there.
        advice = (
            f"the input of {worst['name']} sets the pace (taking elements from it took "
            f"{worst['input_wall_s']:.3g} s, the work {worst['work_wall_s']:.3g} s): make the "
            "source faster, read its files in parallel with interleave(num_parallel_calls="
            "AUTOTUNE), or cache() it if it fits in memory"
        )
    elif cpu is not None and mostly_waits(
        cpu, cores, worst.get("solo_cpu_share"), stats.get("autotune", {}).get("gil_free", False)
    ):
        advice = (
            f"{worst['name']} waits (CPU {cpu:.0%} of its time): {parallelism} calls in "
            "flight; raise Options.autotune.max_parallelism, max_threads or ram_budget to "
            "allow more"
        )
    elif worst["knobs"].get("executor") == PROCESSES:
        advice = (
            f"{worst['name']} keeps {parallelism} worker processes busy: add cores or make it "
            "cheaper"
        )
    elif cpu is not None and worst["mean_ms"] > 0.05 and (parallelism <= 1 or cores < GIL_CORES):
        # Computing threads that together get about one core: one runs Python at a time.
        refused = worst.get("refused", {}).get("executor")
        remedy = (
            f"it {refused}; make the function picklable, or vectorise it with numpy"
            if refused
            else "use executor='process' or vectorise it with numpy"
        )
        advice = (
            f"{worst['name']} computes in Python (CPU {cpu:.0%}, {cores:.1f} cores across "
            f"{parallelism} threads): it holds the GIL; {remedy}"
        )
    else:
        advice = (
            f"{worst['name']} is CPU-bound at {parallelism} workers: add cores or make it cheaper"
        )
    return {"stage": worst["name"], "why": why, "advice": advice}


def _pipeline_seconds_per_element(stages: list[dict[str, Any]], consumer: dict[str, Any]) -> float:
    """Time the slowest stage needs per delivered element, given its workers."""
    worst = 0.0
    for s in stages:
        workers = max(1, s["knobs"].get("parallelism", 1))
        per_element = s["work_wall_s"] / max(s["elements"], 1) / workers
        worst = max(worst, per_element)
    if worst == 0.0:
        return consumer["wait_s"] / max(consumer["elements"], 1)
    return worst


def _worker_line(worker: dict[str, Any]) -> str:
    """One of a stage's workers_detail() rows: its fields as name=value."""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in worker.items()
    )


# An interleave's open datasets are a stage each ("tfrecord[17]"): past this many in a row,
# the report shows the first and the last and says how many it left out.
READERS_SHOWN = 3
_READER = re.compile(r"^(.*)\[\d+\]$")


def _hidden_reader(rows: list[tuple[dict[str, Any], str]], i: int) -> str | None:
    """None when row ``i`` is shown; else it is left out of a long run of one interleave's
    readers, and the run's first left-out row says so ("" for the others)."""
    match = _READER.match(rows[i][0]["name"])
    if match is None:
        return None
    base = match.group(1)

    def same(j: int) -> bool:
        found = _READER.match(rows[j][0]["name"])
        return found is not None and found.group(1) == base

    start = i
    while start > 0 and same(start - 1):
        start -= 1
    end = i
    while end + 1 < len(rows) and same(end + 1):
        end += 1
    if end - start + 1 <= READERS_SHOWN or i - start < READERS_SHOWN - 1 or i == end:
        return None
    if i > start + READERS_SHOWN - 1:
        return ""
    left_out = rows[start + READERS_SHOWN - 1 : end]
    elements = sum(s["elements"] for s, _ in left_out)
    return f"{len(left_out)} more of {base}[...]'s readers, {elements} elements"


def format_report(stats: dict[str, Any]) -> str:
    consumer = stats["consumer"]
    lines = [
        "feedline pipeline report",
        f"consumer: {consumer['elements']} elements in {consumer['elapsed_s']:.2f} s "
        f"({consumer['elements_per_s']:.1f}/s); waited {consumer['stall_fraction']:.1%} "
        "of the time for data",
        "",
    ]
    knobs_of = [
        ", ".join(f"{k}={v}{'*' if k in s['tuned'] else ''}" for k, v in s["knobs"].items())
        for s in stats["stages"]
    ]
    # As wide as the widest stage's knobs: a cut-off knob reads as another value.
    width = max([len("knobs"), *map(len, knobs_of)])
    lines.append(
        f"{'stage':32} {'knobs':{width}} {'elements':>9} {'ms/el':>7} {'p90':>7} {'cpu':>5} "
        f"{'waited':>7} {'buffered':>10}"
    )
    rows = list(zip(stats["stages"], knobs_of))
    for i, (s, knobs) in enumerate(rows):
        hidden = _hidden_reader(rows, i)
        if hidden is not None:
            if hidden:
                lines.append(f"  ... {hidden}")
            continue
        cpu = "-" if s["cpu_share"] is None else f"{s['cpu_share']:.0%}"
        lines.append(
            f"{s['name'][:32]:32} {knobs:{width}} {s['elements']:>9} {s['mean_ms']:>7.3f} "
            f"{s['p90_ms']:>7.3f} {cpu:>5} {s['consumer_wait_fraction']:>7.1%} "
            f"{_size(s['buffered_bytes']):>10}"
        )
        lines += [f"  {_worker_line(w)}" for w in s.get("workers", [])]
    if not stats["stages"]:
        lines.append("(no asynchronous stage: everything runs inline in the consumer's thread)")
    lines.append("* tuned by AUTOTUNE")
    for w in stats["worker_processes"]:
        lines.append(
            f"worker processes of {w['stage']}: {w['processes']}, resident {_size(w['rss_bytes'])}"
        )
    bottleneck = stats["bottleneck"]
    lines += ["", f"bottleneck: {bottleneck['stage']} — {bottleneck['why']}"]
    if bottleneck["advice"]:
        lines.append(f"advice: {bottleneck['advice']}")
    lines += [f"warning: {warning}" for warning in stats["warnings"]]
    lines += [f"note: {note}" for note in stats["notes"]]
    tune = stats["autotune"]
    threads = stats["threads"]
    if tune["enabled"]:
        lines += [
            "",
            f"AUTOTUNE: cpu budget {tune['cpu_budget']:.1f} cores, ram budget "
            f"{_size(tune['ram_budget_bytes'])}, thread budget {threads['budget']} (at most "
            f"{threads['peak']} alive at once), its own cost {tune['tuner_cpu_s']:.3f} CPU s; "
            f"{len(tune['history'])} decisions",
        ]
        for d in tune["history"][-20:]:
            lines.append(
                f"  {d['time']:7.2f}s  {d['stage']}.{d['knob']}: {d['old']} -> {d['new']}  "
                f"({d['reason']})"
            )
        if len(tune["history"]) > 20:
            lines.append(f"  ... {len(tune['history']) - 20} earlier decisions in stats()")
    return "\n".join(lines)
