"""The tuner's experiments on synthetic stages: the test writes each window's metrics (and
so what a change gains), moves the tuner's clock on, and checks what it kept or took back."""

from __future__ import annotations

import time
from typing import Any

import pytest

from feedline.autotune import policy
from feedline.autotune import tuner as tuner_module
from feedline.autotune import windows as windows_module
from feedline.autotune.constants import HICCUP_MEMORY
from feedline.runtime.context import WorkerMemory
from feedline.runtime.tunable import PROCESSES, THREADS, Knob, StartChoice
from tests.autotune.helpers import (
    SyntheticStage,
    read_ahead_history,
    synthetic_tuner,
    threads_tuner,
)


@pytest.mark.parametrize("cpu_budget", [1.0, 2.0])
def test_cpu_budget_caps_computing_stages(
    monkeypatch: pytest.MonkeyPatch, cpu_budget: float
) -> None:
    # Synthetic measurements: a live run reads computing threads starved of CPU by other
    # processes as threads that wait. Each worker computes (95% of its time on the CPU) and
    # adds as much rate again, its consumer always waiting: only the budget stops it.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    process_cpu = [0.0]
    monkeypatch.setattr(tuner_module.time, "process_time", lambda: process_cpu[0])
    synthetic, root, tuner, now = threads_tuner(1, cpu=cpu_budget)
    m = synthetic.metrics
    most = 1
    for _ in range(24):
        now += 0.25
        workers = synthetic.knobs["parallelism"].value
        most = max(most, workers)
        done = 250 * workers
        process_cpu[0] += 0.25 * 0.95 * workers
        root.delivered += done
        root.wait += 0.25 * 0.95
        m.elements += done
        m.worked += done
        m.work_wall += 0.25 * workers
        m.work_cpu += 0.25 * workers * 0.95
        m.consumer_wait += 0.25 * 0.95
        tuner.step(now)
    assert most == int(cpu_budget), tuner.history


@pytest.mark.parametrize("speedup", [1.8, 1.0])
def test_reading_ahead_is_kept_when_it_overlaps_the_consumer_and_taken_back_when_not(
    monkeypatch: pytest.MonkeyPatch, speedup: float
) -> None:
    moves = [(old, new) for old, new, _ in read_ahead_history(monkeypatch, speedup)]
    assert moves == ([(0, 1)] if speedup > 1 else [(0, 1), (1, 0)]), moves


def test_an_inline_stage_buffer_does_not_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    # Just sent inline, a stage's window still holds the idle time of the thread it let go
    # and its consumer's waits: neither calls for a buffer nobody fills.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    synthetic = SyntheticStage()
    synthetic.knobs["parallelism"] = Knob("parallelism", 0, 0, 64, False)
    synthetic.knobs["buffer_size"] = Knob("buffer_size", 2, 1, 64, True)
    synthetic.knobs["executor"].tunable = False
    root, tuner, now = synthetic_tuner([synthetic])
    for _ in range(20):
        now += 0.25
        root.delivered += 250
        root.wait += 0.01
        synthetic.metrics.elements += 250
        synthetic.metrics.work_wall += 0.05
        synthetic.metrics.work_cpu += 0.05
        synthetic.metrics.consumer_wait += 0.01
        synthetic.metrics.worker_idle += 0.1
        tuner.step(now)
    assert not [d for d in tuner.history if d.knob == "buffer_size"], tuner.history


