"""fl.experimental: tf.data.experimental's names, each feedline's own object or a
transformation for ``apply`` building the same op as the Dataset method."""

from __future__ import annotations

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, assert_state_roundtrip

E = fl.experimental

SAME_OBJECTS = {
    "sample_from_datasets": fl.Dataset.sample_from_datasets,
    "choose_from_datasets": fl.Dataset.choose_from_datasets,
    "cardinality": fl.Dataset.cardinality,
    "get_single_element": fl.Dataset.get_single_element,
    "save": fl.Dataset.save,
    "load": fl.Dataset.load,
    "Counter": fl.Dataset.counter,
    "AUTOTUNE": fl.AUTOTUNE,
    "INFINITE_CARDINALITY": fl.INFINITE_CARDINALITY,
    "UNKNOWN_CARDINALITY": fl.UNKNOWN_CARDINALITY,
    "AutotuneOptions": fl.AutotuneOptions,
}


@pytest.mark.parametrize("name", sorted(SAME_OBJECTS))
def test_plain_names_are_the_same_objects(name: str) -> None:
    assert getattr(E, name) is SAME_OBJECTS[name]


def test_csv_readers_are_feedline_io_s() -> None:
    try:
        csv_dataset = fl.io.CsvDataset
    except (AttributeError, ImportError):  # pragma: no cover - feedline.io.csv not there yet
        pytest.skip("feedline.io.csv is not there yet")
    assert E.CsvDataset is csv_dataset
    assert E.make_csv_dataset is fl.io.make_csv_dataset


def test_every_listed_name_exists() -> None:
    for name in E.__all__:
        if name not in ("CsvDataset", "make_csv_dataset"):
            getattr(E, name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        E.nothing  # noqa: B018


def _keyed() -> fl.Dataset:
    return fl.Dataset.range(10)


# (transformation for apply, the same through the Dataset method)
TRANSFORMATIONS = {
    "group_by_window": (
        E.group_by_window(lambda x: x % 2, lambda k, w: w.batch(3), 3),
        lambda d: d.group_by_window(lambda x: x % 2, lambda k, w: w.batch(3), 3),
    ),
    "bucket_by_sequence_length": (
        E.bucket_by_sequence_length(lambda x: x, [3, 6], [2, 2, 2], no_padding=True),
        lambda d: d.bucket_by_sequence_length(lambda x: x, [3, 6], [2, 2, 2], no_padding=True),
    ),
    "ignore_errors": (E.ignore_errors(), lambda d: d.ignore_errors()),
    "unique": (E.unique(), lambda d: d.unique()),
    "scan": (
        E.scan(np.int64(0), lambda s, x: (s + x, s)),
        lambda d: d.scan(np.int64(0), lambda s, x: (s + x, s)),
    ),
    "enumerate_dataset": (E.enumerate_dataset(3), lambda d: d.enumerate(3)),
    "take_while": (E.take_while(lambda x: x < 4), lambda d: d.take_while(lambda x: x < 4)),
    "unbatch": (E.unbatch(), lambda d: d.batch(3).unbatch()),
    "parallel_interleave": (
        E.parallel_interleave(lambda x: fl.Dataset.range(x), cycle_length=2),
        lambda d: d.interleave(lambda x: fl.Dataset.range(x), 2, num_parallel_calls=2),
    ),
    "shuffle_and_repeat": (
        E.shuffle_and_repeat(4, 2, seed=1),
        lambda d: d.shuffle(4, seed=1).repeat(2),
    ),
    "map_and_batch": (
        E.map_and_batch(lambda x: x * 2, 4, num_parallel_batches=1),
        lambda d: d.map(lambda x: x * 2, num_parallel_calls=4).batch(4),
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
def test_transformations_build_what_the_method_builds(name: str) -> None:
    transformation, method = TRANSFORMATIONS[name]
    source = _keyed() if name != "unbatch" else _keyed().batch(3)
    via_apply = source.apply(transformation)
    direct = method(_keyed())
    assert_elements_equal(list(via_apply), list(direct))
    assert via_apply.element_spec == direct.element_spec
    assert via_apply.cardinality() == direct.cardinality()
    assert getattr(E, name).__name__ == name


def test_assert_cardinality_declares_and_checks_the_count() -> None:
    unknown = fl.Dataset.range(5).filter(lambda x: x >= 0)
    assert unknown.cardinality() == fl.UNKNOWN_CARDINALITY
    ds = unknown.apply(E.assert_cardinality(5))
    assert ds.cardinality() == 5
    assert list(ds) == list(range(5))
    assert_state_roundtrip(ds, cut_points=(0, 1, 4, 5))
    short = unknown.apply(E.assert_cardinality(7))
    with pytest.raises(fl.StageError, match="expected to hold 7 elements but held only 5"):
        list(short)
    long = unknown.apply(E.assert_cardinality(3))
    got = []
    with pytest.raises(fl.StageError, match="held at least 4"):
        for x in long:
            got.append(int(x))
    assert got == [0, 1, 2]
    forever = fl.Dataset.range(3).repeat().apply(E.assert_cardinality(fl.INFINITE_CARDINALITY))
    assert forever.cardinality() == fl.INFINITE_CARDINALITY
    with pytest.raises(ValueError, match="expected_cardinality"):
        E.assert_cardinality(-5)
