"""Changing load: AUTOTUNE against the best fixed setting, phase by phase, in one invocation.

    python -m benchmarks.changing_load              # every scenario, AUTOTUNE 3 times (worst kept)
    python -m benchmarks.changing_load --quick      # phases 0.6x as long, AUTOTUNE once
    python -m benchmarks.changing_load --scenarios io_turn,hiccups --runs 5

Each scenario is a pipeline ``range -> map(first) [-> map(second) [-> map(third)]] -> batch(32)
-> prefetch``
consumed by a loop that may sleep per batch (its training step), whose load changes at set
times (phases): the functions read the phase from the wall clock, so worker processes see the
change too. Every configuration runs the whole scenario in its own subprocess: AUTOTUNE, and a
grid of fixed settings (autotune off). Per phase, from the batches' arrival times:

- rate: batches/s from 2 s after the change to the phase's end (the steady part), counting
  only batches made after the change (each element carries when it was made: a deep buffer
  filled with cheap elements before a change, drained after it, is not the new load's rate);
- recovered: how long after the change AUTOTUNE's rate over a 1 s window first reached 80% of
  the best fixed setting's steady rate in that phase;
- stall: the share of the steady part the consumer spent waiting in ``next()``.

The best fixed setting is the best of the grid in each phase (a different one per phase, so
a stricter bar than any one fixed setting). Ratios only: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH = 32
STEADY_AFTER = 2.0  # seconds after a change before a phase's steady part begins
RECOVERED = 0.8  # of the best fixed setting's rate ...
RECOVERY_WINDOW = 1.0  # ... over a window this long
# Pure-Python work: this many loop turns take about a millisecond here, holding the GIL.
PYTHON_TURNS_PER_MS = 9_000


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    io: float = 0.0  # the first map waits this long per element (a remote read)
    python_ms: float = 0.0  # and computes this long in pure Python, holding the GIL
    second_io: float = 0.0  # the second map (two- and three-stage scenarios) waits this long
    second_python_ms: float = 0.0  # and computes this long in pure Python
    third_numpy: int = 0  # the third map sorts this many floats (numpy, the GIL released)
    hiccup_every: int = 0  # the first map's read stalls on every n-th element ...
    hiccup_seconds: float = 0.0  # ... this long
    step: float = 0.0  # the consumer's own time per batch


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    phases: tuple[Phase, ...]
    stages: int = 1  # maps in a row
    # Fixed settings tried: (parallelism of each map, executor, prefetch buffer in batches).
    grid: tuple[tuple[int, str, int], ...] = (
        (1, "thread", 2),
        (4, "thread", 2),
        (16, "thread", 2),
        (64, "thread", 2),
    )

    def scaled(self, factor: float) -> Scenario:
        phases = tuple(replace(p, seconds=p.seconds * factor) for p in self.phases)
        return replace(self, phases=phases)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "io_turn",
            "a cheap map that starts waiting 2 ms per element (a remote read)",
            (Phase("cheap", 5.0), Phase("waits 2 ms", 7.0, io=0.002)),
        ),
        Scenario(
            "turns_cheap",
            "a map waiting 2 ms per element that turns cheap",
            (Phase("waits 2 ms", 6.0, io=0.002), Phase("cheap", 6.0)),
        ),
        Scenario(
            "consumer_slows",
            "a consumer whose step slows to 20 ms a batch, then speeds up",
            (
                Phase("fast consumer", 5.0, io=0.0005),
                Phase("20 ms step", 6.0, io=0.0005, step=0.020),
                Phase("fast again", 6.0, io=0.0005),
            ),
        ),
        Scenario(
            "gil_bound",
            "a pure-Python map holding the GIL, 1 ms an element, for 10 s",
            (Phase("python 1 ms", 10.0, python_ms=1.0),),
            grid=((1, "thread", 2), (2, "thread", 2), (2, "process", 2), (4, "thread", 2)),
        ),
        Scenario(
            "hiccups",
            "a read that stalls 60 ms every 500 elements, before a steady 10 ms step",
            (
                Phase(
                    "hiccups", 12.0, io=0.0002, hiccup_every=500, hiccup_seconds=0.060, step=0.010
                ),
            ),
            grid=((4, "thread", 2), (4, "thread", 16), (16, "thread", 2), (16, "thread", 16)),
        ),
        Scenario(
            "alternating",
            "two maps whose bottleneck alternates: the first waits 2 ms, then the second",
            (
                Phase("first waits", 6.0, io=0.002),
                Phase("second waits", 6.0, second_io=0.002),
                Phase("first again", 6.0, io=0.002),
            ),
            stages=2,
        ),
        Scenario(
            "three_stages",
            "three maps: a 1 ms wait, then 0.3 ms of Python, then numpy releasing the GIL",
            (Phase("steady", 10.0, io=0.001, second_python_ms=0.3, third_numpy=20_000),),
            stages=3,
            grid=((2, "thread", 2), (4, "thread", 2), (16, "thread", 2), (2, "process", 2)),
        ),
    )
}


# -- the child: one configuration through one scenario ----------------------------------------


def phase_at(phases: Sequence[Phase], elapsed: float) -> Phase:
    for p in phases:
        if elapsed < p.seconds:
            return p
        elapsed -= p.seconds
    return phases[-1]


def make_functions(phases: tuple[Phase, ...], t0: float) -> list[Callable[[Any], Any]]:
    """The maps' functions, first to third; they read the phase from the wall clock (``t0``:
    its start), which worker processes share."""
    angles = np.arange(256.0)

    def first(i: Any) -> Any:
        p = phase_at(phases, time.time() - t0)
        if p.io:
            time.sleep(p.io)
        if p.hiccup_every and int(i) % p.hiccup_every == 0:
            time.sleep(p.hiccup_seconds)
        python(p.python_ms)
        features = np.sin(angles * (int(i) % 13))[:8]
        # The last value says when the element was made: a batch made before a change of
        # load (and buffered) does not count for the phase after it.
        return np.append(features, time.time() - t0)

    def second(x: Any) -> Any:
        p = phase_at(phases, time.time() - t0)
        if p.second_io:
            time.sleep(p.second_io)
        python(p.second_python_ms)
        return np.append(x[:-1] * 2, x[-1])

    def third(x: Any) -> Any:
        p = phase_at(phases, time.time() - t0)
        if p.third_numpy:
            noise = np.random.default_rng(int(x[0] * 1000) % 97).random(p.third_numpy)
            return np.append(x[:-1] + np.sort(noise)[0], x[-1])
        return x

    return [first, second, third]


def python(ms: float) -> None:
    """About ``ms`` milliseconds of pure Python, holding the GIL."""
    total = 0
    for k in range(int(ms * PYTHON_TURNS_PER_MS)):
        total += k % 7


def run_child(scenario: Scenario, setting: tuple[int, str, int] | None) -> dict[str, Any]:
    """Run ``scenario`` under ``setting`` (None: AUTOTUNE): each batch's arrival time and the
    consumer's wait for it, and AUTOTUNE's history."""
    import feedline as fl

    t0 = time.time()
    functions = make_functions(scenario.phases, t0)
    if setting is None:
        calls: int = fl.AUTOTUNE
        executor = "auto"
        buffer: int = fl.AUTOTUNE
    else:
        calls, executor, buffer = setting
    ds = fl.Dataset.range(10**9)
    for fn in functions[: scenario.stages]:
        ds = ds.map(fn, num_parallel_calls=calls, executor=executor)
    ds = ds.batch(BATCH).prefetch(buffer)
    if setting is not None:
        options = fl.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)
    total = sum(p.seconds for p in scenario.phases)
    arrivals: list[float] = []
    made: list[float] = []  # when the batch's first element was made
    waits: list[float] = []
    with ds.iterator() as it:
        while (now := time.time() - t0) < total:
            p = phase_at(scenario.phases, now)
            asked = time.perf_counter()
            batch = next(it)
            got = time.perf_counter()
            arrivals.append(time.time() - t0)
            made.append(float(batch[:, -1].min()))
            waits.append(got - asked)
            if p.step:
                time.sleep(p.step)
        stats = it.stats()
    return {
        "arrivals": arrivals,
        "made": made,
        "waits": waits,
        "history": stats["autotune"]["history"] if setting is None else [],
        "threads": stats["threads"],  # the pass's budget and the most alive at once
    }


# -- the parent: every configuration, then the table -----------------------------------------


@dataclass
class PhaseFigures:
    rate: float
    stall: float
    recovered: float | None = None


@dataclass
class Outcome:
    scenario: str
    phase: str
    autotune: PhaseFigures
    best_fixed: PhaseFigures
    best_setting: str
    settings: dict[str, float] = field(default_factory=dict)
    # Worker threads alive at once and the pass's budget, in the AUTOTUNE run of the scenario
    # that came closest to its budget.
    threads_peak: int = 0
    thread_budget: int = 0

    @property
    def ratio(self) -> float:
        return self.autotune.rate / max(self.best_fixed.rate, 1e-9)


def phase_bounds(phases: Sequence[Phase]) -> list[tuple[float, float]]:
    bounds, start = [], 0.0
    for p in phases:
        bounds.append((start, start + p.seconds))
        start += p.seconds
    return bounds


def steady(run: dict[str, Any], begin: float, end: float) -> PhaseFigures:
    """Rate and stall over [begin + STEADY_AFTER, end], counting the batches made in the
    phase (a deep buffer filled before the change, then drained, would flatter a setting)."""
    start = begin + min(STEADY_AFTER, (end - begin) / 2)
    times = np.asarray(run["arrivals"])
    waits = np.asarray(run["waits"])
    inside = (times >= start) & (times < end)
    span = max(end - start, 1e-9)
    stall = min(1.0, float(waits[inside].sum()) / span)
    inside &= np.asarray(run["made"]) >= begin
    # (A wait is booked when its batch arrives: the first may have begun before the window.)
    return PhaseFigures(float(inside.sum()) / span, stall)


def recovery(run: dict[str, Any], begin: float, end: float, target: float) -> float | None:
    """Seconds after ``begin`` when the rate over RECOVERY_WINDOW first reached ``target``."""
    times = np.asarray(run["arrivals"])
    made_in_phase = np.asarray(run["made"]) >= begin
    t = begin
    while t + RECOVERY_WINDOW <= end + 1e-9:
        count = ((times >= t) & (times < t + RECOVERY_WINDOW) & made_in_phase).sum()
        if count / RECOVERY_WINDOW >= target:
            return t - begin
        t += 0.25
    return None


def setting_name(setting: tuple[int, str, int]) -> str:
    calls, executor, buffer = setting
    return f"{calls} {executor}{'s' if calls > 1 else ''}, prefetch {buffer}"


def spawn(scenario: Scenario, setting: tuple[int, str, int] | None) -> dict[str, Any]:
    arg = json.dumps({"scenario": asdict(scenario), "setting": setting})
    total = sum(p.seconds for p in scenario.phases)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.changing_load", "--child", arg],
        capture_output=True,
        text=True,
        timeout=total * 3 + 60,
        cwd=HERE.parent,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{scenario.name} {setting}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def compare(scenario: Scenario, runs: int, say: Callable[[str], None]) -> list[Outcome]:
    fixed = {}
    for setting in scenario.grid:
        fixed[setting_name(setting)] = spawn(scenario, setting)
        say(f"  {scenario.name}: fixed {setting_name(setting)} done")
    tuned = []
    for k in range(runs):
        tuned.append(spawn(scenario, None))
        say(f"  {scenario.name}: AUTOTUNE run {k + 1} done")
    # The run that came closest to its own budget (the budget is measured in each run).
    closest = max(tuned, key=lambda r: r["threads"]["peak"] - r["threads"]["budget"])
    threads_peak, thread_budget = closest["threads"]["peak"], closest["threads"]["budget"]
    outcomes = []
    for p, (begin, end) in zip(scenario.phases, phase_bounds(scenario.phases)):
        by_setting = {name: steady(r, begin, end) for name, r in fixed.items()}
        best_name = max(by_setting, key=lambda n: by_setting[n].rate)
        best = by_setting[best_name]
        worst: PhaseFigures | None = None
        for r in tuned:
            figures = steady(r, begin, end)
            figures.recovered = recovery(r, begin, end, RECOVERED * best.rate)
            # The worst run: the lowest rate, or a run that never recovered.
            if worst is None or (figures.recovered is None, -figures.rate) > (
                worst.recovered is None,
                -worst.rate,
            ):
                worst = figures
        assert worst is not None
        outcomes.append(
            Outcome(
                scenario.name,
                p.name,
                worst,
                best,
                best_name,
                {n: f.rate for n, f in by_setting.items()},
                threads_peak,
                thread_budget,
            )
        )
    return outcomes


def table(outcomes: list[Outcome], runs: int) -> str:
    lines = [
        f"AUTOTUNE (worst of {runs} runs) / the best fixed setting in each phase, batches of "
        f"{BATCH}; rate and stall from {STEADY_AFTER:.0f} s after each change; recovered: "
        f"first {RECOVERY_WINDOW:.0f} s at {RECOVERED:.0%} of the best fixed rate; threads: "
        "the most worker threads alive at once / the pass's budget, in the AUTOTUNE run closest "
        "to its budget.",
        "",
        "| scenario | phase | AUTOTUNE batches/s | best fixed | ratio | recovered in | "
        "stall AUTOTUNE | stall best fixed | threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        recovered = "never" if o.autotune.recovered is None else f"{o.autotune.recovered:.2f} s"
        lines.append(
            f"| {o.scenario} | {o.phase} | {o.autotune.rate:.1f} | {o.best_fixed.rate:.1f} "
            f"({o.best_setting}) | {o.ratio:.2f} | {recovered} | {o.autotune.stall:.1%} | "
            f"{o.best_fixed.stall:.1%} | {o.threads_peak} / {o.thread_budget} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="phases 0.6x as long, one run")
    parser.add_argument("--runs", type=int, help="AUTOTUNE runs per scenario (worst kept)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS / "changing_load")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        raw = spec["scenario"]
        scenario = Scenario(
            raw["name"],
            raw["what"],
            tuple(Phase(**p) for p in raw["phases"]),
            raw["stages"],
            tuple(tuple(g) for g in raw["grid"]),  # type: ignore[misc]
        )
        setting = tuple(spec["setting"]) if spec["setting"] is not None else None
        print(json.dumps(run_child(scenario, setting)))  # type: ignore[arg-type]
        return
    runs = args.runs or (1 if args.quick else 3)
    outcomes: list[Outcome] = []
    for name in args.scenarios.split(","):
        scenario = SCENARIOS[name]
        if args.quick:
            scenario = scenario.scaled(0.6)
        outcomes += compare(scenario, runs, lambda line: print(line, file=sys.stderr, flush=True))
    text = table(outcomes, runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps([asdict(o) | {"ratio": o.ratio} for o in outcomes], indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
