"""save / load in feedline's own directory format (tf.data's own format is not read)."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, assert_state_roundtrip

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
Point = collections.namedtuple("Point", ["x", "y"])


def mixed() -> fl.Dataset:
    """Namedtuples of an int64 scalar and a dict of a string and a ragged float16 vector."""
    return D.range(5).map(
        lambda x: Point(x, {"s": b"s" * int(x), "v": np.arange(int(x), dtype=np.float16)})
    )


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_roundtrip_keeps_elements_spec_and_count(tmp_path: Path, compression: Any) -> None:
    mixed().save(tmp_path / "saved", compression=compression)
    loaded = D.load(tmp_path / "saved")
    assert loaded.cardinality() == 5
    got = list(loaded)
    want = list(mixed())
    # The namedtuple class is made anew from the saved names; compared field by field.
    assert type(got[0]).__name__ == "Point" and type(got[0])._fields == ("x", "y")
    assert_elements_equal([tuple(p) for p in got], [tuple(p) for p in want])
    spec = loaded.element_spec
    assert tuple(spec) == tuple(mixed().element_spec)


def test_cardinality_is_the_number_of_saved_elements(tmp_path: Path) -> None:
    D.range(10).filter(lambda x: x % 3 == 0).save(tmp_path)
    loaded = D.load(tmp_path)
    assert loaded.cardinality() == 4
    assert [int(v) for v in loaded] == [0, 3, 6, 9]


def test_a_new_save_replaces_the_old_one(tmp_path: Path) -> None:
    D.range(5).save(tmp_path, compression="GZIP")
    D.from_tensor_slices(["a", "b"]).save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["element_spec.json", "elements.jsonl"]
    assert list(D.load(tmp_path)) == [b"a", b"b"]


def test_compression_must_match_and_be_known(tmp_path: Path) -> None:
    D.range(3).save(tmp_path, compression="GZIP")
    assert [int(v) for v in D.load(tmp_path, compression="GZIP")] == [0, 1, 2]
    D.range(3).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="saved with compression None, not 'GZIP'"):
        D.load(tmp_path / "plain", compression="GZIP")
    with pytest.raises(ValueError, match="compression must be None or 'GZIP'"):
        D.range(3).save(tmp_path, compression="SNAPPY")


def test_missing_or_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved dataset"):
        D.load(tmp_path / "nothing")
    (tmp_path / "element_spec.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not from feedline's save"):
        D.load(tmp_path)


def test_datasets_of_datasets_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="elements that are datasets"):
        D.range(4).window(2).save(tmp_path)
    assert not os.listdir(tmp_path)


def test_element_spec_may_be_given(tmp_path: Path) -> None:
    D.range(3).batch(2).save(tmp_path)
    spec = fl.TensorSpec((None,), np.dtype(np.int64))
    assert D.load(tmp_path, element_spec=spec).element_spec == spec


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_loaded_state_roundtrip(tmp_path: Path, compression: Any) -> None:
    D.from_tensor_slices((["x", "yy", "zzz"] * 5, np.ones((15, 2)))).save(tmp_path, compression)
    assert_state_roundtrip(D.load(tmp_path).repeat(2))
