"""The rule for the number of actors, as a table: each row a window and the move expected."""

from __future__ import annotations

import pytest

from feedline.ray.tuning import ActorWindow, actor_move

ROWS = [
    # (consumer_wait, busy per actor, starting, free CPUs, most) -> actors, or None
    pytest.param(0.5, [0.95], 0, 4.0, 8, 2, id="waits, busy, cpus free: one more"),
    pytest.param(0.5, [0.9, 0.9, 0.9], 0, 1.0, 8, 4, id="one CPU free is enough"),
    pytest.param(0.5, [0.95, 0.9], 0, 0.0, 8, None, id="no CPU free: stays"),
    pytest.param(0.5, [0.95, 0.9], 0, 0.5, 8, None, id="half a CPU: stays"),
    pytest.param(0.5, [0.9, 0.9], 0, 4.0, 2, None, id="at most: stays"),
    pytest.param(0.5, [0.2, 0.3], 0, 4.0, 8, None, id="actors wait too: not theirs"),
    pytest.param(0.5, [0.95], 1, 4.0, 8, None, id="one starting: wait for it"),
    pytest.param(0.5, [], 2, 4.0, 8, None, id="none up yet"),
    pytest.param(0.0, [0.3, 0.3, 0.3], 0, 0.0, 8, 2, id="served, idle: one fewer"),
    pytest.param(0.0, [0.7, 0.7], 0, 0.0, 8, None, id="served, busy: keep"),
    pytest.param(0.0, [0.1], 0, 0.0, 8, None, id="never below one"),
    pytest.param(0.008, [0.1, 0.1], 0, 0.0, 8, None, id="between stall and served: keep"),
]


@pytest.mark.parametrize(("wait", "busy", "starting", "free", "most", "want"), ROWS)
def test_actor_move(
    wait: float, busy: list[float], starting: int, free: float, most: int, want: int | None
) -> None:
    move = actor_move(ActorWindow(wait, busy, starting, free, most))
    assert (None if move is None else move.actors) == want
    if move is not None:
        assert move.reason
