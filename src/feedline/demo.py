"""``feedline demo``: run the classic "does AUTOTUNE change my batch size?" cases, live.

Each case is a function that builds a pipeline, consumes it, and returns a ``CaseResult`` saying
what it checked and whether each check held. Printing lives apart, in ``run_demo``, which hears
about batches as they arrive through an ``Observer`` callback; a richer live view can replace
the printer without touching the checks, and new cases only need a ``Case`` entry in ``CASES``.

Then ``changing_load`` runs one pipeline whose load changes while it runs (a fast consumer, a map
waiting on I/O, a slow training step, fast again), watched by a live view, and ``run_demo``
prints what AUTOTUNE did in each phase, the pipeline's report, and writes a plot of the run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import feedline as fl
from feedline.observe import recovery
from feedline.observe.live import View, open_view
from feedline.observe.plot import PlotUnavailable, plot_timeline
from feedline.observe.stats import format_report
from feedline.observe.timeline import Timeline, record, take_sample

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """One batch as the consuming loop saw it."""

    index: int  # 0-based position in the stream
    shape: Shape
    values: tuple[Any, ...]  # flattened, as Python scalars
    elapsed: float  # seconds from the start of the loop to this batch's arrival


Observer = Callable[[Batch], None]


@dataclass(frozen=True)
class Check:
    """One claim a case tests, whether it held, and what was actually seen."""

    claim: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class CaseResult:
    checks: tuple[Check, ...]
    batches: int
    shapes: dict[Shape, int]  # shape -> number of batches with it, in first-seen order
    seconds: float  # wall time of the consuming loop, including its simulated work
    waited: float  # part of ``seconds`` spent in next(), i.e. waiting for the pipeline

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


@dataclass(frozen=True)
class Case:
    """A demo case: what it asks, the code it runs, and the function that runs and checks it."""

    question: str
    code: str  # shown to the user before running; mirrors what ``run`` builds
    takeaway: str  # why the result is what it is
    run: Callable[[Observer | None], CaseResult]
    show_every: int  # live view: show one batch in this many


def preview(values: Sequence[Any], edge: int = 3) -> str:
    """``[1 2]``, or ``[0 1 2 ... 61 62 63]`` when there are more than ``2 * edge`` values."""
    shown = [str(v) for v in values]
    if len(shown) > 2 * edge:
        shown = [*shown[:edge], "...", *shown[-edge:]]
    return "[" + " ".join(shown) + "]"


def format_shapes(shapes: dict[Shape, int]) -> str:
    return ", ".join(f"{shape} x {count}" for shape, count in shapes.items()) or "none"


@dataclass(frozen=True)
class _Run:
    batches: list[Batch]
    seconds: float
    waited: float


def _consume(
    ds: fl.Dataset, observer: Observer | None, steps: int | None = None, step_seconds: float = 0.0
) -> _Run:
    """Iterate ``ds`` like a training loop: up to ``steps`` batches, "working" ``step_seconds``
    on each, and tell ``observer`` about each batch as soon as it arrives."""
    batches: list[Batch] = []
    waited = 0.0
    start = time.perf_counter()
    # The context manager closes the pass, stopping any prefetch threads, even on early exit
    # from an infinite dataset.
    with ds.iterator() as it:
        while steps is None or len(batches) < steps:
            asked = time.perf_counter()
            try:
                element = next(it)
            except StopIteration:
                break
            arrived = time.perf_counter()
            waited += arrived - asked
            array = np.asarray(element)
            batch = Batch(len(batches), array.shape, tuple(array.ravel().tolist()), arrived - start)
            batches.append(batch)
            if observer is not None:
                observer(batch)
            time.sleep(step_seconds)
    return _Run(batches, time.perf_counter() - start, waited)


def _result(run: _Run, checks: list[Check]) -> CaseResult:
    return CaseResult(
        checks=tuple(checks),
        batches=len(run.batches),
        shapes=dict(Counter(b.shape for b in run.batches)),
        seconds=run.seconds,
        waited=run.waited,
    )


def _every_shape_is(run: _Run, shape: Shape) -> Check:
    matching = sum(b.shape == shape for b in run.batches)
    return Check(
        f"every batch has shape {shape}",
        bool(run.batches) and matching == len(run.batches),
        f"{matching} of {len(run.batches)} batches had shape {shape}",
    )


# -- case 1 ---------------------------------------------------------------------------------


def batch_then_prefetch(observer: Observer | None = None) -> CaseResult:
    """``from_tensor_slices([1..8]).batch(2).prefetch(AUTOTUNE)``: 4 batches of 2, in order."""
    ds = fl.Dataset.from_tensor_slices([1, 2, 3, 4, 5, 6, 7, 8]).batch(2).prefetch(fl.AUTOTUNE)
    run = _consume(ds, observer)
    seen = [list(b.values) for b in run.batches]
    expected = [[1, 2], [3, 4], [5, 6], [7, 8]]
    return _result(
        run,
        [
            _every_shape_is(run, (2,)),
            Check(
                "all 8 elements arrive exactly once, in order",
                seen == expected,
                f"saw {seen}",
            ),
        ],
    )


# -- case 2 ---------------------------------------------------------------------------------

_SLOW_EPOCH = 1000
_SLOW_BATCH = 64
_SLOW_STEPS = 100
_SLOW_STEP_SECONDS = 0.010


def slow_consumer(observer: Observer | None = None) -> CaseResult:
    """``range(1000).repeat().batch(64).prefetch(AUTOTUNE)`` read by a loop that takes 10 ms a
    step, long enough for the autotuner to act: still 100 batches of shape (64,)."""
    ds = fl.Dataset.range(_SLOW_EPOCH).repeat().batch(_SLOW_BATCH).prefetch(fl.AUTOTUNE)
    run = _consume(ds, observer, steps=_SLOW_STEPS, step_seconds=_SLOW_STEP_SECONDS)
    stream = [v for b in run.batches for v in b.values]
    in_order = stream == [i % _SLOW_EPOCH for i in range(len(stream))]
    # The first batch to cross the end of a pass shows that repeat() joins passes end to end.
    boundary = _SLOW_EPOCH // _SLOW_BATCH
    if boundary < len(run.batches):
        crossing = (
            f"; batch {boundary + 1} spans the end of a pass: "
            f"{preview(run.batches[boundary].values)}"
        )
    else:
        crossing = ""
    return _result(
        run,
        [
            Check(
                f"{_SLOW_STEPS} batches consumed",
                len(run.batches) == _SLOW_STEPS,
                f"consumed {len(run.batches)}",
            ),
            _every_shape_is(run, (_SLOW_BATCH,)),
            Check(
                f"elements arrive in order, wrapping from {_SLOW_EPOCH - 1} back to 0",
                in_order,
                f"{len(stream)} elements checked{crossing}",
            ),
        ],
    )


# -- case 3 ---------------------------------------------------------------------------------


def variable_after_build(observer: Observer | None = None) -> CaseResult:
    """``range(100).batch(10)``, then ``new_batch_size = 5``: ds still gives batches of 10;
    only a newly built dataset uses 5."""
    ds = fl.Dataset.range(100).batch(10)
    new_batch_size = 5  # set after ds was built, as in a notebook cell run later
    run = _consume(ds, observer)
    rebuilt = _consume(fl.Dataset.range(100).batch(new_batch_size), None)
    rebuilt_shapes = dict(Counter(b.shape for b in rebuilt.batches))
    return _result(
        run,
        [
            _every_shape_is(run, (10,)),
            Check(
                "a dataset built again with new_batch_size gives batches of 5",
                rebuilt_shapes == {(new_batch_size,): 100 // new_batch_size},
                f"Dataset.range(100).batch(new_batch_size) gave {format_shapes(rebuilt_shapes)}",
            ),
        ],
    )


CASES: tuple[Case, ...] = (
    Case(
        question="Does prefetch(AUTOTUNE) change the size of batch(2)?",
        code=(
            "ds = fl.Dataset.from_tensor_slices([1, 2, 3, 4, 5, 6, 7, 8])"
            ".batch(2).prefetch(fl.AUTOTUNE)\n"
            "for batch in ds: ..."
        ),
        takeaway=(
            "prefetch(AUTOTUNE) only decides how many finished batches to keep ready ahead of\n"
            "your loop. What a batch contains is fixed by batch(2)."
        ),
        run=batch_then_prefetch,
        show_every=1,
    ),
    Case(
        question="Does the autotuner change the batch shape while a slow training loop runs?",
        code=(
            "ds = fl.Dataset.range(1000).repeat().batch(64).prefetch(fl.AUTOTUNE)\n"
            "for step, batch in zip(range(100), ds):\n"
            "    time.sleep(0.010)  # stands in for a 10 ms training step"
        ),
        takeaway=(
            "While your step runs, prefetch fills its buffer and AUTOTUNE may resize that\n"
            "buffer, but each entry is one whole batch(64) output, so the shape never changes.\n"
            "repeat() before batch() joins passes end to end: no short batch at a pass boundary."
        ),
        run=slow_consumer,
        show_every=10,
    ),
    Case(
        question="Does changing a Python variable after building the pipeline change it?",
        code=(
            "ds = fl.Dataset.range(100).batch(10)\n"
            "new_batch_size = 5  # set after ds was built\n"
            "for batch in ds: ..."
        ),
        takeaway=(
            "A Dataset is an immutable description of a pipeline: batch(10) recorded the value\n"
            "10 when it was called, and nothing assigned afterwards can reach it (nor is there a\n"
            "global batch size for AUTOTUNE to change). To use another batch size, build a new\n"
            "Dataset: fl.Dataset.range(100).batch(new_batch_size)."
        ),
        run=variable_after_build,
        show_every=1,
    ),
)


# -- live: a pipeline whose load changes while it runs --------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    step_seconds: float  # the training step: the consumer's own time per batch
    io_seconds: float  # latency the map waits per element, as for a remote read


PHASES: tuple[Phase, ...] = (
    Phase("fast consumer", 5.0, 0.0, 0.0),
    Phase("map waits on I/O, 2 ms per element", 6.0, 0.0, 0.002),
    Phase("slow training step, 40 ms per batch", 6.0, 0.040, 0.0),
    Phase("fast consumer again", 5.0, 0.0, 0.0),
)
LIVE_BATCH = 32
LIVE_FEATURES = 8
SHAPES = ((LIVE_BATCH,), (LIVE_BATCH, LIVE_FEATURES))  # of a batch's ids and features
LIVE_CODE = """\
ds = (
    fl.Dataset.range(10**9)
    .map(decode, num_parallel_calls=fl.AUTOTUNE, name="decode")
    .batch(32)
    .prefetch(fl.AUTOTUNE)
)"""
LIVE_TITLE = "feedline demo: range -> map(decode) -> batch(32) -> prefetch, under a changing load"
# What AUTOTUNE may change: how the pipeline runs, never what it yields.
# How the pipeline runs, never what it yields: workers, buffers, threads or processes.
TUNED_KNOBS = frozenset({"parallelism", "buffer_size", "executor"})


def scaled(phases: Sequence[Phase], factor: float) -> tuple[Phase, ...]:
    """The same phases, each lasting ``factor`` times as long (``--fast`` runs a short demo)."""
    return tuple(replace(p, seconds=p.seconds * factor) for p in phases)


class _Latency:
    """The map's current I/O latency, set by the loop as phases change. An object, since
    ``map`` snapshots the function's variables at build time, not the objects they hold."""

    seconds = 0.0


