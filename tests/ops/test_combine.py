"""zip, concatenate, interleave and flat_map."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import (
    assert_elements_equal,
    assert_root_field_rejected,
    assert_state_roundtrip,
    take,
)

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
i64 = np.int64
INF, UNK = fl.INFINITE_CARDINALITY, fl.UNKNOWN_CARDINALITY
Pair = collections.namedtuple("Pair", ["a", "b"])


def ints(ds: fl.Dataset) -> list[int]:
    return [int(x) for x in ds]


# -- zip ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, want",
    [
        pytest.param(
            lambda: D.zip(D.range(3), D.range(10, 13)),
            [(i64(i), i64(10 + i)) for i in range(3)],
            id="args",
        ),
        pytest.param(
            lambda: D.zip((D.range(3), D.range(10, 13))),
            [(i64(i), i64(10 + i)) for i in range(3)],
            id="tuple",
        ),
        pytest.param(
            lambda: D.zip({"x": D.range(2), "y": D.from_tensor_slices(["a", "b"])}),
            [{"x": i64(0), "y": b"a"}, {"x": i64(1), "y": b"b"}],
            id="dict",
        ),
        pytest.param(
            lambda: D.zip((D.range(2), {"p": D.range(5, 7), "q": (D.range(2), D.range(9, 11))})),
            [
                (i64(0), {"p": i64(5), "q": (i64(0), i64(9))}),
                (i64(1), {"p": i64(6), "q": (i64(1), i64(10))}),
            ],
            id="nested",
        ),
        pytest.param(
            lambda: D.zip(Pair(D.range(2), D.range(3, 5))),
            [Pair(i64(0), i64(3)), Pair(i64(1), i64(4))],
            id="namedtuple",
        ),
        pytest.param(lambda: D.zip(D.range(2)), [i64(0), i64(1)], id="single"),
    ],
)
def test_zip_structures(make, want: list[Any]) -> None:
    ds = make()
    assert_elements_equal(list(ds), want)
    assert_state_roundtrip(ds)


def test_zip_element_spec_follows_the_nesting() -> None:
    ds = D.zip({"x": D.range(2), "y": (D.from_tensor_slices(np.zeros((2, 3), np.float32)),)})
    spec = fl.TensorSpec
    assert ds.element_spec == {
        "x": spec((), np.dtype(np.int64)),
        "y": (spec((3,), np.dtype(np.float32)),),
    }


def test_zip_stops_at_the_shortest() -> None:
    ds = D.zip(D.range(5), D.range(3).repeat(), D.range(100, 104))
    assert [tuple(int(v) for v in e) for e in ds] == [(i, i % 3, 100 + i) for i in range(4)]


@pytest.mark.parametrize(
    "cardinalities, want",
    [
        pytest.param(["3", "5"], 3, id="finite"),
        pytest.param(["inf", "inf"], INF, id="infinite"),
        pytest.param(["3", "unk"], UNK, id="unknown"),
        pytest.param(
            ["3", "inf"],
            3,
            id="finite-and-infinite",
        ),
        pytest.param(
            ["0", "unk"],
            UNK,
            id="empty-and-unknown",
        ),
    ],
)
def test_zip_cardinality(cardinalities: list[str], want: int) -> None:
    # Checked against tf.data 2.21's Dataset.zip(...).cardinality().
    def make(kind: str) -> fl.Dataset:
        if kind == "inf":
            return D.range(4).repeat()
        if kind == "unk":
            return D.range(4).filter(lambda x: True)
        return D.range(int(kind))

    assert D.zip(tuple(make(c) for c in cardinalities)).cardinality() == want


def test_zip_rejects_non_datasets() -> None:
    with pytest.raises(TypeError, match="zip takes datasets"):
        D.zip(D.range(3), [1, 2, 3])
    with pytest.raises(TypeError, match="at least one"):
        D.zip()


# -- concatenate ----------------------------------------------------------------------------


def test_concatenate_order_and_roundtrip() -> None:
    ds = D.range(3).concatenate(D.range(10, 12)).concatenate(D.range(20, 21))
    assert ints(ds) == [0, 1, 2, 10, 11, 20]
    assert_state_roundtrip(ds, cut_points=(0, 2, 3, 4, 5, 6))


def test_concatenate_merges_shapes_in_the_spec() -> None:
    a = D.from_tensor_slices(np.zeros((2, 3), np.float32))
    b = D.from_tensor_slices(np.ones((1, 4), np.float32))
    ds = a.concatenate(b)
    assert ds.element_spec == fl.TensorSpec((None,), np.dtype(np.float32))
    assert [e.shape for e in ds] == [(3,), (3,), (4,)]


def test_concatenate_of_different_ranks_has_an_unknown_shape() -> None:
    # tf.data 2.21 gives TensorSpec(shape=<unknown>, dtype=int64) here, not an error.
    ds = D.range(2).concatenate(D.from_tensor_slices(np.zeros((1, 2), np.int64)))
    assert ds.element_spec == fl.TensorSpec(None, np.dtype(np.int64))
    assert [np.shape(x) for x in ds] == [(), (), (2,)]


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: D.from_tensor_slices(np.array([1.0], np.float32)), id="dtype"),
        pytest.param(lambda: D.zip(D.range(1), D.range(1)), id="structure"),
        pytest.param(lambda: D.from_tensor_slices(["a"]), id="string"),
    ],
)
def test_concatenate_incompatible_specs_fail_at_build_time(other) -> None:
    with pytest.raises(TypeError, match="incompatible"):
        D.range(3).concatenate(other())


def test_concatenate_rejects_a_non_dataset() -> None:
    with pytest.raises(TypeError, match="concatenate takes a Dataset"):
        D.range(3).concatenate([1, 2])  # type: ignore[arg-type]


def test_concatenate_an_empty_mapped_dataset() -> None:
    assert ints(D.range(0).map(lambda x: x * 2).concatenate(D.range(3))) == [0, 1, 2]


@pytest.mark.parametrize(
    "a, b, want",
    [
        pytest.param(D.range(3), D.range(4), 7, id="finite"),
        pytest.param(D.range(3), D.range(4).repeat(), INF, id="infinite"),
        pytest.param(D.range(3).filter(lambda x: True), D.range(4).repeat(), INF, id="inf-unk"),
        pytest.param(D.range(3).filter(lambda x: True), D.range(4), UNK, id="unknown"),
    ],
)
def test_concatenate_cardinality(a: fl.Dataset, b: fl.Dataset, want: int) -> None:
    assert a.concatenate(b).cardinality() == want


# -- interleave -----------------------------------------------------------------------------

# Input element n opens range(10n, 11n): lengths 3, 0, 1, 4, 2, 0, 5 (two empty datasets).
# Expected orders are written from tf.data's rule (a slot opens the next input element when the
# cycle reaches it empty; an exhausted input empties its slot and the cycle moves on), and were
# confirmed against tf.data 2.21.
LENGTHS = [3, 0, 1, 4, 2, 0, 5]
INTERLEAVE_CASES = [
    (2, 1, [30, 31, 10, 32, 40, 20, 41, 21, 42, 43, 50, 51, 52, 53, 54]),
    (3, 1, [30, 10, 31, 40, 32, 41, 20, 42, 21, 43, 50, 51, 52, 53, 54]),
    (4, 1, [30, 10, 40, 31, 20, 41, 32, 21, 42, 50, 43, 51, 52, 53, 54]),
    (3, 2, [30, 31, 10, 32, 40, 41, 20, 21, 42, 43, 50, 51, 52, 53, 54]),
    (2, 3, [30, 31, 32, 10, 40, 41, 42, 20, 21, 43, 50, 51, 52, 53, 54]),
    (1, 2, [30, 31, 32, 10, 40, 41, 42, 43, 20, 21, 50, 51, 52, 53, 54]),
    (10, 2, [30, 31, 10, 40, 41, 20, 21, 50, 51, 32, 42, 43, 52, 53, 54]),
]


def lengths_interleave(cycle: int, block: int) -> fl.Dataset:
    source = D.from_tensor_slices(np.array(LENGTHS, np.int64))
    return source.interleave(
        lambda n: D.range(10 * n, 11 * n), cycle_length=cycle, block_length=block
    )


@pytest.mark.parametrize("cycle, block, want", INTERLEAVE_CASES)
def test_interleave_order_matches_tf_data(cycle: int, block: int, want: list[int]) -> None:
    ds = lengths_interleave(cycle, block)
    assert ints(ds) == want
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3, 4, 5, 7, 9, 11))


@pytest.mark.parametrize(
    "cycle, block, want",
    [(2, 1, [0, 10, 1, 2, 20, 3, 30, 40, 41, 42]), (3, 2, [0, 1, 10, 20, 2, 3, 30, 40, 41, 42])],
)
def test_interleave_unpacks_tuple_elements(cycle: int, block: int, want: list[int]) -> None:
    # Also confirmed against tf.data 2.21: input i opens range(length_i) shifted by 10*i.
    source = D.from_tensor_slices(np.array([4, 1, 1, 1, 3], np.int64)).enumerate()
    ds = source.interleave(
        lambda i, n: D.range(n).map(lambda x: x + 10 * i), cycle_length=cycle, block_length=block
    )
    assert ints(ds) == want


def test_interleave_opens_inputs_only_when_the_cycle_reaches_them() -> None:
    opened: list[int] = []

    def open_range(n: Any) -> fl.Dataset:
        opened.append(int(n))
        return D.range(n)

    ds = D.from_tensor_slices(np.array([2, 2, 2, 2], np.int64)).interleave(
        open_range, cycle_length=3, block_length=2
    )
    with ds.iterator() as it:
        take(it, 1)
        assert len(opened) == 1
        take(it, 2)
        assert len(opened) == 2


def test_interleave_with_cycle_one_is_flat_map() -> None:
    source = D.from_tensor_slices(np.array(LENGTHS, np.int64))

    def fn(n: Any) -> fl.Dataset:
        return D.range(10 * n, 11 * n)

    want = [v for n in LENGTHS for v in range(10 * n, 11 * n)]
    assert ints(source.interleave(fn, cycle_length=1, block_length=3)) == want
    assert ints(source.flat_map(fn)) == want


def test_flat_map_roundtrip_and_nested_datasets() -> None:
    ds = D.range(1, 5).flat_map(lambda n: D.range(n).map(lambda x: (n, x)))
    assert [(int(a), int(b)) for a, b in ds] == [(n, x) for n in range(1, 5) for x in range(n)]
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3, 5, 6, 9))


@pytest.mark.parametrize("method", ["flat_map", "interleave"])
def test_function_returning_a_non_dataset_is_a_clear_error(method: str) -> None:
    ds = getattr(D.range(3), method)(lambda x: [x, x])
    with pytest.raises(fl.StageError, match="must return a Dataset, got list") as info:
        list(ds)
    assert info.value.position == 0


@pytest.mark.parametrize(
    "apply",
    [
        pytest.param(lambda ds, fn: ds.flat_map(fn), id="flat_map"),
        pytest.param(lambda ds, fn: ds.interleave(fn, cycle_length=2), id="interleave"),
    ],
)
def test_function_error_names_the_stage_and_keeps_the_cause(apply) -> None:
    def opener(x: Any) -> fl.Dataset:
        if x == 2:
            raise KeyError("no such shard")
        return D.range(1)

    with pytest.raises(fl.StageError, match="no such shard") as info:
        list(apply(D.range(4), opener))
    assert info.value.position == 2
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"cycle_length": 0}, ValueError),
        ({"block_length": 0}, ValueError),
        ({"cycle_length": True}, TypeError),
        ({"num_parallel_calls": 0}, ValueError),
    ],
)
def test_interleave_bad_arguments_fail_at_build_time(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        D.range(3).interleave(lambda x: D.range(x), **kwargs)


def test_interleave_of_an_infinite_input_over_finite_datasets() -> None:
    ds = D.range(3).repeat().interleave(lambda n: D.range(n), cycle_length=2, block_length=1)
    # Inputs 0, 1, 2, 0, 1, 2, ... open range(0), range(1), range(2), ...
    assert ints(ds.take(6)) == [0, 0, 1, 0, 0, 1]


# -- errors, crashes and states -----------------------------------------------------------------


class Stop(BaseException):
    """Stops the worker thread that meets it, as a crash would (a StageCrashedError)."""


def crash_once(at: int) -> Any:
    """A function for a map on worker threads that crashes its stage at element ``at``, the
    first pass only."""
    fired: list[bool] = []

    def fn(x: Any) -> Any:
        if int(x) == at and not fired:
            fired.append(True)
            raise Stop
        return x

    return fn


def fails_at(*bad: int) -> Any:
    def fn(x: Any) -> Any:
        if int(x) in bad:
            raise ValueError(f"bad {int(x)}")
        return x

    return fn


def untuned(ds: fl.Dataset) -> fl.Dataset:
    options = fl.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def pairs(ds: fl.Dataset) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in row) for row in ds]


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_zip_inputs_stay_in_step_after_an_element_error(failing: int) -> None:
    # Whichever input fails, its row is the error and the next row is aligned again.
    inputs = [D.range(100 * k, 100 * k + 10) for k in range(3)]
    inputs[failing] = inputs[failing].map(fails_at(100 * failing + 4, 100 * failing + 7))
    ds = D.zip(tuple(inputs))
    want = [(x, 100 + x, 200 + x) for x in range(10) if x not in (4, 7)]
    assert pairs(ds.ignore_errors()) == want
    with ds.iterator() as it:
        assert len(take(it, 4)) == 4
        with pytest.raises(fl.StageError, match="bad"):
            next(it)
        state = it.get_state()
    with ds.iterator(state) as rest:
        assert rows_skipping_errors(rest) == want[4:]


def rows_skipping_errors(it: Any) -> list[tuple[int, ...]]:
    rows = []
    while True:
        try:
            rows.append(tuple(int(v) for v in next(it)))
        except StopIteration:
            return rows
        except fl.StageError:
            continue


def test_zip_errors_in_several_inputs_of_one_row_fail_that_row_once() -> None:
    ds = D.zip(D.range(6).map(fails_at(2)), D.range(6).map(fails_at(2, 3)))
    assert pairs(ds.ignore_errors()) == [(0, 0), (1, 1), (4, 4), (5, 5)]


def test_zip_state_after_a_crash_resumes_in_step() -> None:
    def build() -> fl.Dataset:
        crashing = D.range(30).map(crash_once(13), num_parallel_calls=2)
        return untuned(D.zip(D.range(30), crashing, D.range(100, 130)))

    ds = build()
    got: list[tuple[int, ...]] = []
    with ds.iterator() as it:
        with pytest.raises(fl.StageCrashedError):
            for row in it:
                got.append(tuple(int(v) for v in row))
        state = it.get_state()
    with ds.iterator(state) as rest:
        got += pairs(rest)
    assert got == [(x, x, 100 + x) for x in range(30)]


def test_concatenate_that_fails_to_start_its_second_input_tries_again() -> None:
    second = D.range(10, 13)
    ds = D.range(3).concatenate(second)
    make_iterator = second._op.make_iterator
    failures = [OSError("not yet")]

    def failing_once(ctx: Any, state: Any) -> Any:
        if failures:
            raise failures.pop()
        return make_iterator(ctx, state)

    second._op.make_iterator = failing_once  # type: ignore[method-assign]
    with ds.iterator() as it:
        assert [int(x) for x in take(it, 3)] == [0, 1, 2]
        with pytest.raises(OSError, match="not yet"):
            next(it)
        assert [int(x) for x in it] == [10, 11, 12]


def test_interleave_after_a_crash_ends_the_pass_and_resumes_with_the_rest() -> None:
    def build() -> fl.Dataset:
        crash = crash_once(15)
        return untuned(
            D.range(5).interleave(
                lambda i: D.range(10 * i, 10 * i + 10).map(crash, num_parallel_calls=2),
                cycle_length=2,
            )
        )

    ds = build()
    got: list[int] = []
    with ds.iterator() as it:
        with pytest.raises(fl.StageCrashedError):
            for x in it:
                got.append(int(x))
        state = it.get_state()
        # The crashed slot must not pass for one that ended: nothing more comes.
        assert list(it) == []
    with ds.iterator(state) as rest:
        got += ints_of(rest)
    assert sorted(got) == list(range(50))


def ints_of(it: Any) -> list[int]:
    return [int(x) for x in it]


def test_interleave_state_after_an_opening_cut_short_opens_that_element_again() -> None:
    interrupted: list[bool] = []

    def opener(i: Any) -> fl.Dataset:
        if int(i) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return D.range(10 * int(i), 10 * int(i) + 3)

    ds = D.range(4).interleave(opener, cycle_length=2)
    with ds.iterator() as it:
        got = ints_of(take(it, 6))  # 0, 10, 1, 11, 2, 12: input element 2 opens next
        with pytest.raises(KeyboardInterrupt):
            next(it)
        state = it.get_state()
    with ds.iterator(state) as resumed:
        got += ints_of(resumed)
    assert got == ints(D.range(4).interleave(lambda i: D.range(10 * i, 10 * i + 3), cycle_length=2))


@pytest.mark.parametrize(
    "make, field, value",
    [
        (lambda: D.zip(D.range(5), D.range(5)), "inputs", []),
        (lambda: D.zip(D.range(5), D.range(5)), "owed", [2]),
        (lambda: D.zip(D.range(5), D.range(5)), "owed", [1, 1]),
        (lambda: D.range(3).concatenate(D.range(3)), "which", 3),
        (lambda: D.range(3).concatenate(D.range(3)), "input", None),
        (lambda: lengths_interleave(2, 1), "read", 8),  # past the input's end
        (lambda: lengths_interleave(2, 1), "read", -1),
        (lambda: lengths_interleave(2, 1), "input_done", 0),
        (lambda: lengths_interleave(2, 1), "cycle_index", 2),
        (lambda: lengths_interleave(2, 1), "block_index", 2),
        (lambda: lengths_interleave(2, 1), "slots", [[0, None]]),  # one slot for two
        (lambda: lengths_interleave(2, 1), "slots", [[5, {}], [None, None]]),  # not read yet
        (lambda: lengths_interleave(2, 1), "slots", [[0, {}], [0, {}]]),  # opened twice
        (lambda: lengths_interleave(2, 1), "input_start", None),
    ],
)
def test_state_with_a_bad_field_is_rejected(make: Any, field: str, value: Any) -> None:
    assert_root_field_rejected(make(), 2, field, value)
