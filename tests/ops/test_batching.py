"""Batching: batch, unbatch, rebatch (padded_batch: test_padding.py).

Expected values follow tf.data (checked against TensorFlow 2.21 where the docs are silent).
"""

from __future__ import annotations

import collections
import sys
import threading
import time
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
)

D = fl.Dataset
Spec = fl.TensorSpec
I32, I64, F32, STR = (np.dtype(t) for t in (np.int32, np.int64, np.float32, object))
UNKNOWN, INFINITE = fl.UNKNOWN_CARDINALITY, fl.INFINITE_CARDINALITY
Point = collections.namedtuple("Point", "x y")


def rows(ds: fl.Dataset) -> list[Any]:
    return [np.asarray(x).tolist() for x in ds]


def strings(*values: Any) -> np.ndarray:
    """An object array of bytes (nested lists give more dimensions), as tf.data returns."""
    encoded = np.vectorize(lambda s: s.encode(), otypes=[object])(np.array(values, dtype=object))
    return encoded.astype(object)


def vectors(lengths: list[int]) -> fl.Dataset:
    """Element i is ``[i] * lengths[i]`` (int64), declared as of any length.

    A generator with a signature, not a map: a map's spec is observed from its first element
    (feedline cannot trace the function), so it would claim a fixed length.
    """
    return D.from_generator(
        lambda: (np.full(n, i) for i, n in enumerate(lengths)),
        output_signature=Spec((None,), I64),
    )


# -- batch ------------------------------------------------------------------------------------

BATCHES: list[tuple[int, int, bool, list[list[int]]]] = [
    (10, 3, False, [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]),
    (10, 3, True, [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),
    (4, 4, False, [[0, 1, 2, 3]]),
    (3, 5, False, [[0, 1, 2]]),
    (3, 5, True, []),
    (0, 2, False, []),
]


@pytest.mark.parametrize(
    "n, size, drop, want", BATCHES, ids=[f"{n}-by-{s}{'-drop' * d}" for n, s, d, _ in BATCHES]
)
def test_batch_sizes(n: int, size: int, drop: bool, want: list[list[int]]) -> None:
    ds = D.range(n).batch(size, drop_remainder=drop)
    got = list(ds)
    assert rows(ds) == want
    assert all(b.dtype == I64 for b in got)
    assert ds.cardinality() == len(want)
    assert_state_roundtrip(ds)


def test_batch_of_nested_structures_is_batched_leaf_by_leaf() -> None:
    ds = D.from_tensor_slices(
        {"a": [1, 2, 3], "b": (["x", "y", "z"], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
    ).batch(2)
    assert_elements_equal(
        list(ds),
        [
            {
                "a": np.array([1, 2], I32),
                "b": (strings("x", "y"), np.array([[1, 2], [3, 4]], F32)),
            },
            {"a": np.array([3], I32), "b": (strings("z"), np.array([[5, 6]], F32))},
        ],
    )
    assert ds.element_spec == {
        "a": Spec((None,), I32),
        "b": (Spec((None,), STR), Spec((None, 2), F32)),
    }
    assert_state_roundtrip(ds)


def test_batch_keeps_namedtuples_and_string_arrays() -> None:
    ds = D.range(3).map(lambda x: Point(x, [str(int(x)), "s"])).batch(2)
    assert_elements_equal(
        list(ds),
        [
            Point(np.array([0, 1]), strings(["0", "s"], ["1", "s"])),
            Point(np.array([2]), strings(["2", "s"])),
        ],
    )


def test_bytes_batches_are_object_arrays() -> None:
    (batch,) = list(D.from_tensor_slices(["a", "bb", ""]).batch(3))
    assert batch.dtype == object
    assert batch.tolist() == [b"a", b"bb", b""]


def test_batches_span_epochs_when_repeat_comes_first() -> None:
    ds = D.range(5).repeat(2).batch(4)
    assert rows(ds) == [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4]]
    assert ds.cardinality() == 3
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3))


def test_batch_of_an_infinite_input_state_roundtrip() -> None:
    ds = D.range(5).repeat().batch(3)
    assert ds.cardinality() == INFINITE
    assert rows(ds.take(3)) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    # cut point 0 is left out: tests.helpers.take(it, 0) never stops on an infinite pass.
    assert_state_roundtrip(ds, cut_points=(1, 2, 5), limit=40)


