"""Traced element specs, and each map's outputs checked against its traced spec.

(The same cases against tf.data: tests/conformance/test_divergences.py.)
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.ops.interleave import REFERENCE_CORES, default_cycle_length
from tests.helpers import assert_elements_equal, assert_state_roundtrip

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
Spec = fl.TensorSpec
Point = collections.namedtuple("Point", ["x", "y"])


# -- traced specs ------------------------------------------------------------------------------


def test_a_size_the_values_decide_is_open_even_when_the_first_elements_agree() -> None:
    values = D.from_tensor_slices(np.array([3, 6, 4, 5]))
    for ds in (values, values.take(2), values.take(0)):
        mapped = ds.map(lambda x: np.full(int(x % 3) + 1, x))
        assert mapped.element_spec == Spec((None,), np.dtype(np.int64))
        assert mapped.unbatch().cardinality() == fl.UNKNOWN_CARDINALITY


def test_a_size_no_input_changes_stays_static() -> None:
    ds = D.range(4).map(lambda x: (np.zeros(3, np.float32), np.full((2, 5), x)))
    assert ds.element_spec == (Spec((3,), np.dtype(np.float32)), Spec((2, 5), np.dtype(np.int64)))


def test_a_function_returning_none_is_refused_with_its_stage() -> None:
    ds = D.range(3).map(lambda x: None, name="forgot")
    with pytest.raises(TypeError, match=r"map\(forgot\): a function returned None"):
        ds.element_spec  # noqa: B018


# -- interleave's default cycle length -------------------------------------------------------


@pytest.mark.parametrize("calls", [None, 1, 3, fl.AUTOTUNE])
def test_interleave_orders_alike_on_any_machine(
    calls: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def order() -> list[int]:
        ds = D.range(6).interleave(lambda x: D.range(10 * x, 10 * x + 3), num_parallel_calls=calls)
        return [int(v) for v in ds]

    here = order()
    for cores in (1, 64):
        monkeypatch.setattr(os, "cpu_count", lambda n=cores: n)
        assert order() == here
    cycle = default_cycle_length(calls)
    assert cycle == {None: REFERENCE_CORES, fl.AUTOTUNE: 1}.get(calls, calls)
    explicit = D.range(6).interleave(lambda x: D.range(10 * x, 10 * x + 3), cycle_length=cycle)
    assert here == [int(v) for v in explicit]


# -- the output check --------------------------------------------------------------------------


def float32_then_float64(x: Any) -> Any:
    return np.float32(x) if x < 3 else np.float64(x)


CHANGES = {
    "dtype": float32_then_float64,
    "none": lambda x: x if x < 3 else None,
    "dict-keys": lambda x: {"a": x} if x < 3 else {"b": x},
    "tuple-length": lambda x: (x, x) if x < 3 else (x, x, x),
    "namedtuple-for-tuple": lambda x: (x, x) if x < 3 else Point(x, x),
    "rank": lambda x: np.zeros((2, 2)) if x < 3 else np.zeros(4),
    "static-size": lambda x: np.zeros(3 if x != 4 else 5),
    "string-for-number": lambda x: x if x < 3 else b"x",
}


@pytest.mark.parametrize("calls", [None, 2])
@pytest.mark.parametrize("change", list(CHANGES))
def test_an_output_that_contradicts_the_traced_spec_fails_its_element(
    change: str, calls: int | None
) -> None:
    fn = CHANGES[change]
    ds = D.range(6).map(fn, num_parallel_calls=calls, name="f")
    first_bad = 4 if change == "static-size" else 3
    got: list[Any] = []
    with ds.iterator() as it, pytest.raises(fl.StageError, match="does not fit") as info:
        got.extend(it)
    assert (info.value.stage, info.value.position) == ("map(f)", first_bad)
    assert str(ds.element_spec) in str(info.value)
    assert len(got) == first_bad
    # An element's error like any other: ignore_errors skips just those.
    kept = list(ds.ignore_errors())
    assert len(kept) == (5 if change == "static-size" else 3)


@pytest.mark.parametrize("calls", [None, 2])
def test_a_chunk_not_all_of_the_specs_own_type_is_still_checked(calls: int | None) -> None:
    # np.int64 outputs of an int64 spec pass as they are, unchecked; a chunk with anything
    # else among them is checked element by element: a 0-d int64 array fits, an int32 not.
    def mixed(x: Any) -> Any:
        return np.array(x) if x % 7 == 0 else x

    assert [int(v) for v in D.range(2000).map(mixed, calls)] == list(range(2000))

    def int32_at_1001(x: Any) -> Any:
        return np.int32(x) if x == 1001 else x

    got: list[Any] = []
    ds = D.range(2000).map(int32_at_1001, calls)
    with ds.iterator() as it, pytest.raises(fl.StageError, match="does not fit") as info:
        got.extend(it)
    assert info.value.position == 1001 and len(got) == 1001


def test_a_process_map_is_checked_once_its_spec_is_known() -> None:
    ds = D.range(6).map(float32_then_float64, executor="process")
    ds.element_spec  # noqa: B018 - traced here, by the user's asking
    with pytest.raises(fl.StageError, match="at element 3: its output"):
        list(ds)


parent_calls: list[int] = []


def counted(x: Any) -> Any:
    parent_calls.append(os.getpid())  # a worker process appends to its own copy
    return x


def test_a_process_map_is_not_traced_in_this_process_to_be_checked() -> None:
    parent_calls.clear()
    assert [int(v) for v in D.range(4).map(counted, executor="process")] == [0, 1, 2, 3]
    assert parent_calls == []


def test_outputs_that_fit_pass_unchanged_and_restore() -> None:
    def rich(x: Any) -> Any:
        return Point(
            np.full((int(x) % 3, 2), x, np.float16),
            {
                "s": b"s" * int(x),
                "t": np.datetime64(int(x), "D"),
                "v": np.array([b"a"] * 2, dtype=object),
            },
        )

    ds = D.range(7).map(rich, num_parallel_calls=2)
    got = list(ds)
    assert_elements_equal([tuple(p) for p in got], [tuple(rich(np.int64(i))) for i in range(7)])
    assert_state_roundtrip(ds)


def test_an_interleave_checks_the_elements_of_every_dataset_once_its_spec_is_known() -> None:
    def inner(x: Any) -> fl.Dataset:
        values = D.range(2)
        return values if x < 3 else values.map(lambda v: np.float32(v))

    ds = D.range(5).flat_map(inner)
    assert ds.element_spec == Spec((), np.dtype(np.int64))  # checked once the spec is known
    with ds.iterator() as it, pytest.raises(fl.StageError, match="does not fit") as info:
        for _ in it:
            pass
    assert info.value.position == 3  # the input element whose dataset it came from
    assert [int(v) for v in ds.ignore_errors()] == [0, 1] * 3


def test_a_scan_checks_its_outputs() -> None:
    ds = D.range(5).scan(np.int64(0), lambda s, x: (s + x, s if x < 3 else np.float32(s)))
    assert ds.element_spec == Spec((), np.dtype(np.int64))
    with pytest.raises(fl.StageError, match="at element 3: its output"):
        list(ds)


def test_group_by_window_checks_what_its_windows_reduce_to() -> None:
    def reduce(key: Any, window: fl.Dataset) -> fl.Dataset:
        return window.batch(2) if key == 0 else window.map(lambda v: np.float32(v)).batch(2)

    ds = D.range(4).group_by_window(lambda x: x % 2, reduce, window_size=2)
    assert ds.element_spec == Spec((None,), np.dtype(np.int64))  # then checked
    with pytest.raises(fl.StageError, match=r"group_by_window.*float32.*does not fit"):
        list(ds)


def test_an_interleave_opens_no_dataset_to_trace_its_spec() -> None:
    opened: list[int] = []

    def open_range(n: Any) -> fl.Dataset:
        opened.append(int(n))
        return D.range(n).map(lambda x: np.float32(x) if n > 2 else x)

    ds = D.from_tensor_slices(np.array([2, 2, 3], np.int64)).flat_map(open_range)
    assert [float(v) for v in ds] == [0, 1, 0, 1, 0, 1, 2]  # unchecked: never traced
    assert opened == [2, 2, 3]


def test_string_arrays_of_any_numpy_width_fit_a_string_spec() -> None:
    # np.array(s.split()) is a fixed-width unicode array: a string tensor, like tf's.
    lines = fl.Dataset.from_tensor_slices(["a b", "c"])
    as_bytes = lines.map(lambda s: np.array(s.split()))  # |S1
    as_text = lines.map(lambda s: np.array(s.decode().split()))  # <U1
    assert [list(x) for x in as_bytes] == [[b"a", b"b"], [b"c"]]
    assert [len(x) for x in as_text] == [2, 1]
