"""window: tf.data's windows (each a dataset), cardinality, specs and resumable state.

Expected values were checked against tf.data 2.21.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.ops.in_memory import DatasetSpec
from tests.helpers import (
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
    take,
)

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
i64 = np.int64
INF, UNK = fl.INFINITE_CARDINALITY, fl.UNKNOWN_CARDINALITY
Point = collections.namedtuple("Point", ["x", "y"])


def windows(ds: fl.Dataset) -> list[list[int]]:
    return [[int(v) for v in w] for w in ds]


@pytest.mark.parametrize(
    "n, args, kwargs, want",
    [
        pytest.param(
            7,
            (3,),
            {"shift": 1, "stride": 2},
            [[0, 2, 4], [1, 3, 5], [2, 4, 6], [3, 5], [4, 6], [5], [6]],
            id="stride",
        ),
        pytest.param(5, (3, 1), {}, [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4], [4]], id="shift1"),
        pytest.param(7, (2, 5), {}, [[0, 1], [5, 6]], id="shift_past_span"),
        pytest.param(6, (2, 5), {}, [[0, 1], [5]], id="shift_past_span_short"),
        pytest.param(
            7, (3, 2), {"drop_remainder": True}, [[0, 1, 2], [2, 3, 4], [4, 5, 6]], id="drop"
        ),
        pytest.param(7, (3,), {}, [[0, 1, 2], [3, 4, 5], [6]], id="default_shift"),
        pytest.param(
            10, (4, 3, 2), {"drop_remainder": True}, [[0, 2, 4, 6], [3, 5, 7, 9]], id="drop_stride"
        ),
        pytest.param(0, (2,), {}, [], id="empty"),
        pytest.param(2, (3,), {"drop_remainder": True}, [], id="too_short_to_drop"),
    ],
)
def test_windows_match_tf_data(n: int, args: tuple[int, ...], kwargs: Any, want: Any) -> None:
    ds = D.range(n).window(*args, **kwargs)
    assert windows(ds) == want
    assert ds.cardinality() == len(want)


def test_each_window_is_a_finite_dataset_of_the_input_spec() -> None:
    ds = D.range(7).window(3)
    assert ds.element_spec == DatasetSpec(fl.TensorSpec((), np.dtype(np.int64)))
    assert [w.cardinality() for w in ds] == [3, 3, 1]
    assert all(isinstance(w, fl.Dataset) for w in ds)


def test_ragged_input_spec_is_kept_in_the_window_spec() -> None:
    ds = D.range(7).batch(3).window(2)
    assert ds.element_spec == DatasetSpec(fl.TensorSpec((None,), np.dtype(np.int64)))


def test_nested_elements_give_a_nest_of_datasets() -> None:
    ds = D.from_tensor_slices({"b": (["x", "y", "z"], [1.0, 2.0, 3.0]), "a": [1, 2, 3]}).window(2)
    spec = ds.element_spec
    assert list(spec) == ["b", "a"]  # tf.data keeps the element's key order
    assert spec["a"] == DatasetSpec(fl.TensorSpec((), np.dtype(np.int32)))
    assert spec["b"][0] == DatasetSpec(fl.TensorSpec((), np.dtype(object)))
    first = next(iter(ds))
    assert [int(v) for v in first["a"]] == [1, 2]
    assert list(first["b"][0]) == [b"x", b"y"]
    flat = list(ds.flat_map(lambda d: D.zip(d)))
    assert_elements_equal(
        flat,
        [
            {"b": (b"x", np.float32(1)), "a": np.int32(1)},
            {"b": (b"y", np.float32(2)), "a": np.int32(2)},
            {"b": (b"z", np.float32(3)), "a": np.int32(3)},
        ],
    )


def test_tuple_windows_are_passed_as_separate_arguments() -> None:
    ds = D.zip(D.range(3), D.range(10, 13)).window(2).flat_map(lambda a, b: D.zip(a, b))
    assert_elements_equal(list(ds), [(i64(i), i64(10 + i)) for i in range(3)])


def test_namedtuple_elements_give_a_namedtuple_of_datasets() -> None:
    ds = D.from_tensor_slices(Point(np.arange(4), np.arange(4) * 2)).window(3)
    first = next(iter(ds))
    assert isinstance(first, Point)
    assert [int(v) for v in first.y] == [0, 2, 4]


@pytest.mark.parametrize(
    "make, want",
    [
        pytest.param(lambda: D.range(3).repeat().window(2), INF, id="infinite"),
        pytest.param(lambda: D.range(3).filter(lambda x: True).window(2), UNK, id="unknown"),
        pytest.param(lambda: D.range(10).window(4, 3), 4, id="finite"),
        pytest.param(lambda: D.range(3).window(5, drop_remainder=True), 0, id="drop_all"),
    ],
)
def test_cardinality(make: Any, want: int) -> None:
    assert make().cardinality() == want


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"size": 0}, ValueError),
        ({"size": 2, "shift": 0}, ValueError),
        ({"size": 2, "stride": -1}, ValueError),
        ({"size": 2.5}, TypeError),
        ({"size": 2, "shift": "1"}, TypeError),
    ],
)
def test_bad_arguments_fail_at_build_time(kwargs: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        D.range(3).window(**kwargs)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: D.range(9).window(3, 1, 2).flat_map(lambda w: w.batch(3)), id="stride"
        ),
        pytest.param(lambda: D.range(12).window(2, 5).flat_map(lambda w: w), id="skip"),
        pytest.param(
            lambda: D.range(10).window(3, 2, drop_remainder=True).flat_map(lambda w: w.batch(3)),
            id="drop",
        ),
        pytest.param(
            lambda: (
                D.from_tensor_slices((["a", "bb", "c", "d", "e"], np.ones((5, 2), np.float16)))
                .window(3, 1)
                .flat_map(lambda s, f: D.zip(s.batch(3), f.batch(3)))
            ),
            id="strings_and_arrays",
        ),
        pytest.param(
            lambda: D.range(4).repeat().window(3, 2).flat_map(lambda w: w.batch(3)).take(20),
            id="infinite",
        ),
    ],
)
def test_state_roundtrip(make: Any) -> None:
    assert_state_roundtrip(make())


def test_restored_window_state_holds_the_buffered_elements() -> None:
    ds = D.from_tensor_slices(["a", "b", "c", "d", "e"]).window(3, 1)
    with ds.iterator() as it:
        take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        rest = [list(w) for w in it]
    with ds.iterator(state) as resumed:
        assert [list(w) for w in resumed] == rest == [[b"c", b"d", b"e"], [b"d", b"e"], [b"e"]]


def test_windows_read_each_input_element_once() -> None:
    reads: list[int] = []

    def numbers() -> Any:
        for i in range(6):
            reads.append(i)
            yield i

    signature = fl.TensorSpec((), np.dtype(np.int64))
    ds = D.from_generator(numbers, output_signature=signature).window(3, 1)
    assert len(windows(ds)) == 6
    assert reads == list(range(6))


# -- crafted states -----------------------------------------------------------------------------


def _window_state(ds: fl.Dataset) -> dict[str, Any]:
    state = saved_state(ds, 2)
    assert state["root"]["buffer"], "the state holds elements of the next window"
    return state


def test_state_holding_more_than_a_window_is_rejected() -> None:
    ds = D.range(20).window(4, 3)
    state = _window_state(ds)
    state["root"]["buffer"] *= 5
    assert_state_rejected(ds, state, "buffer")


@pytest.mark.parametrize(
    "leaf",
    [
        {"dtype": "<f4", "shape": [], "data": "AAAAAA==", "scalar": True},  # another dtype
        {"dtype": "<i8", "shape": [1], "data": "AQAAAAAAAAA=", "scalar": False},  # another rank
        {"dtype": "<i8", "shape": [], "data": "AQAAAAAAAA", "scalar": True},  # bad base64
        {"dtype": "<i8", "shape": [], "data": "AQAAAAAAAAA=", "scalar": 1},
        {"dtype": "<i8", "shape": [-1], "data": "", "scalar": False},
        {"dtype": "(2,)i4", "shape": [], "data": "AQAAAAAAAAA=", "scalar": True},
        {"dtype": "nonsense", "shape": [], "data": "", "scalar": True},
        {"strings": ["eA=="], "shape": [2]},
        {"raw": 5},
        {"bytes": 5},
        "AQAAAAAAAAA=",
    ],
)
def test_state_holding_a_bad_element_is_rejected(leaf: Any) -> None:
    ds = D.range(20).window(4, 3)
    state = _window_state(ds)
    state["root"]["buffer"][0] = [leaf]
    assert_state_rejected(ds, state, "buffer")


@pytest.mark.parametrize(
    "field, value", [("skip", 1), ("skip", -1), ("exhausted", "no"), ("input", None)]
)
def test_state_with_a_bad_field_is_rejected(field: str, value: Any) -> None:
    ds = D.range(20).window(4, 3)
    state = _window_state(ds)
    state["root"][field] = value  # skip: only once the buffer was handed out whole
    assert_state_rejected(ds, state, field)


def test_state_skip_is_less_than_the_shift() -> None:
    ds = D.range(20).window(2, 5)
    state = saved_state(ds, 1)
    assert state["root"] == {**state["root"], "buffer": [], "skip": 3}
    state["root"]["skip"] = 5
    assert_state_rejected(ds, state, "skip")
