"""``feedline.ray.distribute`` on a local Ray (two CPUs, 127.0.0.1): the output equals the
local pipeline's, states resume exactly with any number of actors, a killed actor loses and
repeats nothing, a user error is the same ``StageError`` as locally."""

from __future__ import annotations

import io
import json
import os
import random
import signal
from typing import Any

import pytest

import feedline as fl
from feedline.errors import InvalidStateError, StageError
from tests.helpers import (
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
    take,
)
from tests.ray.conftest import actor_processes, wait_no_actors
from tests.ray.functions import (
    fails_at_7_and_30,
    noisy,
    not_multiple_of_3,
    slow,
    square,
    times_10,
    wait_10ms,
)

pytest.importorskip("ray")
import feedline.ray as flr
from feedline.ray.shards import ShardPlan

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120), pytest.mark.usefixtures("local_ray")]


def pipeline(n: int = 200) -> fl.Dataset:
    """A source, a map and a random map: one element to one, so shards read round robin
    give the local output."""
    return fl.Dataset.range(n).map(square, num_parallel_calls=2).random_map(noisy, seed=7)


def drain(it: Any) -> list[Any]:
    """Every element, and each error raised in its place, to the end."""
    out: list[Any] = []
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except StageError as e:
            out.append(e)


def describe(x: Any) -> Any:
    if isinstance(x, StageError):
        return (type(x).__name__, x.stage, x.position, x.message)
    return int(x)


def test_output_equals_local_at_fixed_workers() -> None:
    want = list(pipeline().batch(16))
    with pipeline().apply(flr.distribute(num_workers=2)).batch(16).iterator() as it:
        got = list(it)
        actors = flr.actors(it)
        report = it.report(file=io.StringIO())
    assert_elements_equal(got, want)
    assert "distribute" in report
    assert len(actors) == 2
    assert sum(a["elements"] for a in actors) == 200
    assert not wait_no_actors(), "actors left after close()"


def test_output_equals_local_when_tuned() -> None:
    """AUTOTUNE adds the second actor while the consumer waits (4 s of waiting work on one
    actor; the cluster has a CPU free), and the output is the local one all the same."""

    def make() -> fl.Dataset:
        return fl.Dataset.range(400).shuffle(64, seed=3).map(wait_10ms).random_map(noisy, seed=1)

    want = list(fl.Dataset.range(400).shuffle(64, seed=3).random_map(noisy, seed=1))
    with make().apply(flr.distribute(fl.AUTOTUNE, max_workers=2)).iterator() as it:
        got = list(it)
        history = flr.history(it)
    assert_elements_equal(got, want)
    grown = [e for e in history if (e["old"], e["new"]) == (1, 2)]
    assert grown and "consumer waits" in grown[0]["reason"], history


def test_not_one_to_one_keeps_the_elements() -> None:
    ds = fl.Dataset.range(100).filter(not_multiple_of_3).map(times_10)
    want = sorted(int(x) for x in ds)
    got = [int(x) for x in ds.apply(flr.distribute(num_workers=2, num_shards=8))]
    assert sorted(got) == want


def test_finishing_order_keeps_the_elements_and_resumes() -> None:
    ds = (
        fl.Dataset.range(120)
        .map(slow)
        .map(times_10)
        .apply(flr.distribute(num_workers=2, num_shards=6, deterministic=False))
    )
    with ds.iterator() as it:
        first = [int(x) for x in take(it, 50)]
        state = json.loads(json.dumps(it.get_state()))
    with ds.iterator(state) as it:
        rest = [int(x) for x in it]
    assert sorted(first + rest) == list(range(0, 1200, 10))


def test_user_error_is_the_local_stage_error() -> None:
    ds = fl.Dataset.range(40).map(fails_at_7_and_30)
    want = drain(ds.iterator())
    got = drain(ds.apply(flr.distribute(num_workers=2, num_shards=4)).iterator())
    assert [describe(x) for x in got] == [describe(x) for x in want]
    errors = [x for x in got if isinstance(x, StageError)]
    assert [e.position for e in errors] == [7, 30]
    cause = errors[0].__cause__
    assert isinstance(cause, ValueError)
    # The traceback of the actor, where the function raised.
    assert "fails_at_7_and_30" in str(cause.__cause__)