@pytest.mark.parametrize(
    "ds, spec",
    [
        (D.range(10).batch(5), Spec((None,), I64)),
        (D.range(10).batch(5, drop_remainder=True), Spec((5,), I64)),
        (D.range(3).repeat().batch(5), Spec((None,), I64)),
        (D.from_tensors(np.zeros((2, 3), F32)).batch(4).batch(2), Spec((None, None, 2, 3), F32)),
        (
            D.from_tensors(np.zeros(3, F32)).batch(4, drop_remainder=True).batch(2),
            Spec((None, 4, 3), F32),
        ),
    ],
    ids=["divisible", "drop", "infinite", "batch-of-batches", "drop-then-batch"],
)
def test_batch_element_spec_has_a_static_batch_dim_only_with_drop_remainder(
    ds: fl.Dataset, spec: Any
) -> None:
    # tf.data's rule, even where the cardinality shows every batch would be full.
    assert ds.element_spec == spec


@pytest.mark.parametrize(
    "ds, cardinality",
    [
        (D.range(10).batch(3), 4),
        (D.range(10).batch(3, drop_remainder=True), 3),
        (D.range(3).repeat().batch(3), INFINITE),
        (D.range(10).filter(bool).batch(3), UNKNOWN),
    ],
    ids=["partial", "drop", "infinite", "unknown"],
)
def test_batch_cardinality(ds: fl.Dataset, cardinality: int) -> None:
    assert ds.cardinality() == cardinality


def test_batch_shape_mismatch_names_stage_positions_and_shapes() -> None:
    ds = vectors([3 if i == 5 else 2 for i in range(10)]).batch(4)
    with ds.iterator() as it:
        assert next(it).shape == (4, 2)
        with pytest.raises(fl.StageError) as info:
            next(it)
    error = info.value
    assert error.stage == "batch(4)"
    assert error.position == 5
    message = str(error)
    assert "element 4 has shape (2,)" in message
    assert "element 5 has shape (3,)" in message
    assert "padded_batch" in message


def test_batch_scalar_and_vector_mix_is_a_shape_error() -> None:
    # A source that declares no shape: a map's own check would catch the change first.
    mixed = [np.int64(0), np.int64(1), np.zeros(2, np.int64), np.int64(3)]
    ds = D.from_generator(lambda: iter(mixed), output_types=np.int64).batch(4)
    with pytest.raises(fl.StageError, match=r"element 0 has shape \(\) but element 2 has shape"):
        list(ds)


STRUCTURE_CHANGES: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "dict-keys": (lambda x: {"a": x}, lambda x: {"b": x}),
    "tuple-length": (lambda x: (x, x), lambda x: (x, x, x)),
    "nesting": (lambda x: (x, (x, x)), lambda x: ((x, x), x)),
    "leaf-for-tuple": (lambda x: (x, x), lambda x: x),
    "tuple-for-leaf": (lambda x: x, lambda x: (x, x)),
    "namedtuple-for-tuple": (lambda x: (x, x), lambda x: Point(x, x)),
}


@pytest.mark.parametrize("usual, changed", STRUCTURE_CHANGES.values(), ids=STRUCTURE_CHANGES.keys())
@pytest.mark.parametrize("op", ["batch", "padded_batch"])
def test_batch_structure_mismatch_is_an_error(
    usual: Callable[[Any], Any], changed: Callable[[Any], Any], op: str
) -> None:
    def elements() -> Any:
        return (changed(x) if x == 2 else usual(x) for x in map(np.int64, range(4)))

    # A generator with no signature: a map's check against its traced spec would catch the
    # change first (tests/ops/test_mapping.py).
    ds = D.from_generator(elements)
    with pytest.raises(fl.StageError, match="different structures") as info:
        list(getattr(ds, op)(4))
    assert info.value.position == 2
    assert info.value.stage == f"{op}(4)"


# -- unbatch ----------------------------------------------------------------------------------


def test_unbatch_splits_along_the_first_axis() -> None:
    ds = D.range(7).batch(3).unbatch()
    assert [int(x) for x in ds] == list(range(7))
    assert ds.element_spec == Spec((), I64)
    assert ds.cardinality() == UNKNOWN
    # Cut inside batches as well as at their edges.
    assert_state_roundtrip(ds, cut_points=range(8))


def test_unbatch_nested_elements_and_strings() -> None:
    ds = D.from_tensors({"a": [1, 2], "b": (["x", "y"], [[1.0, 2.0], [3.0, 4.0]])}).unbatch()
    assert_elements_equal(
        list(ds),
        [
            {"a": np.int32(1), "b": (b"x", np.array([1, 2], F32))},
            {"a": np.int32(2), "b": (b"y", np.array([3, 4], F32))},
        ],
    )
    assert ds.element_spec == {"a": Spec((), I32), "b": (Spec((), STR), Spec((2,), F32))}
    assert_state_roundtrip(ds, cut_points=(0, 1, 2))


