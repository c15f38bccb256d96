"""The tuner's rules as tables: synthetic measurements in, the proposed move (or none) out.
No threads, no clocks: each row builds the windows and the situation a rule reads."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from feedline.autotune import policy, shrinking
from feedline.autotune.budget import Budget
from feedline.autotune.constants import HICCUP_MEMORY, HICCUP_MEMORY_MAX
from feedline.autotune.experiments import Shrink
from feedline.autotune.policy import Move, Proposal, Situation, Window
from feedline.autotune.windows import StageWindow
from feedline.runtime.tunable import PROCESSES, Knob
from tests.autotune.helpers import SyntheticStage

# A window of a stage its consumer always waits on, whose two workers compute all the time.
COMPUTING = {
    "seconds": 0.25,
    "elements": 250,
    "worked": 250,
    "work_wall": 0.5,
    "input_wall": 0.0,
    "rate": 1000.0,
    "consumer_wait": 0.9,
    "busy": 1.0,
    "cpu_share": 0.95,
    "cores": 1.9,
    "idle": 0.0,
    "bytes_per_element": 0.0,
    "seconds_per_element": 2e-3,
    "cpu_per_element": 1.9e-3,
    "mean_ms": 2.0,
}


def stage(parallelism: int = 2, processes: bool = False, own_work: bool = True) -> SyntheticStage:
    s = SyntheticStage()
    s.knobs["parallelism"].set(parallelism)
    s.knobs["executor"].tunable = processes
    s.has_own_work = own_work
    return s


def prefetch(parallelism: int) -> SyntheticStage:
    s = stage(own_work=False)
    s.knobs["parallelism"] = Knob("parallelism", parallelism, 0, 1, True)
    return s


def window(s: SyntheticStage, **measured: Any) -> Window:
    return StageWindow(stage=s, **{**COMPUTING, **measured})


def situation(**read: Any) -> Situation:
    defaults: dict[str, Any] = {
        "budget": Budget(cpu=2.0, ram=2**30),
        "now": 100.0,
        "cores_in_use": 1.0,
        "idle_cores": None,
        "idle_held": None,
        "knobs_held_for": 10.0,
        "cores_held": 1.0,
        "workers_rss": 0,
        "rss_per_worker": lambda: 100 * 2**20,
        "saturated": {},
        "floor_reached": set(),
        "process_retry": {},
    }
    return Situation(**{**defaults, **read})


def moved(proposal: Proposal | Move | None) -> tuple[str, int, int] | None:
    """(knob, value, direction) of the move proposed, if one is."""
    move = proposal.move if isinstance(proposal, Proposal) else proposal
    return None if move is None else (move.knob, move.value, move.direction)


def test_waiting_is_told_from_threads_sharing_the_gil() -> None:
    waits = policy.mostly_waits
    # 64 threads that sleep pay their hand-offs: 0.5 cores together, 1% each; alone it waits.
    assert waits(cpu_share=0.01, cores=0.5, solo_cpu_share=0.02)
    # 16 computing threads queue for the GIL: 6% each, about one core together.
    assert not waits(cpu_share=0.06, cores=0.95, solo_cpu_share=0.02)
    assert not waits(cpu_share=0.06, cores=0.5, solo_cpu_share=0.97)
    assert not waits(cpu_share=0.06, cores=0.5, solo_cpu_share=None)
    # Few threads using little CPU wait, whatever was measured alone.
    assert waits(cpu_share=0.05, cores=0.1, solo_cpu_share=None)
    assert not waits(cpu_share=0.9, cores=0.1, solo_cpu_share=0.02)


@pytest.mark.parametrize(
    ("idle", "consumer_wait", "held"),
    [(0.6, 0.9, True), (0.6, 0.5, False), (0.1, 0.9, False)],
)
def test_held_in_order(idle: float, consumer_wait: float, held: bool) -> None:
    w = window(stage(), idle=idle, consumer_wait=consumer_wait)
    assert policy.held_in_order(w) == held


@pytest.mark.parametrize(
    ("rate", "stall", "last_rate", "last_stall", "shifted"),
    [
        (100, 0.0, 0, 0.0, False),  # nothing to compare with yet
        (100, 0.0, 100, 0.0, False),
        (140, 0.0, 100, 0.0, True),  # the rate moved by more than 30%
        (100, 0.02, 100, 0.0, True),  # the consumer began to stall
        (100, 0.5, 100, 0.4, False),
    ],
)
def test_consumer_shifted(
    rate: float, stall: float, last_rate: float, last_stall: float, shifted: bool
) -> None:
    assert policy.consumer_shifted(rate, stall, last_rate, last_stall) == shifted


@pytest.mark.parametrize(
    ("workers", "cores", "may"),
    [(1, 0.99, True), (2, 1.9, False), (2, 1.1, True), (8, 0.5, True)],
)
def test_fewer_may_keep(workers: int, cores: float, may: bool) -> None:
    assert shrinking.fewer_may_keep(window(stage(workers), cores=cores)) == may


@pytest.mark.parametrize(
    ("knob", "measured", "inline_only", "floor", "expected"),
    [
        # The consumer works half the time, 5 ms an element: read ahead on a thread.
        (0, {"consumer_wait": 0.5, "rate": 100.0}, False, False, ("parallelism", 1, +1)),
        (0, {"consumer_wait": 0.5, "rate": 100.0}, True, False, None),  # only back inline
        (0, {"consumer_wait": 0.95, "rate": 100.0}, False, False, None),  # little to overlap
        (0, {"consumer_wait": 0.5, "rate": 10_000.0}, False, False, None),  # 50 us: too short
        # A 10 ms step, each call waiting 35 us (0.35%) for inline batching: longer than a
        # ready element's hand-off from a thread; 15 us (0.15%) is not.
        (0, {"consumer_wait": 0.0035, "rate": 99.65}, False, False, ("parallelism", 1, +1)),
        (0, {"consumer_wait": 0.0015, "rate": 99.85}, False, False, None),
        # Nothing of its own to overlap: back inline, unless shrinking was found to cost.
        (1, {"consumer_wait": 0.99}, True, False, ("parallelism", 0, -1)),
        (1, {"consumer_wait": 0.99}, False, True, None),
        (1, {"consumer_wait": 0.5}, False, False, None),
    ],
)
def test_read_ahead(
    knob: int,
    measured: dict[str, float],
    inline_only: bool,
    floor: bool,
    expected: tuple[str, int, int] | None,
) -> None:
    s = prefetch(knob)
    floor_reached = {s.key} if floor else set()
    proposal = policy.read_ahead(
        [window(s, **measured)], situation(floor_reached=floor_reached), inline_only
    )
    assert moved(proposal) == expected
    if expected is not None and expected[2] > 0:
        assert proposal.move is not None and proposal.move.min_window == policy.LONG_WINDOW


def test_read_ahead_with_no_thread_left_notes_the_budget() -> None:
    s = prefetch(0)
    s.knobs["parallelism"].most = lambda: 0  # type: ignore[method-assign]
    proposal = policy.read_ahead([window(s, consumer_wait=0.5, rate=100.0)], situation())
    assert proposal.move is None
    assert [(n.knob.name, n.wanted, n.saturated) for n in proposal.notes] == [
        ("parallelism", 1, False)
    ]


@pytest.mark.parametrize(
    ("workers", "measured", "read", "expected"),
    [
        # Computing workers: one more, within the CPU budget.
        (1, {}, {}, ("parallelism", 2, +1)),
        # Waiting (I/O): double, or x8 when almost all of it is waiting.
        (2, {"cpu_share": 0.3, "cores": 0.1}, {}, ("parallelism", 4, +1)),
        (2, {"cpu_share": 0.01, "cores": 0.02}, {}, ("parallelism", 16, +1)),
        # Its consumer hardly waits on it: not a candidate.
        (2, {"consumer_wait": 0.004}, {}, None),
        # Workers neither busy nor held in order: more would not help.
        (2, {"busy": 0.2, "cpu_share": 0.01, "cores": 0.02}, {}, None),
        # Inline work this cheap stays inline.
        (0, {"seconds_per_element": 10e-6}, {}, None),
        (0, {}, {}, ("parallelism", 1, +1)),
    ],
)
def test_scale_up(
    workers: int,
    measured: dict[str, float],
    read: dict[str, Any],
    expected: tuple[str, int, int] | None,
) -> None:
    proposal = policy.scale_up([window(stage(workers), **measured)], situation(**read))
    assert moved(proposal) == expected


def test_scale_up_at_the_cores_notes_the_bound() -> None:
    s = stage(2)
    proposal = policy.scale_up([window(s)], situation())
    assert proposal.move is None
    assert [(n.knob.name, n.saturated, n.wanted) for n in proposal.notes] == [
        ("parallelism", True, None)
    ]


def test_scale_up_stops_where_more_was_saturated() -> None:
    s = stage(1)
    saturated = {(s.key, "parallelism"): 1}
    assert moved(policy.scale_up([window(s)], situation(saturated=saturated))) is None


@pytest.mark.parametrize(
    ("workers", "ceiling", "expected"),
    [
        # 2 -> 16 did not pay: half the step next, then half of what is left.
        (2, 16, 9),
        (9, 16, 12),
        (15, 16, 16),
        # Grown past it by other means: no longer a ceiling (x8, to the knob's maximum).
        (16, 16, 64),
    ],
)
def test_scale_up_stops_halfway_to_a_step_that_did_not_pay(
    workers: int, ceiling: int, expected: int
) -> None:
    s = stage(workers)
    measured = window(s, cpu_share=0.01, cores=0.02)
    proposal = policy.scale_up([measured], situation(ceilings={(s.key, "parallelism"): ceiling}))
    assert moved(proposal) == ("parallelism", expected, +1)


def test_scale_up_grows_a_buffer_its_consumer_finds_empty() -> None:
    s = stage(2)
    s.knobs["buffer_size"] = Knob("buffer_size", 4, 1, 64, True)
    saturated = {(s.key, "parallelism"): 2}
    proposal = policy.scale_up([window(s, idle=0.2)], situation(saturated=saturated))
    assert moved(proposal) == ("buffer_size", 8, +1)


@pytest.mark.parametrize(
    ("measured", "read", "expected"),
    [
        # Held by the GIL: two computing threads use one core between them.
        ({}, {}, ("executor", PROCESSES, +1)),
        # Too little CPU work per element to pay for sending it to a process.
        ({"cpu_per_element": 50e-6}, {}, None),
        # One core: nowhere to run processes.
        ({}, {"budget": Budget(cpu=1.0, ram=2**30)}, None),
        # A thread per core using nearly all of them: processes could not gain enough.
        ({}, {"cores_held": 1.95}, None),
        # Other processes keep the cores busy.
        ({}, {"idle_cores": 0.1, "idle_held": 0.1}, None),
        # They paused in the last window only: over the span the cores were not free.
        ({}, {"idle_cores": 1.5, "idle_held": 0.2}, None),
        # Free over the whole span.
        ({}, {"idle_cores": 1.5, "idle_held": 1.2}, ("executor", PROCESSES, +1)),
        # Retried only after a failed move's wait.
        ({}, {"process_retry": "later"}, None),
    ],
)
def test_to_processes(
    measured: dict[str, float], read: dict[str, Any], expected: tuple[str, int, int] | None
) -> None:
    s = stage(2, processes=True)
    if read.get("process_retry") == "later":
        read = {**read, "process_retry": {s.key: (200.0, 20.0)}}
    proposal = policy.to_processes(
        window(s, **measured), [window(s, **measured)], situation(**read)
    )
    assert moved(proposal) == expected
    if proposal is not None and proposal.move is not None:
        assert proposal.move.min_window == policy.LONG_WINDOW
        assert proposal.move.companion is not None and proposal.move.companion[:2] == (
            "parallelism",
            2,
        )


@pytest.mark.parametrize(
    ("cores_held", "ready"), [(1.0, True), (1.7, False)]
)  # held by the GIL: processes start while the reading goes on
def test_to_processes_holds_still_while_the_reading_is_short(
    cores_held: float, ready: bool
) -> None:
    s = stage(2, processes=True)
    w = window(s, cpu_share=0.9)
    proposal = policy.to_processes(w, [w], situation(knobs_held_for=0.2, cores_held=cores_held))
    assert proposal is not None and proposal.hold and proposal.move is None
    assert (proposal.ready is s) == ready


def test_to_processes_that_do_not_fit_in_ram() -> None:
    s = stage(2, processes=True)
    w = window(s)
    assert policy.to_processes(w, [w], situation(budget=Budget(cpu=2.0, ram=150 * 2**20))) is None


@pytest.mark.parametrize(
    ("workers", "measured", "served", "floor", "expected"),
    [
        (8, {"idle": 0.7}, True, False, ("parallelism", 4, -1)),  # mostly idle: halve
        (8, {"idle": 0.4}, True, False, ("parallelism", 6, -1)),  # a quarter
        (8, {"idle": 0.1}, True, False, None),  # busy enough
        (1, {"idle": 0.9}, True, False, None),  # served: keep one worker
        (1, {"idle": 0.9}, False, False, ("parallelism", 0, -1)),
        # Not served, cheap work on idle workers: straight inline.
        (8, {"busy": 0.1, "seconds_per_element": 10e-6}, False, False, ("parallelism", 0, -1)),
        (8, {"idle": 0.7}, True, True, None),  # found before that fewer cost
    ],
)
def test_scale_down(
    workers: int,
    measured: dict[str, float],
    served: bool,
    floor: bool,
    expected: tuple[str, int, int] | None,
) -> None:
    s = stage(workers)
    read = situation(floor_reached={s.key} if floor else set())
    assert moved(shrinking.scale_down([window(s, **measured)], read, served, "test")) == expected


def test_scale_down_halves_an_idle_buffer_when_served() -> None:
    s = stage(1)
    s.knobs["buffer_size"] = Knob("buffer_size", 8, 1, 64, True)
    move = shrinking.scale_down([window(s, idle=0.5)], situation(), True, "test")
    assert moved(move) == ("buffer_size", 4, -1)


@pytest.mark.parametrize(
    ("workers", "measured", "expected"),
    [
        # Cheap computing work on 37 idle threads: down to what its rate needs, at once.
        (37, {"idle": 0.9, "busy": 0.01}, ("parallelism", 1, -1)),
        (37, {"idle": 0.9, "busy": 0.05}, ("parallelism", 2, -1)),  # never past the cores
        (37, {"idle": 0.1, "busy": 0.01}, None),  # not idle: busy enough in its way
        (2, {"idle": 0.9, "busy": 0.01}, None),  # no more workers than cores
        # Idle all the window: no work seen, so nothing says it computes (a read that
        # stalls now and then, its buffer full in between).
        (16, {"idle": 1.0, "busy": 0.0, "cpu_share": None, "worked": 0}, None),
        # Waiting work (2 ms sleeps) keeps its calls in flight.
        (37, {"idle": 0.9, "busy": 0.01, "cpu_share": 0.02, "cores": 0.05}, None),
    ],
)
def test_shed_excess(
    workers: int, measured: dict[str, float], expected: tuple[str, int, int] | None
) -> None:
    w = window(stage(workers), **measured)
    assert moved(shrinking.shed_excess([w], situation())) == expected


def test_shed_excess_stops_at_a_floor_found_before() -> None:
    s = stage(37)
    w = window(s, idle=0.9, busy=0.01)
    assert shrinking.shed_excess([w], situation(floor_reached={s.key})) is None


@pytest.mark.parametrize(
    ("consumer_wait", "expected"), [(0.001, ("parallelism", 6, -1)), (0.01, None)]
)
def test_shed_spare(consumer_wait: float, expected: tuple[str, int, int] | None) -> None:
    w = window(stage(8), consumer_wait=consumer_wait, idle=0.4)
    assert moved(shrinking.shed_spare([w], situation())) == expected


@pytest.mark.parametrize(
    ("stall", "ages", "undone"),
    [
        (0.06, [4.5, 1.1, 0.2], [0.2, 1.1, 4.5]),  # a stall: every recent shrink, newest first
        (0.06, [6.0, 0.5], [0.5]),  # one kept long before is not to blame
        (0.005, [0.5], []),  # the consumer is served: nothing to take back
        (0.06, [], []),
    ],
)
def test_shrinks_to_undo(stall: float, ages: list[float], undone: list[float]) -> None:
    now = 100.0
    s = stage(16)
    shrinks = [Shrink(now - age, s, s.knobs["parallelism"], 16, 8) for age in ages]
    got = shrinking.shrinks_to_undo(shrinks, stall, now)
    assert [round(now - shrink.at, 3) for shrink in got] == undone


def test_hiccup_memory_doubles_up_to_its_ceiling() -> None:
    memory = HICCUP_MEMORY
    seen = []
    for _ in range(8):
        memory = shrinking.longer_hiccup_memory(memory)
        seen.append(memory)
    assert seen[:3] == [2 * HICCUP_MEMORY, 4 * HICCUP_MEMORY, 8 * HICCUP_MEMORY]
    assert max(seen) == seen[-1] == HICCUP_MEMORY_MAX


@pytest.mark.parametrize(
    ("workers", "measured", "saturated", "expected"),
    [
        (2, {"cores": 0.9}, True, ("parallelism", 1, -1)),  # saturated, fewer may keep it
        (2, {"cores": 1.9}, True, None),  # its workers need every core they have
        (2, {"cores": 0.9}, False, None),  # nothing says fewer would do
        # More computing workers than cores: fewer keep the rate.
        (64, {"cpu_share": 0.6, "cores": 1.0, "idle": 0.0}, False, ("parallelism", 48, -1)),
    ],
)
def test_fewer_after_more_failed(
    workers: int,
    measured: dict[str, float],
    saturated: bool,
    expected: tuple[str, int, int] | None,
) -> None:
    s = stage(workers)
    marks = {(s.key, "parallelism"): workers} if saturated else {}
    w = window(s, **{"busy": 0.9, **measured})
    assert moved(shrinking.fewer_after_more_failed([w], situation(saturated=marks))) == expected


@pytest.mark.parametrize(
    ("reader_waits", "before", "expected"),
    [
        (0.5, 0.1, ("parallelism", 32, +1)),  # its reader waits on it clearly more than before
        (0.5, 0.495, None),  # about as before
        (0.004, 0.0, None),  # hardly waited on
    ],
)
def test_chain_partner(
    reader_waits: float, before: float, expected: tuple[str, int, int] | None
) -> None:
    tried, partner = stage(8), stage(4)
    waiting = {"cpu_share": 0.01, "cores": 0.04}
    windows = [window(tried, **waiting), window(partner, consumer_wait=reader_waits, **waiting)]
    baseline_waits = {partner.key: before}
    move = policy.chain_partner(tried, "parallelism", 8, baseline_waits, windows, situation())
    assert moved(move) == expected
    if move is not None:
        assert move.stage is partner and "tried with it" in move.reason


def test_windows_with_no_work_read_as_computing() -> None:
    w = replace(window(stage()), cpu_share=None)
    assert w.computing_share == 1.0 and not policy.waits(w, situation())


def test_scale_up_grows_the_input_a_stage_waits_on_rather_than_the_stage() -> None:
    # Two maps of waiting work: the second's workers spend their time taking elements from
    # the first (input_wall), so the consumer's wait on it is the first one's doing.
    first, second = stage(4), stage(16)
    waiting = {"cpu_share": 0.02, "cores": 0.05, "cpu_per_element": 4e-5}
    windows = [
        window(second, consumer_wait=0.95, work_wall=0.1, input_wall=3.5, busy=0.03, **waiting),
        window(first, consumer_wait=0.8, busy=1.0, **waiting),
    ]
    proposal = policy.scale_up(windows, situation(cores_in_use=0.1))
    assert proposal.move is not None and proposal.move.stage is first
    assert policy.input_bound(windows[0]) and not policy.input_bound(windows[1])


@pytest.mark.parametrize(
    ("target", "wanted", "second_input_bound", "expected"),
    [
        # The budget holds the first at 1 of 16: the second, waiting on it, hands 15 over.
        (1, 16, True, ("parallelism", 33, -1)),
        (10, 16, True, None),  # held at more than half of what it wants: no hand-over
        (1, 16, False, None),  # the other stage's workers are busy with their own work
    ],
)
def test_give_way(
    target: int, wanted: int, second_input_bound: bool, expected: tuple[str, int, int] | None
) -> None:
    first, second = stage(0), stage(48)
    waiting = {"cpu_share": 0.02, "cores": 0.05, "cpu_per_element": 4e-5}
    took = {"work_wall": 0.1, "input_wall": 3.5} if second_input_bound else {}
    windows = [window(second, **took, **waiting), window(first, **waiting)]
    move = policy.give_way(windows[1], windows, target, wanted)
    assert moved(move) == expected
    assert move is None or (move.stage is second and move.hands_over)
