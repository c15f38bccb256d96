"""Element-wise ops: map, filter, take_while, ignore_errors.

Expected values follow tf.data (checked against TensorFlow 2.21 where the docs are silent).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import (
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
    take,
)

D = fl.Dataset
Spec = fl.TensorSpec
I32, I64, F32, STR, BOOL = (np.dtype(t) for t in (np.int32, np.int64, np.float32, object, bool))
Point = collections.namedtuple("Point", "x y")
PARALLELISM = pytest.mark.parametrize(
    "calls", [None, 2, fl.AUTOTUNE], ids=["inline", "parallel-2", "autotune"]
)


def ints(ds: fl.Dataset) -> list[int]:
    return [int(x) for x in ds]


def failing_at(*bad: int) -> Callable[[Any], Any]:
    """Identity, except that it raises ValueError for the values in ``bad``."""

    def check(x: Any) -> Any:
        if int(x) in bad:
            raise ValueError(f"bad value {int(x)}")
        return x

    return check


def drain(it: fl.DatasetIterator) -> list[Any]:
    """Every outcome of a pass: elements, and (position, cause type) for each error."""
    out: list[Any] = []
    while True:
        try:
            out.append(int(next(it)))
        except StopIteration:
            return out
        except fl.StageError as e:
            out.append((e.position, type(e.__cause__).__name__))


# -- map --------------------------------------------------------------------------------------


@PARALLELISM
def test_map_applies_the_function_in_order(calls: int | None) -> None:
    ds = D.range(50).map(lambda x: x * 3, num_parallel_calls=calls)
    assert ints(ds) == [3 * i for i in range(50)]
    assert ds.cardinality() == 50


@pytest.mark.parametrize(
    "ds, want",
    [
        # A plain tuple is unpacked into arguments...
        (D.from_tensor_slices(([1, 2], [10, 20])).map(lambda a, b: a + b), [11, 22]),
        # ...a dict and a namedtuple are passed as one argument, as tf.data does.
        (
            D.from_tensor_slices({"a": [1, 2], "b": [10, 20]}).map(lambda d: d["a"] * d["b"]),
            [10, 40],
        ),
        (D.from_tensor_slices(Point([1, 2], [10, 20])).map(lambda p: p.y - p.x), [9, 18]),
        (
            D.zip((D.range(2), (D.range(2), D.range(2)))).map(lambda a, bc: a + bc[0] + bc[1]),
            [0, 3],
        ),
    ],
    ids=["tuple", "dict", "namedtuple", "nested-tuple"],
)
def test_map_calling_convention(ds: fl.Dataset, want: list[int]) -> None:
    assert ints(ds) == want


@pytest.mark.parametrize(
    "fn, want, spec",
    [
        (lambda x: [x, x + 1], (np.int64(0), np.int64(1)), (Spec((), I64), Spec((), I64))),
        (
            lambda x: (1, 2.5, "s", True),
            (np.int32(1), np.float32(2.5), b"s", np.True_),
            (Spec((), I32), Spec((), F32), Spec((), STR), Spec((), BOOL)),
        ),
        (lambda x: 2**40, np.int64(2**40), Spec((), I64)),
        (
            lambda x: {"v": [1.0, 2.0], "n": "x"},
            {"v": np.array([1, 2], F32), "n": b"x"},
            {"v": Spec((2,), F32), "n": Spec((), STR)},
        ),
        (lambda x: Point(x, "p"), Point(np.int64(0), b"p"), Point(Spec((), I64), Spec((), STR))),
    ],
    ids=["list-is-tuple", "python-scalars", "big-int", "dict-of-list", "namedtuple"],
)
def test_map_converts_results_like_tf_data(fn: Callable[[Any], Any], want: Any, spec: Any) -> None:
    ds = D.range(1).map(fn)
    assert_elements_equal(list(ds), [want])
    assert ds.element_spec == spec


def test_map_cardinality_follows_its_input() -> None:
    assert D.range(3).repeat().map(abs).cardinality() == fl.INFINITE_CARDINALITY
    assert D.range(5).filter(bool).map(abs).cardinality() == fl.UNKNOWN_CARDINALITY


@PARALLELISM
def test_map_error_is_raised_at_its_position_after_earlier_elements(calls: int | None) -> None:
    def decode(x: Any) -> Any:
        return failing_at(2, 5)(x)

    with D.range(8).map(decode, num_parallel_calls=calls).iterator() as it:
        assert take(it, 2) == [0, 1]
        with pytest.raises(fl.StageError, match=r"'map\(decode\)' at element 2.*bad value 2"):
            next(it)
        # The failed element is dropped and the pass goes on, as with tf.data.
        assert drain(it) == [3, 4, (5, "ValueError"), 6, 7]


def test_map_name_appears_in_errors() -> None:
    ds = D.range(3).map(failing_at(1), name="decode")
    with pytest.raises(fl.StageError, match=r"'map\(decode\)' at element 1") as info:
        list(ds)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.stage == "map(decode)"


@PARALLELISM
def test_map_function_raising_stop_iteration_is_an_error_not_the_end(calls: int | None) -> None:
    def stop_at_3(x: Any) -> Any:
        if x == 3:
            raise StopIteration
        return x

    with D.range(6).map(stop_at_3, num_parallel_calls=calls).iterator() as it:
        assert drain(it) == [0, 1, 2, (3, "StopIteration"), 4, 5]


def test_map_error_inside_a_batch_drops_that_partial_batch() -> None:
    # tf.data (without map_and_batch fusion) behaves the same: the batch being built fails.
    with D.range(10).map(failing_at(5)).batch(4).iterator() as it:
        assert list(next(it)) == [0, 1, 2, 3]
        with pytest.raises(fl.StageError, match="element 5"):
            next(it)
        assert list(next(it)) == [6, 7, 8, 9]


@PARALLELISM
def test_map_state_roundtrip(calls: int | None) -> None:
    ds = D.range(30).map(lambda x: (x, [x, x]), num_parallel_calls=calls)
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 13, 29))


# -- filter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicate, want",
    [
        (lambda x: x % 3 == 0, [0, 3, 6, 9]),
        (lambda x: np.bool_(x > 7), [8, 9]),
        (lambda x: bool(x == 4), [4]),
        (lambda x: np.array(x < 2), [0, 1]),
        (lambda x: False, []),
    ],
    ids=["numpy-comparison", "np-bool", "python-bool", "0d-bool-array", "none-kept"],
)
def test_filter_keeps_elements_where_the_predicate_is_true(
    predicate: Callable[[Any], Any], want: list[int]
) -> None:
    ds = D.range(10).filter(predicate)
    assert ints(ds) == want
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY
    assert ds.element_spec == Spec((), I64)
    assert_state_roundtrip(ds)


def test_filter_unpacks_tuples() -> None:
    ds = D.from_tensor_slices(([1, 2, 3], ["a", "b", "c"])).filter(lambda n, s: n != 2)
    assert_elements_equal(list(ds), [(np.int32(1), b"a"), (np.int32(3), b"c")])


@pytest.mark.parametrize(
    "predicate",
    [lambda x: x, lambda x: np.array([True, False]), lambda x: None, lambda x: "yes"],
    ids=["int", "bool-vector", "none", "str"],
)
def test_filter_predicate_must_return_a_scalar_bool(predicate: Callable[[Any], Any]) -> None:
    with pytest.raises(fl.StageError, match="scalar bool") as info:
        list(D.range(3).filter(predicate))
    assert info.value.position == 0
    assert isinstance(info.value.__cause__, TypeError)


def test_filter_error_is_raised_after_the_kept_elements_before_it() -> None:
    def odd_or_fail(x: Any) -> Any:
        if x == 6:
            raise KeyError(x)
        return x % 2 == 1

    with D.range(10).filter(odd_or_fail).iterator() as it:
        assert drain(it) == [1, 3, 5, (6, "KeyError"), 7, 9]


def test_filter_over_repeat_of_sparse_matches_state_roundtrip() -> None:
    ds = D.range(7).repeat(3).filter(lambda x: x % 5 == 0)
    assert ints(ds) == [0, 5] * 3
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3, 4, 5))


def test_filter_of_an_infinite_input_has_unknown_cardinality() -> None:
    assert D.range(3).repeat().filter(bool).cardinality() == fl.UNKNOWN_CARDINALITY


# -- take_while -------------------------------------------------------------------------------


def test_take_while_stops_at_the_first_false_for_good() -> None:
    ds = D.from_tensor_slices([1, 2, 5, 1, 2]).take_while(lambda x: x < 3)
    assert ints(ds) == [1, 2]
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY
    assert ds.element_spec == Spec((), I32)
    assert_state_roundtrip(ds, cut_points=(0, 1, 2))


def test_take_while_over_an_infinite_input() -> None:
    ds = D.range(4).repeat().enumerate().take_while(lambda i, x: i < 6)
    assert_elements_equal(
        list(ds), [(np.int64(i), np.int64(x)) for i, x in enumerate([0, 1, 2, 3, 0, 1])]
    )
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY
    assert_state_roundtrip(ds)


def test_take_while_predicate_errors() -> None:
    with D.range(5).take_while(lambda x: failing_at(2)(x) < 10).iterator() as it:
        assert drain(it) == [0, 1, (2, "ValueError"), 3, 4]
    with pytest.raises(fl.StageError, match="scalar bool"):
        list(D.range(5).take_while(lambda x: x))


def test_take_while_predicate_raising_stop_iteration_is_an_error() -> None:
    def stop(x: Any) -> bool:
        raise StopIteration

    with pytest.raises(fl.StageError) as info:
        list(D.range(3).take_while(stop))
    assert isinstance(info.value.__cause__, StopIteration)


# -- ignore_errors ----------------------------------------------------------------------------


@PARALLELISM
def test_ignore_errors_drops_failing_elements_and_goes_on(calls: int | None) -> None:
    ds = D.range(7).map(failing_at(1, 2, 5), num_parallel_calls=calls).ignore_errors()
    assert ints(ds) == [0, 3, 4, 6]
    assert ds.element_spec == Spec((), I64)


@pytest.mark.parametrize(
    "build, want",
    [
        # The failing element takes its partial batch with it (tf.data without fusion).
        (lambda ds: ds.batch(2).ignore_errors(), [[3, 4], [6]]),
        (lambda ds: ds.ignore_errors().batch(2), [[0, 3], [4, 6]]),
        (lambda ds: ds.batch(2).ignore_errors().unbatch(), [3, 4, 6]),
    ],
    ids=["before-batch", "after-batch", "unbatched"],
)
def test_ignore_errors_around_batch(build: Callable[[fl.Dataset], fl.Dataset], want: Any) -> None:
    ds = build(D.range(7).map(failing_at(1, 2, 5)))
    assert [np.asarray(x).tolist() for x in ds] == want
    assert_state_roundtrip(ds)


def test_ignore_errors_skips_batches_that_fail_to_stack() -> None:
    # A source that declares any length: a map's check would fail element 4 itself.
    ds = (
        D.from_generator(
            lambda: (np.zeros(2 if x == 4 else 3) for x in range(10)),
            output_signature=fl.TensorSpec((None,), np.dtype(np.float64)),
        )
        .batch(2)
        .ignore_errors()
    )
    assert [len(b) for b in ds] == [2, 2, 2, 2]
    assert_state_roundtrip(ds)


def test_ignore_errors_counts_each_dropped_element_in_its_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds = D.range(12).map(failing_at(0, 4, 5, 11), name="parse").ignore_errors(log_warning=True)
    with caplog.at_level(logging.WARNING, logger="feedline"), ds.iterator() as it:
        assert [int(x) for x in it] == [1, 2, 3, 6, 7, 8, 9, 10]
        (stage,) = [s for s in it.stats()["stages"] if s["name"] == "map(parse)"]
    assert stage["errors"] == 4
    warnings = [r.getMessage() for r in caplog.records if "ignore_errors" in r.getMessage()]
    assert len(warnings) == 4
    for position, message in zip((0, 4, 5, 11), warnings):
        assert f"'map(parse)' at element {position}" in message


def test_ignore_errors_without_log_warning_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="feedline"):
        assert ints(D.range(4).map(failing_at(1)).ignore_errors()) == [0, 2, 3]
    assert not caplog.records


def test_ignore_errors_state_roundtrip_across_errors_and_epochs() -> None:
    ds = D.range(9).map(failing_at(0, 3, 4, 8)).ignore_errors().repeat(2)
    assert ints(ds) == [1, 2, 5, 6, 7] * 2
    assert_state_roundtrip(ds, cut_points=range(0, 11))


def test_ignore_errors_after_filter_and_take_while_errors() -> None:
    ds = (
        D.range(10)
        .filter(lambda x: failing_at(2)(x) % 2 == 0)
        .ignore_errors()
        .take_while(lambda x: failing_at(6)(x) < 9)
        .ignore_errors()
    )
    assert ints(ds) == [0, 4, 8]
    assert_state_roundtrip(ds)


def test_ignore_errors_cardinality_of_a_finite_input_is_unknown() -> None:
    assert D.range(3).ignore_errors().cardinality() == fl.UNKNOWN_CARDINALITY


def test_ignore_errors_of_an_infinite_input_has_unknown_cardinality() -> None:
    assert D.range(3).repeat().ignore_errors().cardinality() == fl.UNKNOWN_CARDINALITY


# -- crafted states -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, field",
    [
        # A chunk reaching past the input's end: read before as an ended pass.
        (lambda r: r["cursor"].update(consumed=30), "consumed"),
        (lambda r: r["cursor"].update(consumed=-1), "consumed"),
        (lambda r: r["cursor"].update(input=None), "input"),
        (lambda r: r.update(cursor=None), "cursor"),
        (lambda r: r.update(position="4"), "position"),
    ],
)
def test_filter_state_with_a_bad_field_is_rejected(
    edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    ds = D.range(20).filter(lambda x: x % 3 == 0)
    state = saved_state(ds, 2)
    edit(state["root"])
    assert_state_rejected(ds, state, field)


@pytest.mark.parametrize("field, value", [("done", 1), ("position", -1), ("input", None)])
def test_take_while_state_with_a_bad_field_is_rejected(field: str, value: Any) -> None:
    ds = D.range(20).take_while(lambda x: x < 9)
    state = saved_state(ds, 2)
    state["root"][field] = value
    assert_state_rejected(ds, state, field)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r["pass"].update(seed=3), "seed"),  # not the seed given
        (lambda r: r["pass"].update(epoch=-1), "epoch"),
        (lambda r: r.update(stage=None), "stage"),
        (lambda r: r.pop("pass"), "pass"),
    ],
)
def test_random_map_state_with_a_bad_pass_is_rejected(
    edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    ds = D.range(20).random_map(lambda x, rng: x + rng.integers(10), seed=2)
    state = saved_state(ds, 2)
    edit(state["root"])
    assert_state_rejected(ds, state, field)


def test_an_output_that_cannot_be_an_element_fails_only_its_element() -> None:
    # As parse_example gives a VarLenFeature of a batch: a list of rows in a dict.
    def ragged(x: Any) -> Any:
        rows = [np.zeros(2), np.zeros(3)] if int(x) == 1 else [np.zeros(2), np.zeros(2)]
        return {"rows": rows}

    with fl.Dataset.range(3).map(ragged).iterator() as it:
        assert np.shape(next(it)["rows"]) == (2, 2)
        with pytest.raises(fl.StageError, match="different lengths") as info:
            next(it)
        assert info.value.position == 1
        assert np.shape(next(it)["rows"]) == (2, 2)


def test_bytes_keep_their_trailing_nul_bytes() -> None:
    records = [b"ab\x00", b"c\x00\x00", b"d"]
    assert list(fl.Dataset.from_tensor_slices(records)) == records
    assert list(fl.Dataset.from_tensors(b"x\x00")) == [b"x\x00"]
    batch = next(iter(fl.Dataset.from_tensor_slices(records).batch(3)))
    assert list(batch) == records