@pytest.mark.parametrize("consumer_waits", [0.008, 0.03])  # between NO_STALL and STALL; above
def test_idle_workers_their_consumer_never_waits_on_are_shed(
    monkeypatch: pytest.MonkeyPatch, consumer_waits: float
) -> None:
    # A waiting map started with many workers for a consumer that sleeps between batches: the
    # consumer's waits (the GIL at each wake-up, a core on a loaded machine) are not on this
    # stage. Its buffer starts full, so the first windows deliver with no work done at all:
    # that must not read as work too cheap for a thread.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    synthetic, root, tuner, now = threads_tuner(64)
    m = synthetic.metrics
    m.worked, m.work_wall, m.work_cpu = 64, 64 * 0.005, 64 * 0.00005  # the buffer's fill
    for step in range(24):
        now += 0.25
        workers = synthetic.knobs["parallelism"].value
        root.delivered += 5
        root.wait += 0.25 * consumer_waits
        m.elements += 20
        if step >= 4:  # the buffer has drained: each element delivered is one worked on
            m.worked += 20
            m.work_wall += 20 * 0.005
            m.work_cpu += 20 * 0.00005
        m.worker_idle += 0.25 * workers - 20 * 0.005
        tuner.step(now)
    shed = [d for d in tuner.history if d.knob == "parallelism"]
    assert shed and all(d.new < d.old for d in shed), tuner.history
    assert all(d.new > 0 for d in shed), tuner.history  # never inline: the work is not cheap
    assert synthetic.knobs["parallelism"].value <= 8, tuner.history


def test_two_stages_at_the_same_rate_grow_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two waiting stages (10 ms per call) in a row, each with 4 workers: the pipeline runs at
    # their common rate, 400 elements/s. More workers for either alone gain nothing, so each
    # tried alone would be taken back; the second's reader waiting on the first says to try
    # the first with it.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    first, second = SyntheticStage(), SyntheticStage()
    first.name, second.name = "map(read)", "map(fetch)"
    for stage_ in (first, second):
        stage_.knobs["parallelism"].set(4)
        stage_.knobs["executor"].tunable = False
    root, tuner, now = synthetic_tuner([first, second])
    for _ in range(40):
        now += 0.25
        workers = [s.knobs["parallelism"].value for s in (first, second)]
        done = 0.25 * 100 * min(workers)  # elements each stage (and the consumer) gets through
        root.delivered += done
        root.wait += 0.25 * 0.95  # the training step is fast: it waits on the pipeline
        for stage_, own, reader_waits in (
            (first, workers[0], 0.25 * max(0.0, 1 - workers[0] / workers[1])),
            (second, workers[1], 0.25 * 0.95),
        ):
            m = stage_.metrics
            m.elements += done
            m.worked += done
            m.work_wall += done * 0.01
            m.work_cpu += done * 0.0001
            m.consumer_wait += reader_waits
            m.worker_idle += max(0.0, 0.25 * own - done * 0.01)
        tuner.step(now)
    chained = [d for d in tuner.history if "tried with it" in d.reason]
    assert chained, tuner.history
    assert min(s.knobs["parallelism"].value for s in (first, second)) > 4, tuner.history


def test_a_served_consumer_keeps_a_decrease_whatever_a_stage_rate_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A slow consumer takes a few large batches per window, too few to measure its rate, so
    # a decrease is judged on the stage's own rate, which falls as the buffers after it
    # fill up: that fall is not the decrease's doing while the consumer never waits.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    synthetic, root, tuner, now = threads_tuner(64)
    m = synthetic.metrics
    for step in range(24):
        now += 0.25
        done = 500 if step < 3 else 20  # the buffers downstream fill, then it keeps pace
        root.delivered += 1
        m.elements += done
        m.worked += done
        m.work_wall += done * 0.005
        m.work_cpu += done * 0.00005
        m.worker_idle += max(0.0, 0.25 * synthetic.knobs["parallelism"].value - done * 0.005)
        tuner.step(now)
    changes = [d for d in tuner.history if d.knob == "parallelism"]
    assert changes and all(d.new < d.old for d in changes), tuner.history


