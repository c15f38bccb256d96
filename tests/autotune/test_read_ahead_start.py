"""A tuned prefetch chooses from its consumer's first calls whether to read ahead on a thread:
the rule as a table (no threads), then on real pipelines (where the knob went, never speed)."""

from __future__ import annotations

import time

import pytest

import feedline as fl
from feedline.runtime.stage.start import READ_AHEAD_CALLS, FirstCalls, choose_read_ahead
from tests.autotune.helpers import D, consume_for, stage


def calls(gap: float, pull: float, n: int = READ_AHEAD_CALLS) -> tuple[list[float], list[float]]:
    return [gap] * n, [pull] * n


@pytest.mark.parametrize(
    ("gap", "pull", "reads_ahead"),
    [
        (10e-3, 100e-6, True),  # a 10 ms training step waiting 1% on inline batching
        (2e-3, 0.5e-3, True),  # the step waits a fifth of its time
        (10e-3, 35e-6, True),  # 0.35%, but each call waits longer than a hand-off
        (10e-3, 20e-6, False),  # served (0.2%): a thread's hand-offs would cost as much
        (5e-6, 50e-6, False),  # a loop that only counts: nothing of its own to overlap
        (0.6e-3, 20e-3, False),  # the consumer waits 97% of the time: too little to gain
    ],
)
def test_reading_ahead_from_the_first_calls(gap: float, pull: float, reads_ahead: bool) -> None:
    chosen = choose_read_ahead(*calls(gap, pull))
    assert (chosen is not None) is reads_ahead
    if chosen is not None:
        value, reason = chosen
        assert value == 1 and "read ahead on a thread" in reason
        assert f"{gap * 1e3:.1f} ms apart" in reason


def test_one_slow_call_does_not_decide() -> None:
    # Medians: one call that waited on something else (a page fault, a GC pause) is not what
    # the consumer does.
    gaps, pulls = calls(10e-3, 20e-6)
    pulls[1] = 5e-3
    assert choose_read_ahead(gaps, pulls) is None
    gaps, pulls = calls(10e-3, 200e-6)
    gaps[0] = 1e-6
    assert choose_read_ahead(gaps, pulls) is not None


def test_the_first_call_is_not_a_gap() -> None:
    # The first call also starts the input: it is neither a gap nor a typical pull.
    first = FirstCalls()
    moments = [(0.0, 0.5), (0.6, 0.61), (0.7, 0.72), (0.8, 0.83), (0.9, 0.94)]
    enough = [first.add(started, ended) for started, ended in moments]
    assert enough == [False, False, False, False, True]
    assert first.gaps == pytest.approx([0.1, 0.09, 0.08, 0.07])
    assert first.pulls == pytest.approx([0.01, 0.02, 0.03, 0.04])


def slow_source(seconds: float) -> fl.Dataset:
    def pull(x: int) -> int:
        time.sleep(seconds)
        return x

    # A sequential map (no num_parallel_calls): the prefetch's pull runs it inline.
    return D.range(10**6).map(pull).prefetch(fl.AUTOTUNE)


@pytest.mark.timeout(60)
def test_a_consumer_with_work_of_its_own_gets_a_read_ahead_thread_from_its_first_calls() -> None:
    with slow_source(0.5e-3).iterator() as it:
        for _ in range(READ_AHEAD_CALLS + 1):
            next(it)
            time.sleep(5e-3)  # the training step
        prefetch = stage(it, "prefetch")
        # Chosen in the call that completed the watch, before any window of the tuner's.
        assert prefetch.knobs["parallelism"].value == 1
        assert prefetch.start_choice is not None
        assert "first calls came" in prefetch.start_choice.reason
        consume_for(it, 0.5, step=5e-3)
        history = it.stats()["autotune"]["history"]
    first = next(h for h in history if h["stage"].startswith("prefetch"))
    assert (first["knob"], first["old"], first["new"]) == ("parallelism", 0, 1), history
    assert "first calls came" in first["reason"], history


@pytest.mark.timeout(60)
def test_a_consumer_that_only_counts_keeps_the_prefetch_inline_at_the_start() -> None:
    with slow_source(0.2e-3).iterator() as it:
        for _ in range(READ_AHEAD_CALLS + 1):
            next(it)
        prefetch = stage(it, "prefetch")
        assert prefetch.knobs["parallelism"].value == 0
        assert prefetch.start_choice is None


@pytest.mark.timeout(60)
def test_a_later_epoch_starts_where_the_first_one_was_left() -> None:
    # Under repeat, the stage made for the next epoch inherits the knob: it does not watch
    # (nor start inline) again.
    ds = D.range(READ_AHEAD_CALLS + 2).map(lambda x: (time.sleep(0.5e-3), x)[1])
    ds = ds.prefetch(fl.AUTOTUNE).repeat(2)
    epoch = READ_AHEAD_CALLS + 2
    with ds.iterator() as it:
        got = []
        for x in it:
            got.append(int(x))
            time.sleep(5e-3)
            if len(got) == epoch + 1:  # the second epoch's stage is running
                prefetch = stage(it, "prefetch")
                assert prefetch.knobs["parallelism"].value == 1
                assert prefetch.start_choice is None  # it chose nothing: it inherited
    assert got == list(range(epoch)) * 2
