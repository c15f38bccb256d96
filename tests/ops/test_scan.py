"""scan, counter (a scan, as in tf.data) and get_single_element.

Expected values were checked against tf.data 2.21.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
i32, i64, f32 = np.int32, np.int64, np.float32
INF = fl.INFINITE_CARDINALITY

# -- scan -------------------------------------------------------------------------------------


def test_running_sum() -> None:
    ds = D.range(6).scan(i64(0), lambda s, x: (s + x, (s, x * 2)))
    want = [(i64(s), i64(2 * x)) for x, s in zip(range(6), [0, 0, 1, 3, 6, 10])]
    assert_elements_equal(list(ds), want)
    assert ds.cardinality() == 6
    assert ds.element_spec == (fl.TensorSpec((), np.dtype(i64)), fl.TensorSpec((), np.dtype(i64)))


def test_tuple_element_and_tuple_state_are_passed_whole() -> None:
    pairs = D.zip(D.range(3), D.range(10, 13))
    got = list(pairs.scan(i64(0), lambda s, x: (s + x[0], x)))
    assert_elements_equal(got, [(i64(i), i64(10 + i)) for i in range(3)])
    state = (i64(0), i64(1))
    got = list(D.range(3).scan(state, lambda s, x: ((s[0] + x, s[1] * 2), s)))
    assert_elements_equal(got, [(i64(0), i64(1)), (i64(0), i64(2)), (i64(1), i64(4))])


def test_initial_state_is_converted_like_tf_data() -> None:
    # 0 is int32 and [1, 2] an int32 vector, as tf.data converts them.
    assert_elements_equal(
        list(D.range(3).scan(0, lambda s, x: (s + 1, s))), [i32(0), i32(1), i32(2)]
    )
    got = list(D.range(2).scan([1, 2], lambda s, x: (s * 2, s)))
    assert_elements_equal(got, [np.array([1, 2], i32), np.array([2, 4], i32)])


def test_new_state_may_change_shape_but_not_dtype() -> None:
    grow = D.range(3).scan(np.array([0]), lambda s, x: (np.append(s, x), s))
    assert [v.tolist() for v in grow] == [[0], [0, 0], [0, 0, 1]]
    # int32 + int64 is int64: refused at build, as tf.data does, even over an empty input.
    for ds in (D.range(3), D.range(3).take(0)):
        with pytest.raises(TypeError, match="dtypes: expected \\['int32'\\], got \\['int64'\\]"):
            ds.scan(0, lambda s, x: (s + x, s))
    # Where only later elements change it, iterating finds it.
    late = D.range(3).scan(i64(0), lambda s, x: (s + x if x < 2 else np.float32(0), s))
    with pytest.raises(fl.StageError, match="dtypes: expected \\['int64'\\], got \\['float32'\\]"):
        list(late)


def test_new_state_is_read_in_the_initial_nesting() -> None:
    # tf.data only compares leaves: a renamed key flows back under the initial name.
    ds = D.range(3).scan({"a": i64(0)}, lambda s, x: ({"b": s["a"] + x}, s["a"]))
    assert_elements_equal(list(ds), [i64(0), i64(0), i64(1)])


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda s, x: s + 1, id="not_a_pair"),
        pytest.param(lambda s, x: (s + 1, x, x), id="triple"),
    ],
)
def test_scan_func_must_return_a_pair(fn: Any) -> None:
    with pytest.raises(fl.StageError, match="must return a pair"):
        list(D.range(3).scan(i64(0), fn))


def test_a_failing_element_leaves_the_state_and_the_other_elements() -> None:
    def add(s: Any, x: Any) -> Any:
        if x == 3:
            raise ValueError("three")
        return s + x, s

    ds = D.range(6).scan(i64(0), add).ignore_errors().batch(10)
    assert [b.tolist() for b in ds] == [[0, 0, 1, 3, 7]]
    with pytest.raises(fl.StageError, match=r"at element 3.*three"):
        list(D.range(6).scan(i64(0), add))


def test_scan_func_is_snapshotted_at_build_time() -> None:
    step = 1
    ds = D.range(3).scan(i64(0), lambda s, x: (s + step, s))
    step = 100
    assert [int(v) for v in ds] == [0, 1, 2]
    assert step == 100


def test_bad_scan_func() -> None:
    with pytest.raises(TypeError, match="scan_func must be callable"):
        D.range(3).scan(0, "not a function")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: D.range(20).scan(i64(0), lambda s, x: (s + x, s)), id="sum"),
        pytest.param(
            lambda: D.from_tensor_slices(["a", "b", "c", "d"]).scan(
                (b"", np.zeros(2, f32)), lambda s, x: ((s[0] + x, s[1] + 0.5), s[0])
            ),
            id="string_and_array_state",
        ),
        pytest.param(
            lambda: D.range(3).repeat().scan(i64(1), lambda s, x: (s * 2 % 1000, s)).take(30),
            id="infinite",
        ),
    ],
)
def test_scan_state_roundtrip(make: Any) -> None:
    assert_state_roundtrip(make())


# -- counter ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, want",
    [
        pytest.param((), [i64(0), i64(1), i64(2)], id="default"),
        pytest.param((10, -3, np.int32), [i32(10), i32(7), i32(4)], id="down_int32"),
        pytest.param(
            (2**31 - 2, 1, np.int32),
            [i32(2**31 - 2), i32(2**31 - 1), i32(-(2**31)), i32(-(2**31) + 1)],
            id="int32_wraps",
        ),
        pytest.param((i32(3),), [i64(3), i64(4)], id="numpy_start"),
        pytest.param((3, 1, np.int16), [np.int16(3), np.int16(4)], id="int16"),
        pytest.param((1, 1, np.float32), [f32(1), f32(2)], id="int_to_float"),
        pytest.param((2**40, 1, np.int32), [i32(0), i32(1)], id="start_wraps_into_int32"),
    ],
)
def test_counter_values(args: tuple[Any, ...], want: list[Any]) -> None:
    assert_elements_equal(take(D.counter(*args), len(want)), want)


def test_counter_floats_accumulate_rounding_like_tf_data() -> None:
    got = [float(v) for v in take(D.counter(0.1, 0.1, np.float32), 12)]
    assert got[6] == float(f32(0.70000005))
    assert got[11] == float(f32(1.2000002))


def test_counter_spec_and_cardinality() -> None:
    ds = D.counter(0, 2, np.int32)
    assert ds.cardinality() == INF
    assert ds.element_spec == fl.TensorSpec((), np.dtype(np.int32))


@pytest.mark.parametrize(
    "args",
    [(0.5,), (1.0,), ("a",), (True,), (0, 1, str), (0, 1, np.bool_), (0, 0.5, np.int32)],
)
def test_counter_refuses_what_tf_data_cannot_convert(args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError):
        D.counter(*args)


def test_counter_state_roundtrip() -> None:
    assert_state_roundtrip(D.counter(5, 3), cut_points=(0, 1, 50), limit=100)


# -- get_single_element -----------------------------------------------------------------------


def test_get_single_element() -> None:
    assert D.range(1).get_single_element() == 0
    value = D.from_tensors({"a": (1, "x")}).get_single_element()
    assert_elements_equal([value], [{"a": (i32(1), b"x")}])
    window = D.range(3).window(3).get_single_element()
    assert [int(v) for v in window] == [0, 1, 2]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: D.range(0), "Dataset was empty."),
        (lambda: D.range(3), "Dataset had more than one element."),
        (lambda: D.range(1).repeat(), "Dataset had more than one element."),
    ],
)
def test_get_single_element_errors(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make().get_single_element()


# -- crafted states -----------------------------------------------------------------------------


def _running_sum() -> fl.Dataset:
    return D.range(10).scan((np.int64(0), b""), lambda s, x: ((s[0] + x, s[1] + b"."), s[0]))


@pytest.mark.parametrize(
    "edit",
    [
        # Another dtype than the initial state's (a state of another scan).
        lambda s: s[0].update(dtype="<i4", data="AQAAAA=="),
        lambda s: s.pop(),  # a leaf short
        lambda s: s.append(s[0]),  # a leaf too many
        lambda s: s[1].update(bytes=7),
        lambda s: s.clear(),
    ],
)
def test_state_with_a_bad_running_state_is_rejected(edit: Callable[[list[Any]], None]) -> None:
    ds = _running_sum()
    state = saved_state(ds, 3)
    edit(state["root"]["state"])
    assert_state_rejected(ds, state, "state")


def test_state_running_state_may_change_shape() -> None:
    # As a new state may: only the dtypes are the initial state's.
    ds = D.range(4).scan(np.zeros(0, np.int64), lambda s, x: (np.append(s, x), s.sum()))
    assert_state_roundtrip(ds)


def test_state_position_and_input_are_checked() -> None:
    ds = _running_sum()
    state = saved_state(ds, 3)
    state["root"]["position"] = -1
    assert_state_rejected(ds, state, "position")
    state = saved_state(ds, 3)
    state["root"]["input"] = None
    assert_state_rejected(ds, state, "input")