def gil_bound_decisions(
    monkeypatch: pytest.MonkeyPatch,
    ram: int,
    workers: list[WorkerMemory],
    process_cores: float | None = None,
    cpu: float = 0.5,
    parallelism: int = 2,
    solo_cpu_share: float | None = None,
    processes: bool = True,
    knob: str = "executor",
    seconds: float = 10.0,
    forgetful: bool = False,
    slow_moments: dict[int, float] | None = None,
    processes_speedup: float = 1.0,
) -> list[tuple[int, int, str]]:
    """The executor decisions on a synthetic stage with the GIL's signature (the consumer
    always waits; the stage computes one core's worth at 1000 elements/s, on threads and on
    processes alike), with a RAM budget of ``ram`` and ``workers`` already running.
    ``process_cores``: the cores the whole process uses (else what this test process uses);
    ``cpu``: the share of the workers' time on the CPU; ``parallelism``: the threads it starts
    with; ``solo_cpu_share``: what its first call, run alone, showed; ``processes``: whether
    it may move to processes; ``forgetful``: the tuner forgets what did not help at every step
    (as when the consumer keeps changing speed); ``slow_moments``: the cores the process uses
    at some steps (of 0.25 s), if not ``process_cores``; ``processes_speedup``: how much faster
    it delivers on processes. Returns the decisions on ``knob`` over ``seconds``."""
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)  # cores count as free
    process_cpu = [0.0]
    if process_cores is not None:
        monkeypatch.setattr(tuner_module.time, "process_time", lambda: process_cpu[0])
    # A worker is expected to hold as much as this process, before any runs: a fixed size here
    # (this test process's own depends on what earlier tests imported).
    monkeypatch.setattr(tuner_module, "rss_of", lambda: 100 * 2**20)
    synthetic = SyntheticStage()
    synthetic.knobs["parallelism"].set(parallelism)
    synthetic.solo_cpu_share = solo_cpu_share
    synthetic.knobs["executor"].tunable = processes
    # (The tuner's clock: the test moves it on.)
    root, tuner, now = synthetic_tuner([synthetic], ram=ram, workers=lambda: workers)
    for step in range(int(seconds / 0.25)):
        now += 0.25
        cores = (slow_moments or {}).get(step, process_cores)
        process_cpu[0] += 0.25 * (cores or 0.0)
        on_processes = synthetic.knobs["executor"].value == PROCESSES
        delivered = int(250 * (processes_speedup if on_processes else 1.0))
        root.delivered += delivered
        root.wait += 0.25
        m = synthetic.metrics
        m.elements += delivered
        m.work_wall += 0.5
        m.work_cpu += 0.5 * cpu
        m.consumer_wait += 0.25
        tuner.step(now)
        if forgetful:
            tuner.state.saturated_marks.clear()
    return [(d.old, d.new, d.reason) for d in tuner.history if d.knob == knob]


def test_a_move_to_processes_that_does_not_pay_is_taken_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moves = gil_bound_decisions(monkeypatch, 2**30, [])
    assert [(old, new) for old, new, _ in moves] == [(THREADS, PROCESSES), (PROCESSES, THREADS)]
    assert "no gain" in moves[1][2]


def test_a_move_to_processes_that_did_not_pay_is_tried_again_ever_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Even when the tuner forgets what did not help (a consumer changing speed makes it), a
    # failed move to processes is retried only after 10 s, then 20 s, then 40 s.
    moves = gil_bound_decisions(monkeypatch, 2**32, [], seconds=60.0, forgetful=True)
    tries = [m for m in moves if m[:2] == (THREADS, PROCESSES)]
    assert 2 <= len(tries) <= 3, moves


def test_a_move_to_processes_that_pays_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    moves = gil_bound_decisions(monkeypatch, 2**32, [], processes_speedup=1.8)
    assert [(old, new) for old, new, _ in moves] == [(THREADS, PROCESSES)], moves


def test_worker_processes_count_in_the_ram_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other worker processes of the run already hold most of the budget: one per core more,
    # each expected to hold as much, would not fit.
    running = [WorkerMemory("map(other)", 2, 2 * 300 * 2**20)]
    assert gil_bound_decisions(monkeypatch, 2**30, running) == []
    assert gil_bound_decisions(monkeypatch, 2**32, running)[0][:2] == (THREADS, PROCESSES)
    # Before any worker runs, one is expected to hold as much as this process (100 MiB here).
    assert gil_bound_decisions(monkeypatch, 150 * 2**20, []) == []
    assert gil_bound_decisions(monkeypatch, 250 * 2**20, [])[0][:2] == (THREADS, PROCESSES)


