"""group_by_window, bucket_by_sequence_length and unique.

Expected values were checked against tf.data 2.21.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import (
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
)

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
i32, i64 = np.int32, np.int64
INF, UNK = fl.INFINITE_CARDINALITY, fl.UNKNOWN_CARDINALITY


def lists(ds: fl.Dataset) -> list[Any]:
    return [x.tolist() for x in ds]


def batch_all(key: Any, window: fl.Dataset) -> fl.Dataset:
    return window.batch(10)


# -- group_by_window --------------------------------------------------------------------------


def test_full_groups_come_first_then_the_rest_by_increasing_key() -> None:
    ds = D.from_tensor_slices(np.array([3, 1, -5, 2, 7, 3], i64))
    grouped = ds.group_by_window(lambda x: x, batch_all, window_size=2)
    assert lists(grouped) == [[3, 3], [-5], [1], [2], [7]]


def test_window_size_func_is_asked_once_per_key() -> None:
    asked: list[int] = []

    def size(key: Any) -> Any:
        asked.append(int(key))
        return key + 2

    ds = D.range(8).group_by_window(lambda x: x % 2, batch_all, window_size_func=size)
    assert lists(ds) == [[0, 2], [1, 3, 5], [4, 6], [7]]
    assert asked == [0, 1]


def test_reduce_gets_the_key_and_may_yield_any_number_of_elements() -> None:
    skip_first = D.range(8).group_by_window(lambda x: x % 2, lambda k, w: w.skip(1), window_size=3)
    assert [int(v) for v in skip_first] == [2, 4, 3, 5]
    nothing = D.range(8).group_by_window(lambda x: x % 2, lambda k, w: w.take(0), window_size=3)
    assert list(nothing) == []
    keyed = D.range(9).group_by_window(
        lambda x: x % 2, lambda k, w: w.batch(3).map(lambda b: (k, b)), window_size=3
    )
    got = [(int(k), b.tolist()) for k, b in keyed]
    assert got == [(0, [0, 2, 4]), (1, [1, 3, 5]), (0, [6, 8]), (1, [7])]


def test_tuple_elements_are_separate_arguments_of_key_func() -> None:
    ds = D.zip(D.range(6), D.range(6)).group_by_window(
        lambda a, b: a % 2, lambda k, w: w.map(lambda a, b: a + b), window_size=2
    )
    assert [int(v) for v in ds] == [0, 4, 2, 6, 8, 10]


def test_key_func_may_return_a_python_int() -> None:
    ds = D.range(10).group_by_window(lambda x: 0, lambda k, w: w.batch(4), window_size=3)
    assert lists(ds) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


@pytest.mark.parametrize(
    "reduce_func, spec",
    [
        pytest.param(batch_all, fl.TensorSpec((None,), np.dtype(i64)), id="batch"),
        pytest.param(
            lambda k, w: w.batch(4, drop_remainder=True),
            fl.TensorSpec((4,), np.dtype(i64)),
            id="static_batch",
        ),
        pytest.param(
            lambda k, w: w.map(lambda x: (k, x * 2)),
            (fl.TensorSpec((), np.dtype(i64)), fl.TensorSpec((), np.dtype(i64))),
            id="mapped",
        ),
    ],
)
def test_element_spec(reduce_func: Any, spec: Any) -> None:
    ds = D.range(10).group_by_window(lambda x: x % 3, reduce_func, window_size=4)
    assert ds.element_spec == spec


def test_cardinality() -> None:
    def grouped(ds: fl.Dataset) -> fl.Dataset:
        return ds.group_by_window(lambda x: x % 2, batch_all, window_size=2)

    assert grouped(D.range(5)).cardinality() == UNK
    assert grouped(D.range(5).repeat()).cardinality() == INF


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "exactly one"),
        ({"window_size": 2, "window_size_func": lambda k: k}, ValueError, "exactly one"),
        ({"window_size": 0}, ValueError, "window_size must be >= 1"),
        ({"window_size": 2.5}, TypeError, "window_size must be an int"),
        ({"window_size": 2, "key_func": "x"}, TypeError, "key_func must be callable"),
    ],
)
def test_bad_arguments_fail_at_build_time(kwargs: Any, error: Any, message: str) -> None:
    args = {"key_func": lambda x: x, "reduce_func": batch_all, **kwargs}
    with pytest.raises(error, match=message):
        D.range(3).group_by_window(**args)


@pytest.mark.parametrize(
    "key_func",
    [lambda x: 0.5, lambda x: [x], lambda x: (x % 2).astype(np.int32), lambda x: True],
    ids=["float", "vector", "int32", "bool"],
)
def test_a_key_that_is_not_int64_fails_at_build_as_in_tf_data(key_func: Any) -> None:
    for ds in (D.range(3), D.range(3).take(0)):  # traced: an empty input hides nothing
        with pytest.raises(ValueError, match="key_func must return an int64 scalar"):
            ds.group_by_window(key_func, batch_all, window_size=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"key_func": lambda x: x if x < 2 else 0.5, "window_size": 2},
            "key_func must return an int64 scalar",
        ),
        (
            {"key_func": lambda x: x % 2, "window_size_func": lambda k: k},
            "Window size must be greater than zero, but got 0.",
        ),
        (
            {"key_func": lambda x: x, "window_size": 1, "reduce_func": lambda k, w: 5},
            "reduce_func must return a Dataset, got int",
        ),
    ],
)
def test_bad_function_results_fail_when_met(kwargs: Any, message: str) -> None:
    ds = D.range(3).group_by_window(**{"reduce_func": batch_all, **kwargs})
    with pytest.raises(fl.StageError, match=message):
        list(ds)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: D.range(30).group_by_window(lambda x: x % 4, batch_all, window_size=3),
            id="batches",
        ),
        pytest.param(
            lambda: D.range(30).group_by_window(
                lambda x: x % 3, lambda k, w: w.map(lambda x: x * 10 + k), window_size=4
            ),
            id="mid_window",
        ),
        pytest.param(
            lambda: D.from_tensor_slices(
                (["a", "bb", "c", "dd", "e"], np.arange(5.0))
            ).group_by_window(lambda s, f: len(s), lambda k, w: w.batch(2), window_size=2),
            id="strings",
        ),
        pytest.param(
            lambda: (
                D.range(7)
                .repeat()
                .group_by_window(lambda x: x % 3, batch_all, window_size_func=lambda k: k + 1)
                .take(40)
            ),
            id="infinite",
        ),
    ],
)
def test_group_by_window_state_roundtrip(make: Any) -> None:
    assert_state_roundtrip(make())


# -- bucket_by_sequence_length ----------------------------------------------------------------

ROWS = ([1, 2, 3, 4], [5, 6, 7], [7, 8, 9, 10, 11], [13, 14, 15, 16, 19, 20], [21, 22])


def _rows() -> Iterator[list[int]]:
    yield from ROWS


def sequences() -> fl.Dataset:
    return D.from_generator(_rows, output_types=np.int64, output_shapes=(None,))


def length(x: Any) -> Any:
    return np.shape(x)[0]


@pytest.mark.parametrize(
    "kwargs, want",
    [
        pytest.param(
            {},
            [
                [[1, 2, 3, 4], [5, 6, 7, 0]],
                [[7, 8, 9, 10, 11, 0], [13, 14, 15, 16, 19, 20]],
                [[21, 22]],
            ],
            id="default",
        ),
        pytest.param(
            {"drop_remainder": True},
            [[[1, 2, 3, 4], [5, 6, 7, 0]], [[7, 8, 9, 10, 11, 0], [13, 14, 15, 16, 19, 20]]],
            id="drop_remainder",
        ),
        pytest.param(
            {"padded_shapes": [7], "padding_values": i64(-1)},
            [
                [[1, 2, 3, 4, -1, -1, -1], [5, 6, 7, -1, -1, -1, -1]],
                [[7, 8, 9, 10, 11, -1, -1], [13, 14, 15, 16, 19, 20, -1]],
                [[21, 22, -1, -1, -1, -1, -1]],
            ],
            id="padded_shapes",
        ),
    ],
)
def test_buckets(kwargs: Any, want: Any) -> None:
    ds = sequences().bucket_by_sequence_length(length, [3, 5], [2, 2, 2], **kwargs)
    assert lists(ds) == want


def test_pad_to_bucket_boundary() -> None:
    ds = sequences().bucket_by_sequence_length(
        length, [3, 7], [2, 2, 2], pad_to_bucket_boundary=True
    )
    assert lists(ds) == [
        [[1, 2, 3, 4, 0, 0], [5, 6, 7, 0, 0, 0]],
        [[7, 8, 9, 10, 11, 0], [13, 14, 15, 16, 19, 20]],
        [[21, 22]],
    ]
    too_long = sequences().bucket_by_sequence_length(
        length, [3, 5], [2, 2, 2], pad_to_bucket_boundary=True
    )
    with pytest.raises(fl.StageError, match="elements must have length < max"):
        list(too_long)


def test_no_padding_batches_as_they_are() -> None:
    ds = (
        sequences()
        .map(lambda x: x[:3])
        .bucket_by_sequence_length(length, [3, 4], [2, 1, 2], no_padding=True)
    )
    assert lists(ds) == [[[1, 2, 3]], [[5, 6, 7]], [[7, 8, 9]], [[13, 14, 15]], [[21, 22]]]


def test_tuple_elements() -> None:
    ds = (
        D.range(10)
        .map(lambda x: (x, np.arange(x)))
        .bucket_by_sequence_length(lambda a, b: np.shape(b)[0], [2, 5], [3, 2, 4])
    )
    got = [(a.tolist(), b.tolist()) for a, b in ds]
    assert got == [
        ([2, 3], [[0, 1, 0], [0, 1, 2]]),
        ([5, 6, 7, 8], [list(range(n)) + [0] * (8 - n) for n in (5, 6, 7, 8)]),
        ([0, 1], [[0], [0]]),
        ([4], [[0, 1, 2, 3]]),
        ([9], [list(range(9))]),
    ]


@pytest.mark.parametrize(
    "kwargs, spec",
    [
        ({}, (None, None)),
        ({"pad_to_bucket_boundary": True}, (None, None)),
        ({"drop_remainder": True}, (None, None)),
        ({"padded_shapes": [7]}, (None, 7)),
    ],
)
def test_bucket_spec_is_what_tf_data_traces(kwargs: Any, spec: Any) -> None:
    ds = sequences().bucket_by_sequence_length(length, [3, 5], [2, 2, 2], **kwargs)
    assert ds.element_spec == fl.TensorSpec(spec, np.dtype(i64))
    assert ds.cardinality() == UNK


def test_bucket_arguments() -> None:
    with pytest.raises(ValueError, match="len\\(bucket_batch_sizes\\) must equal"):
        sequences().bucket_by_sequence_length(length, [3, 4], [2, 1])
    with pytest.raises(ValueError, match="bucket batch size must be >= 1"):
        sequences().bucket_by_sequence_length(length, [3], [2, 0])
    with pytest.raises(TypeError, match="element_length_func must be callable"):
        sequences().bucket_by_sequence_length(None, [3], [2, 2])  # type: ignore[arg-type]


def test_bucket_state_roundtrip() -> None:
    ds = sequences().repeat(4).bucket_by_sequence_length(length, [3, 5], [2, 3, 2])
    assert_state_roundtrip(ds)


# -- unique -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, want",
    [
        pytest.param(lambda: D.from_tensor_slices([1, 37, 2, 37, 2, 1]), [i32(1), i32(37), i32(2)]),
        pytest.param(lambda: D.from_tensor_slices(["a", "b", "a"]), [b"a", b"b"]),
        pytest.param(
            lambda: D.from_tensor_slices([[1, 2], [1, 2], [3, 4]]),
            [np.array([1, 2], i32), np.array([3, 4], i32)],
        ),
        pytest.param(
            lambda: D.from_tensor_slices([["a", "b"], ["a", "b"], ["a", "c"]]),
            [np.array([b"a", b"b"], object), np.array([b"a", b"c"], object)],
        ),
        pytest.param(lambda: D.from_tensor_slices({"a": [1, 1]}), [{"a": i32(1)}]),
        pytest.param(lambda: D.range(3).repeat().unique().take(3), [i64(0), i64(1), i64(2)]),
    ],
)
def test_unique(make: Any, want: list[Any]) -> None:
    assert_elements_equal(list(make().unique()), want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: D.from_tensor_slices([1.0, 1.0]),
        lambda: D.from_tensor_slices(np.array([1, 1], np.uint8)),
        lambda: D.from_tensor_slices([True, True]),
        lambda: D.from_tensor_slices(([1, 1], [2, 2])),
    ],
)
def test_unique_supports_tf_data_types_only(make: Any) -> None:
    with pytest.raises(TypeError):
        make().unique()


def test_unique_cardinality_and_spec() -> None:
    assert D.range(3).unique().cardinality() == UNK
    assert D.range(3).repeat().unique().cardinality() == UNK
    assert D.range(3).unique().element_spec == fl.TensorSpec((), np.dtype(i64))


def test_unique_state_roundtrip() -> None:
    ds = D.from_tensor_slices(["a", "b", "a", "c", "b", "d", "a", "e"]).repeat(2).unique()
    assert_state_roundtrip(ds)
    assert_state_roundtrip(D.range(50).map(lambda x: x * 7 % 13).unique())


# -- crafted states -----------------------------------------------------------------------------


def _grouped() -> fl.Dataset:
    return D.range(20).group_by_window(lambda x: x % 3, lambda k, w: w.batch(2), window_size=4)


def _encoded(value: Any) -> list[dict[str, Any]]:
    """One element (a single leaf) as a state holds it."""
    from feedline.ops.in_memory import encode_elements

    return encode_elements([value])[0]


def _edit_groups(state: dict[str, Any], edit: Callable[[list[Any]], None]) -> dict[str, Any]:
    edit(state["root"]["groups"])
    return state


@pytest.mark.parametrize(
    "edit, field",
    [
        # An element of another dtype than the input's (a state of another pipeline).
        (lambda g: g[0][1].append(_encoded(np.float32(1.5))), "groups"),
        # An element whose leaf is not an encoded value at all.
        (lambda g: g[0][1].append([{"dtype": "<i8", "shape": [], "data": "AQ=="}]), "groups"),
        (
            lambda g: g[0][1].append([{"dtype": "<i8", "shape": [], "data": "??", "scalar": True}]),
            "groups",
        ),
        (
            lambda g: g[0][1].append([{"dtype": "O", "shape": [], "data": "", "scalar": True}]),
            "groups",
        ),
        (
            lambda g: g[0][1].append(
                [{"dtype": "<i8", "shape": [9], "data": "AQ==", "scalar": False}]
            ),
            "groups",
        ),
        # Two leaves where the input's elements have one.
        (lambda g: g[0][1].append(_encoded(np.int64(1)) * 2), "groups"),
        # A key without a window size, a key twice, a full group.
        (lambda g: g.append([7, []]), "groups"),
        (lambda g: g.append(list(g[0])), "groups"),
        (lambda g: g[0][1].extend(g[0][1]), "groups"),
        (lambda g: g.append([2**63, []]), "groups"),
        (lambda g: g[0].pop(), "groups"),
    ],
)
def test_group_by_window_state_with_bad_groups_is_rejected(
    edit: Callable[[list[Any]], None], field: str
) -> None:
    ds = _grouped()
    state = _edit_groups(saved_state(ds, 2), edit)
    assert_state_rejected(ds, state, field)


@pytest.mark.parametrize(
    "field, edit",
    [
        ("position", lambda r: r.update(position=3)),  # fewer than the elements held
        ("sizes", lambda r: r["sizes"][0].__setitem__(1, 0)),
        ("groups", lambda r: r.update(sizes=[])),  # keys held without their window size
        ("input_done", lambda r: r.update(input_done=0)),
        ("current", lambda r: r["current"].update(key="0")),
        ("current", lambda r: r["current"]["window"].clear()),
        ("state", lambda r: r["current"].update(state=None)),
        ("index", lambda r: r["current"]["state"]["input"].update(index=5)),  # past the window
        ("key", lambda r: r["current"].pop("key")),
    ],
)
def test_group_by_window_state_with_bad_counters_is_rejected(
    field: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    ds = _grouped()
    state = saved_state(ds, 2)
    edit(state["root"])
    assert_state_rejected(ds, state, field)


def test_unique_state_with_elements_of_another_spec_is_rejected() -> None:
    ds = D.range(20).map(lambda x: x % 5).unique()
    state = saved_state(ds, 2)
    state["root"]["seen"].append(_encoded(b"text"))
    assert_state_rejected(ds, state, "seen")
    state["root"]["seen"] = {"0": []}
    assert_state_rejected(ds, state, "seen")