def test_state_round_trip_at_random_cut_points() -> None:
    cut = random.Random(os.getpid()).randrange(1, 199)
    assert_state_roundtrip(
        pipeline().apply(flr.distribute(num_workers=1, num_shards=8)), cut_points=(cut,)
    )
    assert not wait_no_actors(), "actors left after close()"


def test_state_resumes_with_another_number_of_actors() -> None:
    want = list(pipeline())
    with pipeline().apply(flr.distribute(num_workers=2, num_shards=8)).iterator() as it:
        first = take(it, 77)
        state = json.loads(json.dumps(it.get_state()))
        # Anew on two new actors, which Ray places as the two of the old pass stop.
        it.set_state(state)
        assert_elements_equal(first + list(it), want)
    with pipeline().apply(flr.distribute(num_workers=1, num_shards=8)).iterator(state) as it:
        rest = list(it)
    assert_elements_equal(first + rest, want)


def test_crafted_states_are_refused() -> None:
    ds = pipeline(40).apply(flr.distribute(num_workers=1, num_shards=4))
    state = saved_state(ds, 5)
    for field, value in (("num_shards", 5), ("cursor", 4), ("shards", [])):
        bad = json.loads(json.dumps(state))
        bad["root"][field] = value
        assert_state_rejected(ds, bad, field)
    bad = json.loads(json.dumps(state))
    bad["root"]["shards"][1]["skip"] = -1
    assert_state_rejected(ds, bad, "skip")
    # A shard's own state: its envelope is checked here.
    bad = json.loads(json.dumps(state))
    bad["root"]["shards"][2]["state"] = {"version": 1, "pipeline": ["other"], "root": {}}
    assert_state_rejected(ds, bad, "pipeline")
    # The rest of a shard's state is checked by the actor that opens it, before any element.
    bad = json.loads(json.dumps(state))
    names = ShardPlan(pipeline(40)._op, 4).shard_names(1)
    bad["root"]["shards"][1]["state"] = {"version": 1, "pipeline": names, "root": {"stage": {}}}
    with pytest.raises(InvalidStateError), ds.iterator(bad) as it:
        next(it)


@pytest.mark.timeout(90)
def test_killed_actor_loses_and_repeats_nothing() -> None:
    # ~0.8 s of work per actor: the kill comes while most of it is still to do.
    ds = fl.Dataset.range(800).map(slow).map(square)
    want = list(fl.Dataset.range(800).map(square))
    with ds.apply(flr.distribute(num_workers=2, num_shards=8)).iterator() as it:
        got = take(it, 60)
        victims = actor_processes()
        assert len(victims) == 2, victims
        os.kill(victims[0].pid, signal.SIGKILL)
        got += list(it)
        history = flr.history(it)
    assert not wait_no_actors(), "actors left after close()"
    assert_elements_equal(got, want)
    assert any("lost" in event["reason"] for event in history), history


def test_spec_and_cardinality_need_no_actors() -> None:
    ds = pipeline(10).apply(flr.distribute(num_workers=2))
    assert ds.element_spec == pipeline(10).element_spec
    assert ds.cardinality() == 10
    assert not wait_no_actors()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        flr.distribute(num_workers=0)
    with pytest.raises(ValueError):
        flr.distribute(num_workers=8, num_shards=4)
    with pytest.raises(TypeError):
        flr.distribute(address=5)  # type: ignore[arg-type]


def test_the_report_shows_each_actor() -> None:
    ds = fl.Dataset.range(40).map(lambda x: x * 2).apply(flr.distribute(num_workers=2))
    with ds.iterator() as it:
        assert [int(x) for x in it] == [2 * x for x in range(40)]
        text = it.report(file=io.StringIO())
        workers = next(s for s in it.stats()["stages"] if s["workers"])["workers"]
    assert len(workers) == 2 and {"node", "elements_per_s", "busy"} <= set(workers[0])
    assert sum(line.lstrip().startswith("actor=") for line in text.splitlines()) == 2