@pytest.mark.parametrize("process_cores", [1.7, 1.8])
def test_a_thread_per_core_leaving_cores_unused_tries_processes(
    monkeypatch: pytest.MonkeyPatch, process_cores: float
) -> None:
    # Two computing threads (90% of their time on the CPU) while the process uses 1.7 of
    # its 2 cores: they wait on each other (the GIL between native calls), so processes are
    # tried, and taken back when they do not pay. Using 1.8 cores, processes could at best
    # use 11% more: less than a move must gain (PROCESS_GAIN), so threads are left alone.
    moves = gil_bound_decisions(monkeypatch, 2**32, [], process_cores=process_cores, cpu=0.9)
    if process_cores < 2 / (1 + policy.PROCESS_GAIN):
        assert moves[0][:2] == (THREADS, PROCESSES), moves
        assert "with a thread per core" in moves[0][2]
        assert moves[1][:2] == (PROCESSES, THREADS)
    else:
        assert moves == []


@pytest.mark.parametrize("process_cores", [1.0, 1.7])
def test_the_reading_for_a_move_to_processes_gets_them_ready_when_held_by_the_gil(
    monkeypatch: pytest.MonkeyPatch, process_cores: float
) -> None:
    # Held to one core, a move is likely: the forkserver starts while the tuner reads (it
    # took ~0.5 s on its own). Threads using 1.7 cores may gain little: nothing starts.
    readied: list[int] = []
    monkeypatch.setattr(SyntheticStage, "expect_processes", lambda self: readied.append(1))
    # The workers it started with were just chosen: the tuner reads before it moves.
    started = StartChoice(time.perf_counter(), "parallelism", 0, 2, "its first call computes")
    monkeypatch.setattr(SyntheticStage, "start_choice", started)
    moves = gil_bound_decisions(monkeypatch, 2**32, [], process_cores=process_cores, cpu=0.9)
    assert moves[0][:2] == (THREADS, PROCESSES), moves
    assert bool(readied) == (process_cores == 1.0)


@pytest.mark.parametrize(
    "slow_moments",
    [
        {0: 1.6, 1: 1.6},  # the first half second leaves 0.4 cores, more than processes need
        {1: 1.3},  # one window looks held by the GIL
    ],
)
def test_a_slow_moment_does_not_send_a_thread_per_core_to_processes(
    monkeypatch: pytest.MonkeyPatch, slow_moments: dict[int, float]
) -> None:
    # Threads using 1.85 of 2 cores, but the machine was busy for a moment: read over the
    # knobs' first second (or two windows, for a move with a large gain), they leave too
    # little for processes to pay.
    moves = gil_bound_decisions(
        monkeypatch, 2**32, [], process_cores=1.85, cpu=0.9, slow_moments=slow_moments
    )
    assert moves == []


@pytest.mark.parametrize("cpu", [0.6, 0.05])
def test_many_threads_started_for_a_first_call_that_waited_try_processes_if_they_compute(
    monkeypatch: pytest.MonkeyPatch, cpu: float
) -> None:
    # The first call waited (it opened a connection, say): the map started 64 threads. If
    # they then spend 60% of their time on the CPU although they contend for the GIL, the work
    # computes: processes are tried (and taken back here, where they do not pay). Spending
    # 5% of it there, they wait: threads they stay.
    moves = gil_bound_decisions(
        monkeypatch, 2**32, [], cpu=cpu, parallelism=64, solo_cpu_share=0.01
    )
    if cpu > 0.5:
        assert [(old, new) for old, new, _ in moves] == [(THREADS, PROCESSES), (PROCESSES, THREADS)]
    else:
        assert moves == []


def test_computing_threads_above_the_cores_are_shed_when_processes_are_not_an_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As above, but the function cannot go to processes: the 64 threads only contend for
    # the GIL, and fewer keep the same rate.
    moves = gil_bound_decisions(
        monkeypatch,
        2**32,
        [],
        cpu=0.6,
        parallelism=64,
        solo_cpu_share=0.01,
        processes=False,
        knob="parallelism",
    )
    assert moves and all(new < old for old, new, _ in moves), moves
    assert moves[-1][1] <= 8, moves


