"""padded_batch.

Expected values follow tf.data (checked against TensorFlow 2.21 where the docs are silent; the
padding values tf.data refuses: tests/conformance/test_divergences.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, assert_state_roundtrip
from tests.ops.test_batching import I64, D, Spec, rows, strings, vectors

# -- padded_batch -----------------------------------------------------------------------------


def test_padded_batch_pads_each_batch_to_its_longest_element() -> None:
    ds = vectors([1, 3, 0, 2]).padded_batch(2)
    assert rows(ds) == [[[0, 0, 0], [1, 1, 1]], [[0, 0], [3, 3]]]
    assert ds.element_spec == Spec((None, None), I64)
    assert_state_roundtrip(ds)


def test_padded_batch_pads_every_none_dimension() -> None:
    ds = D.range(3).map(lambda x: np.full((x, 3 - x), x)).padded_batch(3)
    (batch,) = list(ds)
    assert batch.shape == (3, 2, 3)
    assert batch.tolist() == [
        [[0, 0, 0], [0, 0, 0]],
        [[1, 1, 0], [0, 0, 0]],
        [[2, 0, 0], [2, 0, 0]],
    ]


@pytest.mark.parametrize(
    "padded_shapes, want_rows, spec",
    [
        ([5], [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], Spec((None, 5), I64)),
        ([-1], [[0], [1]], Spec((None, None), I64)),
        ([None], [[0], [1]], Spec((None, None), I64)),
        ((4,), [[0, 0, 0, 0], [1, 0, 0, 0]], Spec((None, 4), I64)),
    ],
    ids=["fixed", "minus-one", "none", "tuple-shape"],
)
def test_padded_batch_padded_shapes(padded_shapes: Any, want_rows: Any, spec: Any) -> None:
    ds = vectors([0, 1, 2]).padded_batch(2, padded_shapes=padded_shapes)
    assert rows(ds)[0] == want_rows
    assert ds.element_spec == spec


def test_padded_batch_partial_padded_shape() -> None:
    ds = D.range(3).map(lambda x: np.full((x, 2), x)).padded_batch(2, padded_shapes=[None, 3])
    assert rows(ds) == [[[[0, 0, 0]], [[1, 1, 0]]], [[[2, 2, 0], [2, 2, 0]]]]


def test_padded_batch_nested_shapes_given_as_tuples_and_scalar_components() -> None:
    ds = (
        vectors([0, 1, 2])
        .map(lambda v: (v, np.int64(len(v))))
        .padded_batch(2, padded_shapes=((None,), ()))
    )
    assert_elements_equal(
        list(ds),
        [
            (np.array([[0], [1]]), np.array([0, 1])),
            (np.array([[2, 2]]), np.array([2])),
        ],
    )
    assert ds.element_spec == (Spec((None, None), I64), Spec((None,), I64))
    assert_state_roundtrip(ds)


def test_padded_batch_padding_too_small_is_an_error_naming_the_element() -> None:
    ds = vectors([1, 2, 1, 3]).padded_batch(2, padded_shapes=[2])
    with ds.iterator() as it:
        assert next(it).shape == (2, 2)
        with pytest.raises(fl.StageError, match=r"element 3 has shape \(3,\), larger") as info:
            next(it)
    assert info.value.position == 3


@pytest.mark.parametrize(
    "pair, padded_shapes, error, message",
    [
        (False, [None, None], fl.StageError, "rank"),
        (True, [None], ValueError, "does not match the element structure"),
        (True, {"v": [None]}, ValueError, "does not match the element structure"),
    ],
    ids=["rank", "one-shape-for-a-tuple", "dict-for-a-tuple"],
)
def test_padded_batch_padded_shapes_not_matching_the_elements(
    pair: bool, padded_shapes: Any, error: type, message: str
) -> None:
    ds = vectors([1, 2])
    if pair:
        ds = ds.map(lambda v: (v, v))
    with pytest.raises(error, match=message):
        list(ds.padded_batch(2, padded_shapes=padded_shapes))


@pytest.mark.parametrize(
    "padding_values, want_v, want_s",
    [
        (None, [[0], [1]], [[b""], [b"q"]]),
        ({"v": np.int64(-1), "s": "pad"}, [[-1], [1]], [[b"pad"], [b"q"]]),
        ({"v": -1, "s": b"pad"}, [[-1], [1]], [[b"pad"], [b"q"]]),
    ],
    ids=["defaults", "per-component", "python-values"],
)
def test_padded_batch_padding_values(padding_values: Any, want_v: Any, want_s: Any) -> None:
    ds = vectors([0, 1, 2]).map(lambda v: {"v": v, "s": np.full(len(v), b"q", dtype=object)})
    first = next(iter(ds.padded_batch(2, padding_values=padding_values)))
    assert first["v"].tolist() == want_v
    assert first["s"].dtype == object
    assert first["s"].tolist() == want_s


def test_padded_batch_one_padding_value_applies_to_every_component() -> None:
    ds = vectors([0, 1]).map(lambda v: (v, v)).padded_batch(2, padding_values=np.int64(-1))
    (batch,) = list(ds)
    assert [c.tolist() for c in batch] == [[[-1], [1]], [[-1], [1]]]


def test_padded_batch_of_strings() -> None:
    ds = (
        D.from_tensor_slices(["a", "bb", "c"])
        .map(lambda s: np.array([s] * len(s), dtype=object))
        .padded_batch(2)
    )
    assert_elements_equal(
        list(ds),
        [strings(["a", ""], ["bb", "bb"]), strings(["c"])],
    )


def test_padded_batch_drop_remainder_spec_and_cardinality() -> None:
    ds = vectors([1, 2, 3]).padded_batch(2, drop_remainder=True)
    assert rows(ds) == [[[0, 0], [1, 1]]]
    assert ds.element_spec == Spec((2, None), I64)
    assert D.range(5).padded_batch(2, drop_remainder=True).cardinality() == 2
    assert D.range(5).padded_batch(2).cardinality() == 3


def test_padded_batch_state_roundtrip_over_repeat() -> None:
    ds = vectors([2, 0, 1, 3, 1]).repeat(2).padded_batch(3, padding_values=np.int64(9))
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3, 4))


@pytest.mark.parametrize(
    "values, padding",
    [
        (np.array([[1], [2]], np.int64), np.float32(0.5)),
        (np.array([[1], [2]], np.int64), np.int32(7)),
        (np.array([[1], [2]], np.float64), 1),
        (np.array([[1], [2]], np.uint8), 300),
        (np.array([[b"a"], [b"b"]], object), 0.5),
    ],
    ids=[
        "float32-for-int64",
        "int32-for-int64",
        "int-for-float64",
        "int-beyond-uint8",
        "float-for-string",
    ],
)
def test_padding_values_are_never_cast_silently(values: np.ndarray, padding: Any) -> None:
    for ds in (D.from_tensor_slices(values), D.from_tensor_slices(values).take(0)):
        with pytest.raises(TypeError, match="padding_values"):
            ds.padded_batch(2, padding_values=padding)


def test_a_python_number_of_the_component_kind_pads_it() -> None:
    ds = vectors([1, 2]).padded_batch(2, padding_values=-1)  # int64 rows, a Python int
    assert rows(ds) == [[[0, -1], [1, 1]]]
    floats = D.from_tensor_slices(np.ones((2, 1), np.float64)).padded_batch(
        2, padded_shapes=[2], padding_values=0.5
    )
    (batch,) = list(floats)
    assert batch.dtype == np.float64 and batch.tolist() == [[1.0, 0.5], [1.0, 0.5]]
