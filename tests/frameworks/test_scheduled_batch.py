"""``batch(schedule=...)``: batch sizes that follow the elements seen, exactly and resumably."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

import feedline as fl
from feedline.errors import StageError
from tests.helpers import (
    assert_elements_equal,
    assert_root_field_rejected,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
)

RAMP = [(0, 2), (10, 5), (30, 16)]


def expected_sizes(n: int, size_at: object, drop_remainder: bool = False) -> list[int]:
    """The reference: each batch's size is the schedule's at the elements batched before it."""
    sizes, seen = [], 0
    while seen < n:
        size = size_at(seen)  # type: ignore[operator]
        if seen + size > n and drop_remainder:
            break
        sizes.append(min(size, n - seen))
        seen += size
    return sizes


def ramp_size(seen: int) -> int:
    return [size for start, size in RAMP if start <= seen][-1]


@pytest.mark.parametrize("drop_remainder", [False, True])
@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 29, 30, 100, 101])
def test_sizes_follow_the_schedule_and_nothing_is_lost(n: int, drop_remainder: bool) -> None:
    ds = fl.Dataset.range(n).batch(3, drop_remainder, schedule=RAMP)
    batches = list(ds)
    assert [len(b) for b in batches] == expected_sizes(n, ramp_size, drop_remainder)
    got = np.concatenate(batches) if batches else np.array([], np.int64)
    np.testing.assert_array_equal(got, np.arange(len(got)))
    assert all(b.dtype == np.int64 for b in batches)
    assert ds.cardinality() == len(batches)


def test_batch_size_holds_before_the_first_step() -> None:
    ds = fl.Dataset.range(20).batch(4, schedule=[(8, 6)])
    assert [len(b) for b in ds] == [4, 4, 6, 6]


def test_a_function_schedule() -> None:
    def grow(seen: int) -> int:
        return 1 + seen // 10

    ds = fl.Dataset.range(60).batch(1, schedule=grow)
    assert [len(b) for b in ds] == expected_sizes(60, grow)
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY
    assert "grow" in repr(ds)


def test_random_schedules_match_the_reference_and_their_cardinality() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        starts = sorted(set(rng.integers(0, 200, size=rng.integers(1, 5)).tolist()))
        steps = [(s, int(rng.integers(1, 40))) for s in starts]
        first = int(rng.integers(1, 10))
        n, drop = int(rng.integers(0, 400)), bool(rng.integers(2))

        def size_at(seen: int, steps: list[tuple[int, int]] = steps, first: int = first) -> int:
            return ([first] + [size for start, size in steps if start <= seen])[-1]

        ds = fl.Dataset.range(n).batch(first, drop, schedule=steps)
        sizes = [len(b) for b in ds]
        assert sizes == expected_sizes(n, size_at, drop), (steps, first, n, drop)
        assert ds.cardinality() == len(sizes)


def test_element_spec_has_an_unknown_batch_dimension() -> None:
    ds = fl.Dataset.from_tensor_slices({"x": np.zeros((10, 3), np.float32)})
    spec = ds.batch(2, drop_remainder=True, schedule=RAMP).element_spec
    assert spec["x"] == fl.TensorSpec((None, 3), np.float32)
    assert fl.Dataset.range(3).repeat().batch(2, schedule=RAMP).cardinality() == -1


def test_nested_and_string_elements() -> None:
    ds = fl.Dataset.from_tensor_slices(
        (np.arange(7), np.array([b"a", b"b", b"c", b"d", b"e", b"f", b"g"], dtype=object))
    ).batch(1, schedule=[(0, 3)])
    numbers, strings = zip(*ds)
    assert [len(x) for x in numbers] == [3, 3, 1]
    assert strings[0].tolist() == [b"a", b"b", b"c"]


@pytest.mark.parametrize("schedule", [RAMP, ramp_size])
def test_a_restore_mid_ramp_gives_the_same_batches(schedule: object) -> None:
    ds = fl.Dataset.range(80).shuffle(16, seed=3).batch(2, schedule=schedule)
    assert_state_roundtrip(ds, cut_points=(0, 1, 4, 5, 6, 8, 9, 10))


def test_sizes_are_the_same_under_autotune_and_on_every_pass() -> None:
    plain = fl.Dataset.range(200).batch(1, schedule=RAMP)
    tuned = (
        fl.Dataset.range(200)
        .map(lambda x: x + 0, num_parallel_calls=fl.AUTOTUNE)
        .batch(1, schedule=RAMP)
        .prefetch(fl.AUTOTUNE)
    )
    want = list(plain)
    for _ in range(2):
        with tuned.iterator() as it:
            assert_elements_equal(list(it), want)
            knobs = [s["knobs"] for s in it.stats()["stages"]]
    assert not any("batch_size" in k for k in knobs)  # nothing the tuner could change


def test_the_report_shows_the_schedule() -> None:
    ds = fl.Dataset.range(40).batch(1, schedule=RAMP)
    with ds.iterator() as it:
        list(it)
        report = it.report(file=io.StringIO())
    assert "batch(schedule=0:2, 10:5, 30:16)" in report
    assert "batch sizes: 2 from element 0, 5 from element 10, 16 from element 30" in report


def test_crafted_states_are_refused() -> None:
    ds = fl.Dataset.range(50).batch(1, schedule=RAMP)
    assert_root_field_rejected(ds, 3, "seen", 51)
    assert_root_field_rejected(ds, 3, "seen", -1)
    assert_root_field_rejected(ds, 3, "seen", True)
    # A state saved under another schedule is another pipeline's.
    other = fl.Dataset.range(50).batch(1, schedule=[(0, 2), (10, 6)])
    assert_state_rejected(other, saved_state(ds, 3), "pipeline")


@pytest.mark.parametrize(
    ("schedule", "error"),
    [
        ([], ValueError),
        ([(0, 0)], ValueError),
        ([(5, 2), (5, 3)], ValueError),
        ([(5, 2), (1, 3)], ValueError),
        ([(0, 2.5)], TypeError),
        ([(-1, 2)], ValueError),
        ([(0, 2, 3)], ValueError),
        ([3], ValueError),
    ],
)
def test_bad_schedules_fail_where_written(schedule: object, error: type) -> None:
    with pytest.raises(error):
        fl.Dataset.range(5).batch(2, schedule=schedule)


@pytest.mark.parametrize("bad", [0, -2, 2.0, None, True])
def test_a_function_returning_no_size_fails_its_batch(bad: object) -> None:
    ds = fl.Dataset.range(10).batch(2, schedule=lambda seen: 2 if seen < 4 else bad)
    with ds.iterator() as it:
        assert [len(b) for b in itertools.islice(it, 2)] == [2, 2]
        with pytest.raises(StageError, match="not a batch size"):
            next(it)