def _decoder(latency: _Latency) -> Callable[[Any], tuple[Any, np.ndarray]]:
    angles = np.arange(3000.0)

    def decode(i: Any) -> tuple[Any, np.ndarray]:
        if latency.seconds:
            time.sleep(latency.seconds)
        # A little numpy work per element, standing in for decoding a record.
        features = np.sort(np.sin(angles * (int(i) % 97 + 1)))[:LIVE_FEATURES].astype(np.float32)
        return i, features

    return decode


@dataclass(frozen=True)
class LiveResult:
    checks: tuple[Check, ...]
    batches: int
    stats: dict[str, Any]  # it.stats() at the end of the run
    timeline: Timeline
    marks: tuple[tuple[float, str], ...]  # (pipeline time, phase name) where each phase began

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


Watch = Callable[[Timeline, float], View]


def changing_load(phases: Sequence[Phase] = PHASES, watch: Watch | None = None) -> LiveResult:
    """Run ``LIVE_CODE`` through ``phases``; ``watch(timeline, total_seconds)`` gives the view
    told about the loop's progress. Checks every batch on arrival, keeping none."""
    latency = _Latency()
    ds = (
        fl.Dataset.range(10**9)
        .map(_decoder(latency), num_parallel_calls=fl.AUTOTUNE, name="decode")
        .batch(LIVE_BATCH)
        .prefetch(fl.AUTOTUNE)
    )
    total = sum(p.seconds for p in phases)
    batches = wrong_shape = out_of_order = 0
    marks = []
    verdicts = []
    with ds.iterator() as it:
        timeline = record(it)
        start = time.perf_counter()
        view = watch(timeline, total) if watch is not None else View(timeline, "", total, "s")
        with view:
            end = 0.0
            for phase in phases:
                latency.seconds = phase.io_seconds
                marks.append((time.perf_counter() - it.started, phase.name))
                end += phase.seconds
                middle: recovery.Reading | None = None
                while (elapsed := time.perf_counter() - start) < end:
                    if middle is None and elapsed >= end - phase.seconds / 2:
                        middle = recovery.read(it.consumer.wait)
                    ids, features = next(it)
                    first = batches * LIVE_BATCH
                    wrong_shape += (ids.shape, features.shape) != SHAPES
                    out_of_order += not np.array_equal(ids, np.arange(first, first + LIVE_BATCH))
                    batches += 1
                    time.sleep(phase.step_seconds)
                    view.update(elapsed, phase.name)
                if middle is not None:
                    last = recovery.read(it.consumer.wait)
                    window = timeline.recent(last.wall - middle.wall)
                    verdicts.append(recovery.judge(phase.name, phase.seconds, middle, last, window))
            view.update(time.perf_counter() - start, "done")
        # End the recording exactly here, rather than at its next tick after close().
        timeline.stop()
        timeline.add(take_sample(it))
        stats = it.stats()
    history = stats["autotune"]["history"]
    changed = Counter(d["knob"] for d in history)
    return LiveResult(
        checks=(
            Check(
                f"every batch has {LIVE_BATCH} elements: ids {SHAPES[0]}, features {SHAPES[1]}",
                batches > 0 and wrong_shape == 0,
                f"{batches - wrong_shape} of {batches} batches had the requested size",
            ),
            Check(
                "ids arrive in order, none lost or repeated",
                batches > 0 and out_of_order == 0,
                f"{batches * LIVE_BATCH} ids checked, {out_of_order} batches out of order",
            ),
            Check(
                "AUTOTUNE kept up after every change of load (in each phase's second half the "
                "consumer was served, or a third or more of the cores it could have were used)",
                all(v.kept_up for v in verdicts),
                "; ".join(("" if v.kept_up else "NOT KEPT UP: ") + v.detail for v in verdicts),
            ),
            Check(
                "AUTOTUNE changed only parallelism, buffer sizes and executors",
                set(changed) <= TUNED_KNOBS,
                f"{len(history)} decisions: "
                + (", ".join(f"{knob} x {n}" for knob, n in changed.items()) or "none"),
            ),
        ),
        batches=batches,
        stats=stats,
        timeline=timeline,
        marks=tuple(marks),
    )


