"""map(timeout=): a call past its time limit fails its element, on processes and threads."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

import feedline as fl
from feedline.runtime.timeouts import CallTimeout
from tests.runtime.test_process import nothing_left_behind  # noqa: F401 (an autouse fixture)

D = fl.Dataset

# The limits are far above what the other elements' calls take (microseconds): a loaded
# machine that pauses a worker for a while must not fail those too.


def stuck_at_3(x: Any) -> Any:
    if int(x) == 3:
        time.sleep(60)
    if int(x) == 5:
        while True:  # pure Python that never returns
            pass
    return x


def deaf_at_2(x: Any) -> Any:
    """Native code that never looks at signals, as far as the timer can tell."""
    if int(x) == 2:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return x


@pytest.mark.timeout(60)
def test_a_worker_process_stops_a_call_past_its_timeout_and_fails_only_its_element() -> None:
    ds = D.range(8).map(stuck_at_3, num_parallel_calls=2, executor="process", timeout=1.5)
    out, errors = [], []
    with ds.iterator() as it:
        while True:
            try:
                out.append(int(next(it)))
            except StopIteration:
                break
            except fl.StageError as e:
                errors.append(e)
    assert out == [0, 1, 2, 4, 6, 7]
    assert [e.position for e in errors] == [3, 5]
    assert all(isinstance(e.__cause__, CallTimeout) for e in errors)
    assert "timeout=1.5" in str(errors[0])


@pytest.mark.timeout(60)
def test_ignore_errors_skips_elements_that_timed_out() -> None:
    ds = D.range(8).map(stuck_at_3, executor="process", timeout=1.5).ignore_errors()
    assert [int(x) for x in ds] == [0, 1, 2, 4, 6, 7]


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_be_interrupted_is_killed() -> None:
    ds = D.range(4).map(deaf_at_2, executor="process", timeout=1.5)
    got = []
    with ds.iterator() as it, pytest.raises(fl.StageCrashedError, match=r"killed|signal"):
        for x in it:
            got.append(int(x))
    # Elements sent with the stuck one in its chunk are lost with the worker (a restore
    # from the state after the error makes them again).
    assert got in ([0], [0, 1])


@pytest.mark.timeout(60)
def test_a_thread_fails_the_element_once_the_call_returns_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def slow_at_3(x: Any) -> Any:
        if int(x) == 3:
            time.sleep(2.0)
        return x

    ds = D.range(6).map(slow_at_3, num_parallel_calls=2, timeout=0.5).ignore_errors()
    with caplog.at_level("WARNING", logger="feedline"):
        assert [int(x) for x in ds] == [0, 1, 2, 4, 5]
    assert "cannot stop it" in caplog.text


@pytest.mark.timeout(60)
def test_random_map_takes_a_timeout_too() -> None:
    def draw(x: Any, rng: Any) -> Any:
        if int(x) == 1:
            time.sleep(2.0)
        return x

    ds = D.range(3).random_map(draw, seed=1, timeout=0.5).ignore_errors()
    assert [int(x) for x in ds] == [0, 2]


@pytest.mark.parametrize("bad", [0, -1, "1", True])
def test_a_timeout_must_be_a_positive_number(bad: Any) -> None:
    with pytest.raises(ValueError, match="timeout"):
        D.range(3).map(lambda x: x, timeout=bad)
