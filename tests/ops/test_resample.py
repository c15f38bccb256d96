"""rejection_resample: the class distribution moves to the target, reproducibly with a seed,
(class, element) pairs, states; the tf.data statistics and exact cases are in
tests/conformance/test_ported_api.py."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import feedline as fl
from feedline.ops.resample import acceptance
from tests.helpers import assert_elements_equal, assert_state_roundtrip


def _skewed(n: int = 4000) -> fl.Dataset:
    """Classes 0 (90%) and 1 (10%): element x has class 1 when x % 10 == 0."""
    return fl.Dataset.range(n).map(lambda x: (x, np.int64(x % 10 == 0)))


def _class(x: np.int64, c: np.int64) -> np.int64:
    return c


def _shares(ds: fl.Dataset) -> dict[int, float]:
    counts = collections.Counter(int(label) for label, _ in ds)
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())}


@pytest.mark.parametrize("initial", [None, [0.9, 0.1]])
def test_classes_move_to_the_target(initial: list[float] | None) -> None:
    ds = _skewed().rejection_resample(_class, [0.5, 0.5], initial, seed=3)
    shares = _shares(ds)
    assert abs(shares[1] - 0.5) < 0.08, shares  # from 10%: about 400 class-1 draws each way


def test_pairs_of_class_and_element_reproducible_with_a_seed() -> None:
    ds = _skewed(500).rejection_resample(_class, [0.3, 0.7], [0.9, 0.1], seed=7)
    first = list(ds)
    label, element = first[0]
    assert label == element[1]
    assert_elements_equal(list(ds), first)
    spec = ds.element_spec
    assert spec[0] == fl.TensorSpec((), np.dtype(np.int64))
    assert spec[1] == _skewed().element_spec


def test_the_target_already_met_draws_nothing() -> None:
    ds = _skewed(20).rejection_resample(_class, [0.9, 0.1], [0.9, 0.1])
    assert [int(x) for _, (x, _) in ds] == list(range(20))
    assert ds.cardinality() == 20


def test_acceptance_is_tf_data_formula() -> None:
    accept, original = acceptance(np.array([0.9, 0.1], np.float32), np.array([0.5, 0.5]))
    ratio = np.array([0.5 / 0.9, 0.5 / 0.1])
    np.testing.assert_allclose(accept, (ratio - ratio.min()) / (ratio.max() - ratio.min()), 1e-6)
    assert original == pytest.approx(ratio.min(), rel=1e-6)


def test_state_round_trip() -> None:
    ds = _skewed(300).rejection_resample(_class, [0.5, 0.5], seed=1)
    assert_state_roundtrip(ds, cut_points=(0, 1, 17, 60))


def test_bad_distributions_fail_at_build() -> None:
    with pytest.raises(ValueError, match="non-negative probabilities"):
        _skewed().rejection_resample(_class, [0.5, -0.5])
    with pytest.raises(ValueError, match="has 3 classes, target_dist 2"):
        _skewed().rejection_resample(_class, [0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="vector"):
        _skewed().rejection_resample(_class, [[0.5, 0.5]])


def test_the_experimental_spelling_builds_the_same_pipeline() -> None:
    via_apply = _skewed(200).apply(fl.experimental.rejection_resample(_class, [0.5, 0.5], seed=2))
    direct = _skewed(200).rejection_resample(_class, [0.5, 0.5], seed=2)
    assert_elements_equal(list(via_apply), list(direct))
