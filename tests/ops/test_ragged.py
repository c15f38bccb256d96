"""ragged_batch: RaggedBatch(values, row_lengths) for components whose first dimension varies,
dense batches for the others, states, and the errors of what one ragged dimension cannot hold.
tf.data's outputs on the same pipelines: tests/conformance/test_ported_api.py."""

from __future__ import annotations

import numpy as np
import pytest

import feedline as fl
from feedline.errors import StageError
from feedline.ops.ragged import RaggedBatch
from tests.helpers import assert_state_roundtrip


def _lengths(n: int) -> fl.Dataset:
    """Elements 0..n-1, element i a vector of i % 4 copies of i."""
    return fl.Dataset.range(n).map(lambda x: np.full(int(x % 4), x))


def test_rows_of_varying_length() -> None:
    ds = _lengths(7).ragged_batch(3)
    batches = list(ds)
    assert [type(b) for b in batches] == [RaggedBatch] * 3
    first = batches[0]
    np.testing.assert_array_equal(first.values, [1, 2, 2])
    np.testing.assert_array_equal(first.row_lengths, [0, 1, 2])
    assert first.row_lengths.dtype == np.int64
    rows = [row.tolist() for b in batches for row in b.rows()]
    assert rows == [[], [1], [2, 2], [3, 3, 3], [], [5], [6, 6]]
    assert ds.cardinality() == 3
    assert ds.element_spec == RaggedBatch(
        fl.TensorSpec((None,), np.dtype(np.int64)), fl.TensorSpec((None,), np.dtype(np.int64))
    )


def test_drop_remainder_and_row_splits_dtype() -> None:
    ds = _lengths(7).ragged_batch(3, drop_remainder=True, row_splits_dtype=np.int32)
    assert len(list(ds)) == 2
    assert ds.element_spec.row_lengths == fl.TensorSpec((3,), np.dtype(np.int32))
    assert next(iter(ds)).row_lengths.dtype == np.int32
    with pytest.raises(ValueError, match="row_splits_dtype"):
        _lengths(3).ragged_batch(2, row_splits_dtype=np.float32)


def test_static_components_are_batched_densely() -> None:
    ds = fl.Dataset.range(5).map(lambda x: (np.full((int(x % 3), 2), x), x, np.full(2, x)))
    ragged, scalars, vectors = next(iter(ds.ragged_batch(2)))
    assert isinstance(ragged, RaggedBatch)
    assert ragged.values.shape == (1, 2)
    np.testing.assert_array_equal(scalars, [0, 1])
    np.testing.assert_array_equal(vectors, [[0, 0], [1, 1]])
    spec = ds.ragged_batch(2).element_spec
    assert spec[0].values == fl.TensorSpec((None, 2), np.dtype(np.int64))
    assert spec[1] == fl.TensorSpec((None,), np.dtype(np.int64))


def test_strings_and_dicts() -> None:
    words = fl.Dataset.from_generator(
        lambda: ({"w": s.split()} for s in ("a b", "c", "d e f")),
        output_signature={"w": fl.TensorSpec((None,), object)},
    )
    batch = next(iter(words.ragged_batch(3)))
    assert [r.tolist() for r in batch["w"].rows()] == [[b"a", b"b"], [b"c"], [b"d", b"e", b"f"]]


def test_only_the_first_dimension_may_vary_within_a_batch() -> None:
    ds = fl.Dataset.from_generator(
        lambda: (np.zeros((2, i + 1)) for i in range(3)),
        output_signature=fl.TensorSpec((None, None), np.float64),
    )
    with pytest.raises(StageError, match="use padded_batch"):
        list(ds.ragged_batch(3))


def test_state_round_trip() -> None:
    assert_state_roundtrip(_lengths(11).ragged_batch(3), cut_points=(0, 1, 2, 3))


def test_dense_to_ragged_batch_is_ragged_batch() -> None:
    via_apply = _lengths(5).apply(fl.experimental.dense_to_ragged_batch(2))
    direct = _lengths(5).ragged_batch(2)
    for a, b in zip(via_apply, direct, strict=True):
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.row_lengths, b.row_lengths)
