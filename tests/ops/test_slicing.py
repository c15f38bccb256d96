"""Position-based ops: take, skip, shard, repeat, enumerate.

Expected values follow tf.data (checked against TensorFlow 2.21 where the docs are silent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import (
    assert_elements_equal,
    assert_root_field_rejected,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
)

D = fl.Dataset
Spec = fl.TensorSpec
I64, STR = np.dtype(np.int64), np.dtype(object)
UNKNOWN, INFINITE = fl.UNKNOWN_CARDINALITY, fl.INFINITE_CARDINALITY
Build = Callable[[fl.Dataset], fl.Dataset]


def ints(ds: fl.Dataset) -> list[int]:
    return [int(x) for x in ds]


def unknown(n: int) -> fl.Dataset:
    """``range(n)`` with an unknown cardinality."""
    return D.range(n).filter(lambda x: True)


# -- take / skip ------------------------------------------------------------------------------

TAKE_SKIP: list[tuple[str, int, list[int], list[int]]] = [
    # op count, elements of take(count), elements of skip(count) over range(5)
    ("zero", 0, [], [0, 1, 2, 3, 4]),
    ("some", 2, [0, 1], [2, 3, 4]),
    ("all", 5, [0, 1, 2, 3, 4], []),
    ("more-than-all", 9, [0, 1, 2, 3, 4], []),
    ("minus-one", -1, [0, 1, 2, 3, 4], []),
]


@pytest.mark.parametrize(
    "count, want_take, want_skip",
    [case[1:] for case in TAKE_SKIP],
    ids=[case[0] for case in TAKE_SKIP],
)
def test_take_and_skip(count: int, want_take: list[int], want_skip: list[int]) -> None:
    taken, skipped = D.range(5).take(count), D.range(5).skip(count)
    assert ints(taken) == want_take
    assert ints(skipped) == want_skip
    assert taken.cardinality() == len(want_take)
    assert skipped.cardinality() == len(want_skip)
    assert taken.element_spec == skipped.element_spec == Spec((), I64)
    assert_state_roundtrip(taken)
    assert_state_roundtrip(skipped)


@pytest.mark.parametrize(
    "build, cardinality",
    [
        (lambda: D.range(3).repeat().take(4), 4),
        (lambda: D.range(3).repeat().take(-1), INFINITE),
        (lambda: D.range(3).repeat().skip(4), INFINITE),
        # tf.data keeps an infinite input infinite whatever is skipped.
        (lambda: D.range(3).repeat().skip(-1), INFINITE),
        (lambda: unknown(5).take(2), UNKNOWN),
        (lambda: unknown(5).take(0), UNKNOWN),
        (lambda: unknown(5).skip(2), UNKNOWN),
        (lambda: unknown(5).skip(-1), UNKNOWN),
    ],
    ids=[
        "inf-take",
        "inf-take-all",
        "inf-skip",
        "inf-skip-all",
        "unk-take",
        "unk-take-zero",
        "unk-skip",
        "unk-skip-all",
    ],
)
def test_take_and_skip_cardinality_of_infinite_and_unknown_inputs(
    build: Callable[[], fl.Dataset], cardinality: int
) -> None:
    assert build().cardinality() == cardinality


def test_take_of_an_infinite_input_and_skip_into_it() -> None:
    ds = D.range(3).repeat().skip(2).take(5)
    assert ints(ds) == [2, 0, 1, 2, 0]
    assert_state_roundtrip(ds)


def test_take_stops_without_reading_further() -> None:
    pulled = []

    def gen() -> Iterator[int]:
        for i in range(100):
            pulled.append(i)
            yield i

    assert ints(D.from_generator(gen).take(3)) == [0, 1, 2]
    assert pulled == [0, 1, 2]


def test_skip_state_roundtrip_after_the_skipped_part() -> None:
    ds = D.range(20).skip(7).batch(3)
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 4, 5))


# -- shard ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 9, 10])
@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_shards_partition_the_dataset_round_robin(n: int, num_shards: int) -> None:
    shards = [D.range(n).shard(num_shards, i) for i in range(num_shards)]
    for i, shard in enumerate(shards):
        assert ints(shard) == list(range(i, n, num_shards))
        assert shard.cardinality() == len(range(i, n, num_shards))
    assert sorted(x for shard in shards for x in ints(shard)) == list(range(n))


def test_shard_of_infinite_and_unknown_inputs() -> None:
    infinite = D.range(5).repeat().shard(2, 1)
    assert infinite.cardinality() == INFINITE
    assert ints(infinite.take(5)) == [1, 3, 0, 2, 4]
    assert unknown(7).shard(3, 2).cardinality() == UNKNOWN
    assert ints(unknown(7).shard(3, 2)) == [2, 5]


@pytest.mark.parametrize(
    "num_shards, index, error, message",
    [
        (3, 3, ValueError, r"index must be < num_shards \(3\), got 3"),
        (3, -1, ValueError, "index must be >= 0"),
        (0, 0, ValueError, "num_shards must be >= 1"),
        (2.0, 0, TypeError, "num_shards must be an int"),
        (2, None, TypeError, "index must be an int"),
    ],
    ids=["index-too-big", "index-negative", "no-shards", "float-shards", "none-index"],
)
def test_shard_validation(num_shards: Any, index: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        D.range(10).shard(num_shards, index)


@pytest.mark.parametrize("index", [0, 2])
def test_shard_state_roundtrip(index: int) -> None:
    ds = D.from_tensor_slices({"i": np.arange(20), "s": [str(i) for i in range(20)]})
    ds = ds.shard(3, index)
    assert ds.element_spec == {"i": Spec((), I64), "s": Spec((), STR)}
    assert_state_roundtrip(ds, cut_points=range(8))


# -- repeat -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, want, cardinality",
    [
        (0, [], 0),
        (1, [0, 1, 2], 3),
        (3, [0, 1, 2] * 3, 9),
    ],
    ids=["zero", "once", "three"],
)
def test_repeat_count(count: int, want: list[int], cardinality: int) -> None:
    ds = D.range(3).repeat(count)
    assert ints(ds) == want
    assert ds.cardinality() == cardinality
    assert ds.element_spec == Spec((), I64)
    # Cut at and around every epoch boundary.
    assert_state_roundtrip(ds, cut_points=range(len(want) + 1))


@pytest.mark.parametrize("count", [None, -1], ids=["none", "minus-one"])
def test_repeat_forever(count: int | None) -> None:
    ds = D.range(3).repeat(count)
    assert ds.cardinality() == INFINITE
    assert ints(ds.take(8)) == [0, 1, 2, 0, 1, 2, 0, 1]
    # cut point 0 is left out: tests.helpers.take(it, 0) never stops on an infinite pass.
    assert_state_roundtrip(ds, cut_points=(1, 2, 3, 4, 6, 7), limit=50)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "empty",
    [lambda: D.range(0), lambda: D.range(5).filter(lambda x: False), lambda: D.range(3).take(0)],
    ids=["empty-range", "filter-keeps-nothing", "take-zero"],
)
def test_repeat_forever_over_an_empty_dataset_terminates(
    empty: Callable[[], fl.Dataset],
) -> None:
    ds = empty().repeat()
    assert list(ds) == []
    assert_state_roundtrip(ds)


@pytest.mark.timeout(10)
def test_repeat_stops_at_the_first_empty_epoch() -> None:
    passes = []

    def shrinking() -> Iterator[int]:
        passes.append(1)
        yield from range(3 - len(passes))

    ds = D.from_generator(shrinking).repeat()
    assert ints(ds) == [0, 1, 0]
    assert len(passes) == 3


@pytest.mark.parametrize(
    "build, cardinality",
    [
        (lambda: D.range(0).repeat(), 0),
        (lambda: D.range(3).repeat(0), 0),
        (lambda: unknown(3).repeat(), INFINITE),
        (lambda: unknown(3).repeat(2), UNKNOWN),
        (lambda: D.range(3).repeat().repeat(2), INFINITE),
        (lambda: unknown(3).repeat(0), 0),
    ],
    ids=["empty-forever", "zero", "unknown-forever", "unknown-twice", "infinite-twice", "unk-0"],
)
def test_repeat_cardinality(build: Callable[[], fl.Dataset], cardinality: int) -> None:
    assert build().cardinality() == cardinality


def test_repeat_starts_a_fresh_pass_of_its_input_each_epoch() -> None:
    ds = D.range(4).shuffle(4, seed=1, reshuffle_each_iteration=True).repeat(3)
    one_pass = ints(ds)
    epochs = [one_pass[i : i + 4] for i in range(0, 12, 4)]
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs)
    assert_state_roundtrip(ds, cut_points=(0, 3, 4, 5, 8))


def test_repeat_of_batches_keeps_epochs_apart() -> None:
    ds = D.range(5).batch(2).repeat(2)
    assert [b.tolist() for b in ds] == [[0, 1], [2, 3], [4]] * 2
    assert_state_roundtrip(ds, cut_points=range(7))


# -- enumerate --------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 5, -2])
def test_enumerate_start(start: int) -> None:
    ds = D.from_tensor_slices(["a", "b", "c"]).enumerate(start)
    assert_elements_equal(
        list(ds), [(np.int64(start + i), s) for i, s in enumerate([b"a", b"b", b"c"])]
    )
    assert ds.element_spec == (Spec((), I64), Spec((), STR))
    assert ds.cardinality() == 3
    assert_state_roundtrip(ds)


def test_enumerate_counts_across_epochs_and_keeps_nesting() -> None:
    ds = D.from_tensor_slices(([1, 2], {"k": [3, 4]})).repeat(2).enumerate(10)
    got = list(ds)
    assert [int(i) for i, _ in got] == [10, 11, 12, 13]
    assert_elements_equal(
        [e for _, e in got],
        [(np.int32(a), {"k": np.int32(b)}) for a, b in [(1, 3), (2, 4)] * 2],
    )
    assert ds.cardinality() == 4
    assert_state_roundtrip(ds)


def test_enumerate_of_an_infinite_input() -> None:
    ds = D.range(2).repeat().enumerate()
    assert ds.cardinality() == INFINITE
    assert [(int(i), int(x)) for i, x in ds.take(3)] == [(0, 0), (1, 1), (2, 0)]
    assert_state_roundtrip(ds.batch(3), cut_points=(1, 2), limit=20)


# -- crafted states -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field, value",
    [
        (lambda: D.range(10).take(4), "taken", 5),
        (lambda: D.range(10).take(4), "taken", -1),
        (lambda: D.range(3).take(8), "taken", 4),  # past the input's end
        (lambda: D.range(10).skip(2), "skipped", 1),
        (lambda: D.range(10).shard(3, 1), "started", "yes"),
        (lambda: D.range(10).enumerate(5), "index", 4),  # below the start
        (lambda: D.range(10).enumerate(5), "index", 16),  # past the end
        (lambda: D.range(4).repeat(2), "epoch", 2),  # no epoch left, yet not done
        (lambda: D.range(4).repeat(2), "epoch", 3),
        (lambda: D.range(4).repeat(2), "epoch_produced", 5),
        (lambda: D.range(4).repeat(2), "done", True),  # done with an input still open
        (lambda: D.range(4).repeat(2), "input", None),  # an open input's state dropped
    ],
)
def test_state_with_a_bad_field_is_rejected(
    make: Callable[[], fl.Dataset], field: str, value: Any
) -> None:
    assert_root_field_rejected(make(), 1, field, value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: D.range(10).take(4),
        lambda: D.range(10).skip(2),
        lambda: D.range(10).shard(3, 1),
        lambda: D.range(10).enumerate(),
        lambda: D.range(10).repeat(2),
    ],
)
def test_an_input_state_replaced_by_none_is_rejected(make: Callable[[], fl.Dataset]) -> None:
    # None would have restarted the input from its beginning: a silently wrong pass.
    ds = make()
    state = saved_state(ds, 3)
    state["root"]["input"] = None
    assert_state_rejected(ds, state, "input")


def test_a_finished_repeat_state_must_hold_no_input() -> None:
    ds = D.range(3).repeat(2)
    state = saved_state(ds, 7)
    assert list(ds.iterator(state)) == []
    state["root"]["input"] = {"index": 0}
    assert_state_rejected(ds, state, "done")
