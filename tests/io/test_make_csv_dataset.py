"""make_csv_dataset, checked against TensorFlow's."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_state_roundtrip, take

pytestmark = pytest.mark.timeout(120)


def write(directory: Path, name: str, data: bytes) -> None:
    (directory / name).write_bytes(data)


HEADER = b"name,age,score,big,note,flag\n"
BODIES = [
    b'"Smith, J",31,1.5,5000000000,"said ""hi""",nan\n',
    b"Lee,,2.25,7,,1\nKim,40,,-3,plain,2\n",
    b'"O\'Neil",28,3e5,0,"two\nlines",\n',
]


@pytest.fixture
def table(tmp_path: Path) -> str:
    """Three files with one header: quotes, empty fields, an int64, a 'nan' (which makes
    tf.data infer a string column)."""
    for i, body in enumerate(BODIES):
        write(tmp_path, f"t{i}.csv", HEADER + body)
    return str(tmp_path / "t*.csv")


def numpy(value: Any) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def as_rows(batches: list[Any]) -> list[dict[str, Any]]:
    """Batches of (features[, label]) as a list of one dict per row, values as numpy."""
    rows = []
    for batch in batches:
        features, label = batch if isinstance(batch, tuple) else (batch, None)
        columns = {k: numpy(v) for k, v in features.items()}
        if label is not None:
            columns["__label__"] = numpy(label)
        for i in range(len(next(iter(columns.values())))):
            rows.append({k: v[i] for k, v in columns.items()})
    return rows


def row_key(row: dict[str, Any]) -> str:
    """A row as text, to compare rows as multisets."""
    return repr(sorted((k, repr(v)) for k, v in row.items()))


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for k in w:
            assert np.asarray(g[k]).dtype == np.asarray(w[k]).dtype, k
            if isinstance(w[k], bytes):
                assert g[k] == w[k], k
            else:
                np.testing.assert_array_equal(g[k], w[k], err_msg=k)


MAKE_CASES: list[dict[str, Any]] = [
    {},
    {"label_name": "age"},
    {"select_columns": ["score", "name", "flag"], "label_name": "flag"},
    {"select_columns": [0, 2]},
    {"column_defaults": [str, [0], [0.0], [np.int64(0)], [""], [0.0]]},
    {"num_epochs": 2, "num_parallel_reads": 2},
    {"num_rows_for_inference": 1},
    {"na_value": "nan"},
]


@pytest.mark.parametrize("kwargs", MAKE_CASES, ids=[json.dumps(k, default=str) for k in MAKE_CASES])
def test_make_csv_dataset_matches_tensorflow(table: str, kwargs: dict[str, Any]) -> None:
    tf = pytest.importorskip("tensorflow")
    theirs_kwargs = dict(kwargs)
    if "column_defaults" in kwargs:
        theirs_kwargs["column_defaults"] = [
            tf.string,
            tf.constant([0]),
            tf.constant([0.0]),
            tf.constant([0], tf.int64),
            tf.constant([""]),
            tf.constant([0.0]),
        ]
    common = {"batch_size": 2, "shuffle": False, "num_epochs": 1}
    want = as_rows(
        list(tf.data.experimental.make_csv_dataset(table, **{**common, **theirs_kwargs}))
    )
    ours = fl.io.make_csv_dataset(table, **{**common, **kwargs})
    got = as_rows(list(ours))
    assert_same_rows(got, want)
    assert len(got) == 4 * kwargs.get("num_epochs", 1)


def test_make_csv_dataset_shuffled_is_the_same_multiset(table: str) -> None:
    tf = pytest.importorskip("tensorflow")
    kwargs = {"batch_size": 3, "num_epochs": 3, "shuffle_seed": 5, "label_name": "name"}
    want = as_rows(list(tf.data.experimental.make_csv_dataset(table, **kwargs)))
    got = as_rows(list(fl.io.make_csv_dataset(table, **kwargs)))
    assert sorted(map(row_key, got)) == sorted(map(row_key, want))


def test_make_csv_dataset_repeats_forever_in_full_batches(table: str) -> None:
    ds = fl.io.make_csv_dataset(table, batch_size=3, label_name="age", shuffle_seed=1)
    assert ds.cardinality() == fl.INFINITE_CARDINALITY
    features, label = ds.element_spec
    assert label == fl.TensorSpec((3,), np.dtype(np.int32))
    assert features["name"] == fl.TensorSpec((3,), np.dtype(object))
    with ds.iterator() as it:
        batches = take(it, 5)
    assert all(len(b[1]) == 3 for b in batches)


def test_make_csv_dataset_state_roundtrip(table: str) -> None:
    ds = fl.io.make_csv_dataset(table, batch_size=1, num_epochs=2, shuffle=False)
    assert_state_roundtrip(ds, cut_points=(0, 1, 3, 5))


def test_make_csv_dataset_compressed_and_skipping_errors(tmp_path: Path) -> None:
    for i, body in enumerate([b"a,b\n1,2\nx,3\n", b"a,b\n4,5\n"]):
        write(tmp_path, f"c{i}.csv.gz", gzip.compress(body))
    kwargs = {"batch_size": 5, "num_epochs": 1, "shuffle": False, "compression_type": "GZIP"}
    pattern = str(tmp_path / "c*.csv.gz")
    ds = fl.io.make_csv_dataset(pattern, column_defaults=[np.int32, np.int32], **kwargs)
    with pytest.raises(ValueError, match="not a valid int32: x"):
        list(ds)
    (batch,) = list(
        fl.io.make_csv_dataset(
            pattern, column_defaults=[np.int32, np.int32], ignore_errors=True, **kwargs
        )
    )
    assert batch["a"].tolist() == [1, 4] and batch["b"].tolist() == [2, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"file_pattern": "nothing-*.csv"}, "No files match"),
        ({"file_pattern": []}, "should not be empty"),
        ({"header": False}, "Expected `column_names` or `header`"),
        ({"column_names": ["a", "a", "b", "c", "d", "e"]}, "repeats a name"),
        ({"label_name": "nope"}, "label_name"),
        ({"select_columns": ["nope"]}, "select_columns"),
        ({"select_columns": [0, 0]}, "twice"),
        ({"select_columns": [9]}, "select_columns"),
        ({"select_columns": [0], "column_defaults": [str, str]}, "same length"),
    ],
)
def test_make_csv_dataset_bad_arguments(table: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fl.io.make_csv_dataset(**{"file_pattern": table, "batch_size": 1, **kwargs})


def test_make_csv_dataset_header_mismatch(tmp_path: Path) -> None:
    write(tmp_path, "a.csv", b"x,y\n1,2\n")
    write(tmp_path, "b.csv", b"x,z\n1,2\n")
    with pytest.raises(ValueError, match="same column names"):
        fl.io.make_csv_dataset(str(tmp_path / "*.csv"), 1)


@pytest.mark.parametrize("reads", [fl.AUTOTUNE, 3])
def test_make_csv_dataset_parallel_reads_read_every_row(table: str, reads: int) -> None:
    common = {"batch_size": 1, "num_epochs": 1, "shuffle": False, "label_name": "name"}
    one = as_rows(list(fl.io.make_csv_dataset(table, **common)))
    many = fl.io.make_csv_dataset(table, num_parallel_reads=reads, sloppy=True, **common)
    assert sorted(map(row_key, as_rows(list(many)))) == sorted(map(row_key, one))