def _chain(values: list[int], edge: int = 3) -> str:
    """``1 -> 2 -> 4``; a knob tried back and forth many times shows its first and last."""
    if len(values) <= 2 * edge + 1:
        return " -> ".join(map(str, values))
    return (
        " -> ".join(map(str, values[:edge]))
        + f" -> ... ({len(values) - 1} changes) ... -> "
        + " -> ".join(map(str, values[-edge:]))
    )


def history_by_phase(result: LiveResult) -> list[str]:
    """Per phase, each knob AUTOTUNE moved as a chain of values: ``parallelism 1 -> 2 -> 4``."""
    lines = []
    ends = [when for when, _ in result.marks[1:]] + [float("inf")]
    history = result.stats["autotune"]["history"]
    for (began, name), ended in zip(result.marks, ends):
        chains: dict[str, list[int]] = {}
        for d in history:
            if began <= d["time"] < ended:
                chain = chains.setdefault(f"{d['stage']}.{d['knob']}", [d["old"]])
                chain.append(d["new"])
        lines.append(f"  {began:5.1f} s  {name}:")
        lines += [f"           {knob}: {_chain(chain)}" for knob, chain in chains.items()]
        if not chains:
            lines.append("           (no change)")
    return lines


# -- printing -------------------------------------------------------------------------------


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


