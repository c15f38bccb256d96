"""AUTOTUNE when the load changes, on synthetic stages (the test writes each window's metrics
and moves the tuner's clock): verdicts that fall when what they were judged on changes, probes
that back off, and a move the stage cannot make, said in the history."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from feedline.autotune import tuner as tuner_module
from feedline.autotune import windows as windows_module
from feedline.autotune.experiments import Judged, TunerState
from feedline.runtime.tunable import PROCESSES, THREADS, Knob
from tests.autotune.helpers import SyntheticStage, synthetic_tuner

TICK = 0.25


def run(
    monkeypatch: pytest.MonkeyPatch,
    stage: SyntheticStage,
    seconds: float,
    window: Callable[[float, int], tuple[float, float, float, float]],
    knob: str = "parallelism",
) -> list[tuple[float, int, int, str]]:
    """Drive a tuner on ``stage`` for ``seconds`` of its clock. ``window(t, parallelism)``
    gives, for the tick ending at ``t``: (elements delivered per second, seconds of work per
    element, the work's CPU share, the share of the time the consumer waits). Workers are
    busy with the work they have and idle for the rest. Returns (time, old, new, reason) of
    the decisions on ``knob``."""
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    # A worker process is expected to hold as much as this process: a fixed size here (this
    # test process's own depends on what earlier tests imported).
    monkeypatch.setattr(tuner_module, "rss_of", lambda: 100 * 2**20)
    process_cpu = [0.0]
    monkeypatch.setattr(tuner_module.time, "process_time", lambda: process_cpu[0])
    root, tuner, start = synthetic_tuner([stage])
    m = stage.metrics
    t = 0.0
    made: list[tuple[float, int, int, str]] = []  # on the test's clock (the history's is real)
    while t < seconds:
        t += TICK
        parallelism = stage.knobs["parallelism"].value
        rate, cost, cpu_share, waits = window(t, parallelism)
        done = rate * TICK
        work = done * cost
        workers = max(1, parallelism)
        process_cpu[0] += work * cpu_share
        root.delivered += int(done)
        root.wait += TICK * waits
        m.elements += int(done)
        m.worked += int(done)
        m.work_wall += work
        m.work_cpu += work * cpu_share
        m.consumer_wait += TICK * waits
        m.worker_idle += max(0.0, TICK * workers - work)
        tuner.step(start + t)
        made += [(t, d.old, d.new, d.reason) for d in tuner.history[len(made) :]]
    return [d for d, kind in zip(made, tuner.history) if kind.knob == knob]


def threads_stage(parallelism: int) -> SyntheticStage:
    """A synthetic stage on ``parallelism`` threads that may not move to processes."""
    stage = SyntheticStage()
    stage.knobs["parallelism"].set(parallelism)
    stage.knobs["executor"].tunable = False
    return stage


def test_a_map_that_turns_waiting_leaves_inline_in_one_big_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 5 us of numpy an element, inline (a hand-off would cost as much), for 5 s; then each
    # element also waits 2 ms, as on a remote read. One worker waits as the consumer did:
    # 0 -> 1 gains nothing, so a first step of 1 would leave it inline for good (#22).
    stage = threads_stage(0)

    def window(t: float, parallelism: int) -> tuple[float, float, float, float]:
        if t <= 5.0:
            return 20_000.0, 5e-6, 1.0, 0.9
        calls = max(1, parallelism)
        return min(500.0 * calls, 20_000.0), 2e-3, 0.02, 0.99

    moves = run(monkeypatch, stage, 9.0, window)
    before = [m for m in moves if m[0] <= 5.0]
    assert before == [], moves  # cheap work stays inline
    first = next(m for m in moves if m[0] > 5.0)
    assert first[1] == 0 and first[2] >= 16, moves
    assert first[0] - 5.0 < 2.0, moves
    assert stage.knobs["parallelism"].value >= 16, moves


def test_a_probe_that_keeps_failing_is_made_ever_more_rarely(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stable I/O stage at 32 workers, half of them idle, its consumer served; with fewer,
    # the consumer waits. Each probe of fewer costs a window of lower rate: it is tried
    # again (the verdict is not forever), but each time later than the last.
    stage = threads_stage(32)

    def window(t: float, parallelism: int) -> tuple[float, float, float, float]:
        if parallelism >= 32:
            return 8000.0, 2e-3, 0.02, 0.0
        return 250.0 * parallelism, 2e-3, 0.02, 0.3

    moves = run(monkeypatch, stage, 130.0, window)
    probes = [when for when, old, new, _ in moves if new < old]
    assert len(probes) >= 3, moves
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), probes
    assert len(probes) <= 7, probes  # 4 s, 8 s, 16 s, 32 s, 60 s... between them


@pytest.mark.parametrize(
    ("now", "still"),
    [
        (Judged(5e-6, False, 600.0, 0.9), True),  # the same
        (Judged(12e-6, False, 500.0, 0.9), True),  # within the noise of the cost and rate
        (Judged(2e-3, False, 600.0, 0.9), False),  # the work costs 400x more
        (Judged(5e-6, True, 600.0, 0.9), False),  # the work now waits
        (Judged(5e-6, False, 150.0, 0.9), False),  # the consumer runs 4x slower
        (Judged(5e-6, False, 600.0, 0.0), False),  # the consumer is served now
        (Judged(0.0, False, 600.0, 0.9), True),  # no work seen: nothing says it changed
    ],
)
def test_a_verdict_holds_while_what_it_was_judged_on_holds(now: Judged, still: bool) -> None:
    assert Judged(5e-6, False, 600.0, 0.9).still(now) is still


def test_marks_fall_on_time_or_change_and_retries_back_off() -> None:
    state = TunerState()
    key = object()
    judged = Judged(1e-3, False, 100.0, 0.5)
    state.mark_saturated(key, "parallelism", 4, judged, now=0.0)
    state.drop_stale(3.9, lambda k: judged)
    assert state.saturated == {(key, "parallelism"): 4}
    state.drop_stale(4.0, lambda k: judged)  # time is up
    assert state.saturated == {}
    state.mark_saturated(key, "parallelism", 4, judged, now=10.0)  # failed again: 8 s
    state.drop_stale(17.9, lambda k: judged)
    assert state.saturated == {(key, "parallelism"): 4}
    state.drop_stale(18.0, lambda k: None)  # no window of the stage: time alone
    assert state.saturated == {}
    state.mark_floor(key, 8, judged, now=20.0)
    state.mark_saturated(key, "parallelism", 4, judged, now=20.0)  # 16 s now
    changed = Judged(1e-2, False, 100.0, 0.5)
    state.drop_stale(21.0, lambda k: changed)  # the work changed: both fall at once ...
    assert state.saturated == {} and state.floor_reached == set()
    state.mark_saturated(key, "parallelism", 4, changed, now=22.0)  # ... and waits restart
    state.drop_stale(26.0, lambda k: changed)
    assert state.saturated == {}


def test_a_move_the_stage_cannot_make_is_said_in_the_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A GIL-bound map whose function cannot be pickled: the stage sets its executor back to
    # threads itself. The history must say so, not leave the move standing.
    stage = SyntheticStage()
    stage.knobs["parallelism"].set(2)

    def refuse() -> None:
        if executor.value == PROCESSES:
            executor.refuse(THREADS, "cannot move to processes: TypeError: cannot pickle")

    executor = Knob("executor", THREADS, THREADS, PROCESSES, True, refuse)
    stage.knobs["executor"] = executor

    def window(t: float, parallelism: int) -> tuple[float, float, float, float]:
        return 1000.0, 2e-3, 0.5, 1.0  # computing, on one core's worth: the GIL

    history = run(monkeypatch, stage, 10.0, window, knob="executor")
    moves = [(old, new) for _, old, new, _ in history]
    assert moves[:2] == [(THREADS, PROCESSES), (PROCESSES, THREADS)], history
    assert "cannot pickle" in history[1][3]
    assert not executor.tunable and len(moves) == 2, history


def test_a_big_step_past_the_knee_comes_back_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 ms waits with 20 us of Python: the calls in flight raise the rate up to 64 of them
    # (32k elements/s), past which the GIL lets no more run and each thread more costs
    # hand-offs. The tuner's x8 step overshoots; the rate it gained says where the knee is.
    stage = SyntheticStage()
    stage.knobs["parallelism"] = Knob("parallelism", 16, 0, 256, True)
    stage.knobs["executor"].tunable = False

    def window(t: float, parallelism: int) -> tuple[float, float, float, float]:
        calls = max(1, parallelism)
        rate = min(500.0 * calls, 32_000.0) * min(1.0, 64.0 / calls)
        return rate, calls / rate, 0.01, 0.95

    moves = run(monkeypatch, stage, 4.0, window)
    assert moves[0][2] > 64, moves  # the big step
    assert any("knee" in reason for *_, reason in moves), moves
    assert 48 <= stage.knobs["parallelism"].value <= 100, moves


def test_a_buffer_that_covers_hiccups_is_kept_until_they_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A read that stalls now and then: every second a window in which the consumer waits on
    # the stage, quiet windows between, in which its 8 workers look idle. They are kept while
    # the hiccups go on, and shed once they have stopped (from 6 s).
    stage = threads_stage(8)

    def window(t: float, parallelism: int) -> tuple[float, float, float, float]:
        hiccup = t < 6.0 and t % 1.0 < TICK + 0.01
        return 1000.0, 2e-3, 0.02, 0.2 if hiccup else 0.0

    moves = run(monkeypatch, stage, 14.0, window)
    fewer = [when for when, old, new, _ in moves if new < old]
    assert fewer, moves
    assert min(fewer) >= 6.0, moves