def waiting_stage_decisions(
    monkeypatch: pytest.MonkeyPatch,
    *,
    busy: float,
    idle: float,
    consumer_waits: float,
    process_cores: float,
    solo_cpu_share: float,
    cpu: float = 0.03,
) -> list[tuple[int, int, str]]:
    """The parallelism decisions on a synthetic stage of 16 threads whose workers spend
    ``busy`` of their time on calls (``cpu`` of it on the CPU) and ``idle`` blocked on a full
    buffer, its consumer waiting ``consumer_waits`` of the time, the process using
    ``process_cores`` and the machine leaving a core idle. It delivers at a fixed rate: every
    change gains nothing."""
    idle_clock = [0.0]
    process_cpu = [0.0]
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: idle_clock[0])
    monkeypatch.setattr(tuner_module.time, "process_time", lambda: process_cpu[0])
    synthetic, root, tuner, now = threads_tuner(16)
    synthetic.solo_cpu_share = solo_cpu_share
    m = synthetic.metrics
    for _ in range(8):
        now += 0.25
        idle_clock[0] += 0.25 * 1.0
        process_cpu[0] += 0.25 * process_cores
        workers = synthetic.knobs["parallelism"].value
        root.delivered += 1000
        root.wait += 0.25 * consumer_waits
        m.elements += 1000
        m.worked += 1000
        m.work_wall += 0.25 * workers * busy
        m.work_cpu += 0.25 * workers * busy * cpu
        m.consumer_wait += 0.25 * consumer_waits
        m.worker_idle += 0.25 * workers * idle
        tuner.step(now)
    return [(d.old, d.new, d.reason) for d in tuner.history if d.knob == "parallelism"]


@pytest.mark.parametrize(("process_cores", "grows"), [(0.6, True), (1.0, False)])
def test_threads_that_wait_while_the_gil_is_free_scale_past_what_a_first_call_suggested(
    monkeypatch: pytest.MonkeyPatch, process_cores: float, grows: bool
) -> None:
    # A fetch whose calls mostly compute a little and now and then wait long (a slow read):
    # its first call computed, and 16 threads at 3% each add up to 0.4 cores, as 16 threads
    # queueing for the GIL would. But a process using 0.6 cores leaves the GIL free 40% of
    # the time, on a machine with a core idle: they are not held by it, they wait. Using a
    # core, it may be the GIL: no more threads.
    moves = waiting_stage_decisions(
        monkeypatch,
        busy=0.9,
        idle=0.05,
        consumer_waits=0.9,
        process_cores=process_cores,
        solo_cpu_share=0.97,
    )
    grew = [new for old, new, _ in moves if new > old]
    assert bool(grew) == grows, moves
    if grew:
        assert grew[0] > 16, moves


@pytest.mark.parametrize("consumer_waits", [0.9, 0.2])
def test_workers_held_behind_the_oldest_element_get_more_calls_in_flight(
    monkeypatch: pytest.MonkeyPatch, consumer_waits: float
) -> None:
    # In order, one slow call holds the finished ones behind it: workers are blocked on the
    # full buffer most of the time while the consumer waits for that oldest element. More
    # calls in flight fill the wait, although the workers are not busy. With the consumer
    # waiting less than the workers idle, the two need not overlap: no more workers.
    moves = waiting_stage_decisions(
        monkeypatch,
        busy=0.3,
        idle=0.6,
        consumer_waits=consumer_waits,
        process_cores=0.3,
        solo_cpu_share=0.02,
    )
    grew = [new for old, new, _ in moves if new > old]
    assert bool(grew) == (consumer_waits > 0.5), moves


def judged_step_up(
    stage: SyntheticStage, state: Any, judged: Any, old: int, new: int, rate: float, stall: float
) -> None:
    """Judge a step up of ``stage``'s parallelism from ``old`` to ``new`` (from a rate of 100)
    on a window with ``rate`` and ``stall``, every stage judged as ``judged``; it fails."""
    from feedline.autotune.experiments import Experiment, Judge

    def set_knob(s: object, k: Knob, v: int, reason: str) -> int:
        return k.set(v)

    judge = Judge(state, set_knob, lambda now: None, lambda key: judged)  # type: ignore[arg-type,return-value]
    knob = stage.knobs["parallelism"]
    knob.set(new)
    e = Experiment(
        stage, knob, old, new, +1, 100.0, stall, 0.0, {}, {}, baseline_judged={stage.key: judged}
    )
    assert judge.judge(e, rate, stall, 100.0, 10.0, windows=[]) == (False, None)  # no gain
    assert knob.value == old  # back