def test_unbatch_skips_empty_batches() -> None:
    ds = vectors([2, 0, 0, 1, 0]).unbatch()
    assert [int(x) for x in ds] == [0, 0, 3]
    assert_state_roundtrip(ds)


def test_unbatch_mismatched_first_dims_name_the_batch_and_the_pass_goes_on() -> None:
    def pair(x: Any) -> Any:
        return (np.zeros(2), np.zeros(3 if x in (1, 2) else 2))

    with D.range(4).map(pair).unbatch().iterator() as it:
        got = [next(it)[0].shape for _ in range(2)]
        errors = []
        for _ in range(2):
            with pytest.raises(fl.StageError, match=r"different first dimensions.*\(3,\)") as info:
                next(it)
            errors.append(info.value.position)
        got += [x[0].shape for x in it]
    assert errors == [1, 2]
    assert got == [()] * 4


def test_unbatch_of_scalars_is_an_error() -> None:
    # At build where the spec shows it (as tf.data), while iterating where it does not.
    with pytest.raises(ValueError, match="cannot unbatch an input with scalar components"):
        D.range(3).unbatch()
    unknown_rank = D.from_generator(lambda: iter([1, 2]), output_types=np.int64)
    with pytest.raises(fl.StageError, match="cannot unbatch a scalar"):
        list(unknown_rank.unbatch())


def test_unbatch_of_an_infinite_input_is_infinite() -> None:
    ds = D.range(4).batch(2).repeat().unbatch()
    assert ds.cardinality() == INFINITE
    assert_state_roundtrip(ds, cut_points=(1, 3, 5), limit=30)


# -- rebatch ----------------------------------------------------------------------------------

REBATCHES: list[tuple[int, int, Any, bool, list[list[int]]]] = [
    (6, 4, 3, False, [[0, 1, 2], [3, 4, 5]]),
    (8, 4, [2, 1, 1], False, [[0, 1], [2], [3], [4, 5], [6], [7]]),
    (10, 3, [2, 3], False, [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]),
    (7, 4, 3, False, [[0, 1, 2], [3, 4, 5], [6]]),
    (7, 4, 3, True, [[0, 1, 2], [3, 4, 5]]),
    (7, 4, [2, 3], True, [[0, 1], [2, 3, 4], [5, 6]]),
    (8, 4, [2, 3], True, [[0, 1], [2, 3, 4], [5, 6]]),
]


@pytest.mark.parametrize(
    "n, batch, sizes, drop, want",
    REBATCHES,
    ids=[f"{n}-{b}-to-{s}{'-drop' * d}" for n, b, s, d, _ in REBATCHES],
)
def test_rebatch(n: int, batch: int, sizes: Any, drop: bool, want: list[list[int]]) -> None:
    ds = D.range(n).batch(batch).rebatch(sizes, drop_remainder=drop)
    assert rows(ds) == want
    assert ds.cardinality() == UNKNOWN
    assert_state_roundtrip(ds, cut_points=range(len(want) + 1))


def test_rebatch_nested() -> None:
    ds = D.from_tensor_slices({"a": [1, 2, 3, 4, 5], "b": ["x", "y", "z", "w", "v"]})
    ds = ds.batch(2).rebatch(3)
    assert_elements_equal(
        list(ds),
        [
            {"a": np.array([1, 2, 3], I32), "b": strings("x", "y", "z")},
            {"a": np.array([4, 5], I32), "b": strings("w", "v")},
        ],
    )
    assert_state_roundtrip(ds)


@pytest.mark.parametrize(
    "ds, spec",
    [
        (D.range(8).batch(4).rebatch(3), Spec((None,), I64)),
        (D.range(8).batch(4).rebatch(3, drop_remainder=True), Spec((3,), I64)),
        (D.range(8).batch(4).rebatch([2, 2], drop_remainder=True), Spec((2,), I64)),
        (D.range(8).batch(4).rebatch([2, 3], drop_remainder=True), Spec((None,), I64)),
    ],
    ids=["partial", "drop", "drop-same-sizes", "drop-mixed-sizes"],
)
def test_rebatch_element_spec(ds: fl.Dataset, spec: Any) -> None:
    assert ds.element_spec == spec


def test_rebatch_cardinality_is_unknown_even_over_an_infinite_input() -> None:
    ds = D.range(5).batch(2).repeat().rebatch(3)
    assert ds.cardinality() == UNKNOWN
    assert rows(ds.take(3)) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_rebatch_of_scalars_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot unbatch an input with scalar components"):
        D.range(3).rebatch(2)


# -- crafted states -----------------------------------------------------------------------------