DEFAULT_PLOT = Path(tempfile.gettempdir()) / "feedline-demo.png"


def run_demo(
    out: TextIO | None = None,
    cases: Sequence[Case] = CASES,
    phases: Sequence[Phase] = PHASES,
    plot: Path | None = DEFAULT_PLOT,
    plain: bool = False,
) -> int:
    """Run ``cases`` one after another, then ``changing_load(phases)`` (none: skipped) with a
    live view (``plain``: log lines even on a terminal), printing as they go, and write the
    plot to ``plot`` (None: no plot). Returns 0 if every check held, else 1, so it can serve
    as a process exit status."""
    stream = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        # Flush so piped output (CI logs, ``| tee``) shows progress as it happens.
        print(text, file=stream, flush=True)

    def say_checks(checks: Sequence[Check]) -> None:
        for check in checks:
            say(f"  {'PASS' if check.passed else 'FAIL'}  {check.claim}")
            say(f"        {check.detail}")

    parts = len(cases) + bool(phases)
    say(f"feedline {fl.__version__} demo: does AUTOTUNE change my batch size?")
    say(f"Running {parts} pipelines live; each checks what it claims.")
    passed = 0
    for number, case in enumerate(cases, start=1):
        say()
        say(f"[{number}/{parts}] {case.question}")
        say(_indent(case.code, "    "))
        say()

        def show(batch: Batch, every: int = case.show_every) -> None:
            if (batch.index + 1) % every == 0:
                say(
                    f"  batch {batch.index + 1:>3}  shape {batch.shape}  "
                    f"{preview(batch.values)}  at {batch.elapsed:.2f} s"
                )

        result = case.run(show)
        say(f"  batches seen: {result.batches}   shapes seen: {format_shapes(result.shapes)}")
        say(
            f"  consumer time: {result.seconds:.2f} s, "
            f"of which {result.waited:.3f} s waiting for the pipeline"
        )
        say_checks(result.checks)
        say("  Why:")
        say(_indent(case.takeaway, "    "))
        passed += result.passed
    if phases:
        say()
        say(f"[{parts}/{parts}] What does AUTOTUNE change while the load changes under it?")
        say(_indent(LIVE_CODE, "    "))
        say("  Phases: " + "; ".join(f"{p.name} ({p.seconds:.0f} s)" for p in phases))
        say(f"  (The loop receives batches: its elements/s are batches of {LIVE_BATCH}.)")
        say()

        def watch(timeline: Timeline, total: float) -> View:
            return open_view(timeline, title="feedline", total=total, out=stream, plain=plain)

        live = changing_load(phases, watch)
        say()
        say("What AUTOTUNE did, phase by phase:")
        for line in history_by_phase(live):
            say(line)
        say()
        say(format_report(live.stats))
        say()
        say_checks(live.checks)
        if plot is not None:
            try:
                path = plot_timeline(
                    live.timeline,
                    plot,
                    title=LIVE_TITLE,
                    marks=live.marks,
                    decisions=live.stats["autotune"]["history"],
                )
            except PlotUnavailable as e:
                say(f"  No plot: {e}")
            else:
                say(f"  Plot of buffers, parallelism, throughput and consumer wait: {path}")
        passed += live.passed
    say()
    say(f"{passed}/{parts} cases passed.")
    if passed == parts:
        say("AUTOTUNE tunes how the pipeline runs (buffering, parallelism), never what it yields.")
        return 0
    say("Some checks failed: see the FAIL lines above.")
    return 1