@pytest.mark.parametrize(("waits", "retry_within"), [(True, 1.0), (False, 4.0)])
def test_a_waiting_stage_taken_back_inline_is_tried_again_soon(
    waits: bool, retry_within: float
) -> None:
    from feedline.autotune.experiments import Judged, TunerState

    stage = SyntheticStage()
    state = TunerState()
    judged = Judged(2e-3 if waits else 20e-6, waits, 100.0, 0.99)
    # The smallest step up from inline a waiting stage takes (its cores' worth).
    judged_step_up(stage, state, judged, 0, 2, rate=50.0, stall=0.99)
    mark = state.saturated_marks[(stage.key, "parallelism")]
    assert mark.retry_at == pytest.approx(10.0 + retry_within)


def test_a_big_step_that_did_not_pay_is_narrowed_before_a_verdict() -> None:
    # Past some count of threads the rate falls off a cliff (GIL hand-offs): 135 -> 256
    # lost, where 192 would have gained half again. The failed step leaves no verdict on
    # the knob, only a ceiling halfway to which the next step goes; a failed step under
    # NARROWED_STEP is a verdict as before.
    from feedline.autotune.constants import NARROWED_STEP
    from feedline.autotune.experiments import Judged, TunerState

    stage = SyntheticStage()
    state = TunerState()
    judged = Judged(20e-3, True, 100.0, 0.9)
    judged_step_up(stage, state, judged, 20, 48, rate=95.0, stall=0.9)
    assert state.ceilings == {(stage.key, "parallelism"): 48}
    assert state.saturated == {}
    judged_step_up(stage, state, judged, 20, 20 + NARROWED_STEP - 1, rate=95.0, stall=0.9)
    assert state.saturated == {(stage.key, "parallelism"): 20}
    # The ceiling goes with the situation it was found in, as the marks do.
    state.drop_stale(11.0, lambda key: Judged(2e-3, True, 100.0, 0.9))
    assert state.ceilings == {}


def test_a_shrink_the_consumer_stalls_after_is_taken_back_and_the_cover_kept_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sixteen workers that waiting work keeps a quarter busy, the consumer never waiting:
    # idle, they are shed. Then the consumer stalls (a hiccup the fewer no longer cover):
    # the shed is taken back, and nothing is shed again until the longer memory has passed.
    monkeypatch.setattr(windows_module, "idle_cpu_seconds", lambda: None)
    synthetic, root, tuner, now = threads_tuner(16)
    m = synthetic.metrics
    started = now

    def tick(stall: float) -> None:
        nonlocal now
        now += 0.25
        workers = max(1, synthetic.knobs["parallelism"].value)
        root.delivered += 250
        root.wait += 0.25 * stall
        m.elements += 250
        m.worked += 250
        m.work_wall += 0.25 * workers * 0.25
        m.work_cpu += 0.25 * workers * 0.01
        m.worker_idle += 0.25 * workers * 0.75
        m.consumer_wait += 0.25 * stall
        tuner.step(now)

    while synthetic.knobs["parallelism"].value == 16 and now - started < 10:
        tick(0.0)
    assert synthetic.knobs["parallelism"].value < 16, tuner.history
    for _ in range(4):  # the shed is judged (and kept: the consumer is still served)
        tick(0.0)
    assert synthetic.knobs["parallelism"].value < 16, tuner.history
    for _ in range(4):
        tick(0.2)
    back = [d for d in tuner.history if d.reason.startswith("the consumer stalls")]
    assert back and synthetic.knobs["parallelism"].value == 16, tuner.history
    assert tuner.state.hiccup_memory == 2 * HICCUP_MEMORY
    quiet_from = now
    while synthetic.knobs["parallelism"].value == 16 and now - quiet_from < 30:
        tick(0.0)
    assert now - quiet_from >= tuner.state.hiccup_memory, tuner.history