def test_batch_state_position_is_checked() -> None:
    ds = D.range(10).batch(3)
    state = saved_state(ds, 1)
    for position in (-3, 11, "3"):
        state["root"]["position"] = position
        assert_state_rejected(ds, state, "position")
    state["root"]["position"] = 3
    state["root"]["input"] = None  # would restart the input: a silently wrong pass
    assert_state_rejected(ds, state, "input")


def test_unbatch_state_pointing_past_its_batch_is_rejected() -> None:
    # A row past the batch it points into was silently read as "the next batch".
    ds = D.range(10).batch(5).unbatch()
    state = saved_state(ds, 2)
    assert state["root"]["row"] == 2
    state["root"]["row"] = 5
    assert_state_rejected(ds, state, "row")
    state["root"]["row"] = 2
    state["root"]["input"]["input"]["index"] = 10  # the batch is not there any more
    assert_state_rejected(ds, state, "row")


@pytest.mark.parametrize(
    "field, value", [("row", -1), ("batches_read", 0), ("batches_read", 3), ("row", "2")]
)
def test_unbatch_state_counters_are_checked(field: str, value: Any) -> None:
    ds = D.range(10).batch(5).unbatch()
    state = saved_state(ds, 2)
    state["root"][field] = value
    assert_state_rejected(ds, state, field)


def test_rebatch_state_counters_are_checked() -> None:
    ds = D.range(10).batch(5).rebatch(3)
    state = saved_state(ds, 2)
    state["root"]["emitted"] = state["root"]["position"] + 1  # each batch has a row
    assert_state_rejected(ds, state, "emitted")
    state = saved_state(ds, 2)
    state["root"]["rows"]["row"] = 9
    assert_state_rejected(ds, state, "row")


# -- stacking rows ------------------------------------------------------------------------------

ROWS = {
    "uint8 rows": [np.full(16384, i, np.uint8) for i in range(32)],
    "float32 images": [np.full((8, 8, 3), i / 3, np.float32) for i in range(5)],
    "0-d int64": [np.array(i, np.int64) for i in range(6)],
    "bool": [np.array([i % 2 == 0, True]) for i in range(3)],
    "complex": [np.full(2, 1j * i) for i in range(3)],
    "datetimes": [np.array([f"2020-01-0{i + 1}"], "datetime64[D]") for i in range(3)],
    "empty rows": [np.zeros((0, 3), np.float32)] * 4,
    "strided": [np.arange(10)[::2] + i for i in range(3)],
    "fortran order": [np.asfortranarray(np.arange(6).reshape(2, 3) + i) for i in range(2)],
    "big-endian": [np.arange(3, dtype=">f4") + i for i in range(2)],
}


@pytest.mark.parametrize("name", list(ROWS))
def test_a_batch_of_arrays_is_numpys_stack_at_a_64_byte_boundary(name: str) -> None:
    rows = ROWS[name]
    (batch,) = list(D.from_generator(lambda: iter(rows), output_types=rows[0].dtype).batch(32))
    want = np.stack(rows)
    assert batch.dtype == want.dtype and batch.shape == want.shape
    np.testing.assert_array_equal(batch, want)
    # (Scalars are stacked by np.fromiter, big-endian rows by np.stack, in numpy's memory.)
    if batch.size and batch.dtype.isnative and rows[0].ndim:
        assert batch.ctypes.data % 64 == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("holds", [True, False])
def test_a_small_batch_is_copied_holding_the_gil_and_a_large_one_lets_it_go(holds: bool) -> None:
    """Letting the GIL go for the copy means waiting to get it back, up to a switch interval
    behind busy threads: not worth it for a copy of microseconds, worth it for one of
    milliseconds (the workers' Python runs meanwhile). Another thread wanting the GIL the
    whole time runs only if the copy lets it go: with a 10 s switch interval nothing else
    takes it away."""
    from feedline.ops.batching import HOLD_GIL_MAX_BYTES, stack_leaf

    rows = [np.full(HOLD_GIL_MAX_BYTES // 16 * (1 if holds else 4), i, np.uint8) for i in range(16)]
    counter = [0]
    go, stop = threading.Event(), threading.Event()

    def wants_the_gil() -> None:
        go.wait()
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0)  # lets the GIL go at once: the main thread is not kept waiting

    other = threading.Thread(target=wants_the_gil, name="feedline-test-gil")
    other.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        go.set()  # the other thread now waits for the GIL this thread holds
        before = counter[0]
        batch = stack_leaf(rows, "batch", 0)
        after = counter[0]
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        other.join(10.0)
    assert (after == before) is holds
    np.testing.assert_array_equal(batch, np.stack(rows))
