"""``feedline demo``: run the classic "does AUTOTUNE change my batch size?" cases, live.

Each case is a function that builds a pipeline, consumes it, and returns a ``CaseResult`` saying
what it checked and whether each check held. Printing lives apart, in ``run_demo``, which hears
about batches as they arrive through an ``Observer`` callback; a richer live view can replace
the printer without touching the checks, and new cases only need a ``Case`` entry in ``CASES``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

import feedline as fl

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


# -- printing -------------------------------------------------------------------------------


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def run_demo(out: TextIO | None = None, cases: Sequence[Case] = CASES) -> int:
    """Run ``cases`` one after another, printing as they go. Returns 0 if every check held,
    else 1, so it can serve as a process exit status."""
    stream = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        # Flush so piped output (CI logs, ``| tee``) shows progress as it happens.
        print(text, file=stream, flush=True)

    say(f"feedline {fl.__version__} demo: does AUTOTUNE change my batch size?")
    say(f"Running {len(cases)} pipelines live; each checks what it claims.")
    passed = 0
    for number, case in enumerate(cases, start=1):
        say()
        say(f"[{number}/{len(cases)}] {case.question}")
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
        for check in result.checks:
            say(f"  {'PASS' if check.passed else 'FAIL'}  {check.claim}")
            say(f"        {check.detail}")
        say("  Why:")
        say(_indent(case.takeaway, "    "))
        passed += result.passed
    say()
    say(f"{passed}/{len(cases)} cases passed.")
    if passed == len(cases):
        say("AUTOTUNE tunes how the pipeline runs (buffering, parallelism), never what it yields.")
        return 0
    say("Some checks failed: see the FAIL lines above.")
    return 1
