"""from_tensor_slices of mapping-like inputs (np.load's NpzFile, mappings, tables of named
columns) sliced by their items, and the values no tensor holds refused, never passed on as
Python objects under a string spec."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, assert_state_roundtrip

STRING = np.dtype(object)


def test_an_npz_file_is_a_dict_of_its_arrays(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(6, dtype=np.float32).reshape(3, 2), y=np.array(["a", "b", "c"]))
    with np.load(path) as npz:
        ds = fl.Dataset.from_tensor_slices(npz)
    assert ds.element_spec == {
        "x": fl.TensorSpec((2,), np.dtype(np.float32)),
        "y": fl.TensorSpec((), STRING),
    }
    got = list(ds)  # read after the file closed: the arrays were taken when the dataset was built
    want = [{"x": np.array([2 * i, 2 * i + 1], np.float32), "y": s} for i, s in enumerate(b"abc")]
    assert_elements_equal(got, [{**w, "y": bytes([w["y"]])} for w in want])
    assert_state_roundtrip(ds, cut_points=(0, 1, 2))


def test_other_mappings_are_read_by_their_items() -> None:
    ds = fl.Dataset.from_tensor_slices(types.MappingProxyType({"b": [1, 2], "a": [3, 4]}))
    assert list(ds) == [{"b": 1, "a": 3}, {"b": 2, "a": 4}]
    assert list(ds.element_spec) == ["b", "a"]


def test_a_table_of_named_columns_is_a_dict_of_columns() -> None:
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"n": [1, 2, 3], "s": ["x", "yy", "é"], "v": [[1.0, 2.0]] * 3})
    ds = fl.Dataset.from_tensor_slices(table)
    assert ds.element_spec == {
        "n": fl.TensorSpec((), np.dtype(np.int64)),
        "s": fl.TensorSpec((), STRING),
        "v": fl.TensorSpec((2,), np.dtype(np.float64)),
    }
    rows = list(ds)
    assert [r["s"] for r in rows] == [b"x", b"yy", "é".encode()]
    assert all(type(r["s"]) is bytes for r in rows)
    np.testing.assert_array_equal(rows[2]["v"], [1.0, 2.0])


def test_a_hugging_face_dataset_is_a_dict_of_columns() -> None:
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"text": ["a", "bc"], "label": [0, 1]})
    ds = fl.Dataset.from_tensor_slices(hf)
    assert ds.element_spec["text"] == fl.TensorSpec((), STRING)
    assert list(ds) == [{"text": b"a", "label": 0}, {"text": b"bc", "label": 1}]


def test_values_no_tensor_holds_are_refused_at_build() -> None:
    pa = pytest.importorskip("pyarrow")
    with pytest.raises(TypeError, match="missing values"):
        fl.Dataset.from_tensor_slices(pa.table({"n": [1, None, 3]}))
    with pytest.raises(TypeError, match="cannot make a tensor of values of type ndarray"):
        fl.Dataset.from_tensor_slices(pa.table({"l": [[1], [1, 2], [3]]}))
    records = np.empty(2, dtype=object)
    records[:] = [{"a": 1}, {"a": 2}]
    with pytest.raises(TypeError, match="of type dict"):
        fl.Dataset.from_tensor_slices(records)
    with pytest.raises(ValueError, match="cannot slice its input faithfully"):
        fl.Dataset.from_tensor_slices({"a": [[1], [1, 2]]})


def test_object_arrays_of_str_become_tf_strings() -> None:
    words = np.array(["ab", "c"], dtype=object)
    ds = fl.Dataset.from_tensor_slices(words)
    assert ds.element_spec == fl.TensorSpec((), STRING)
    assert list(ds) == [b"ab", b"c"]
    assert next(iter(fl.Dataset.from_tensors(words))).tolist() == [b"ab", b"c"]
