"""snapshot: written on the first complete pass, read on later ones (also by a new pipeline
object, as in a new run), per pipeline under one path; shards, reader_func, compression;
states of reading and writing passes; damaged files refused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.errors import DataLossError, StageError
from tests.helpers import (
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
    take,
)


def _source(calls: list[int] | None = None, n: int = 10) -> fl.Dataset:
    """(int64, float32 vector, bytes) elements; ``calls`` records every element made."""

    def make(x: Any) -> Any:
        if calls is not None:
            calls.append(int(x))
        return x, np.full(3, x, np.float32), b"s" * int(x)

    return fl.Dataset.range(n).map(make)


def _only_dir(path: Path) -> Path:
    (directory,) = [p for p in path.iterdir() if p.is_dir()]
    return directory


def test_first_pass_writes_later_passes_read(tmp_path: Path) -> None:
    calls: list[int] = []
    ds = _source(calls).snapshot(str(tmp_path))
    assert ds.element_spec == _source().element_spec
    calls.clear()  # the map's spec was found by running it on a first element
    first = list(ds)
    assert calls == list(range(10))
    second = list(ds)
    assert calls == list(range(10))  # read from the files: the map did not run again
    assert_elements_equal(second, first)
    # A new pipeline object of the same code (a new run) reads it too.
    again: list[int] = []
    new_run = _source(again).snapshot(str(tmp_path))
    assert new_run.element_spec == ds.element_spec
    again.clear()  # finding the spec ran the map once
    assert_elements_equal(list(new_run), first)
    assert again == []
    assert ds.cardinality() == 10


def test_a_pass_cut_short_publishes_nothing(tmp_path: Path) -> None:
    ds = _source().snapshot(str(tmp_path))
    with ds.iterator() as it:
        take(it, 3)
    assert list(tmp_path.iterdir()) == []
    assert list(ds.take(4)) and list(tmp_path.iterdir()) == []
    list(ds)
    assert sorted(os.listdir(_only_dir(tmp_path))) == ["shard-00000000.flsnap", "snapshot.json"]


def test_each_pipeline_has_its_own_snapshot_under_one_path(tmp_path: Path) -> None:
    a = fl.Dataset.range(5).snapshot(str(tmp_path))
    b = fl.Dataset.range(5).map(lambda x: x * 10).snapshot(str(tmp_path))
    assert list(a) == list(range(5))
    assert list(b) == [0, 10, 20, 30, 40]
    assert list(a) == list(range(5)) and list(b) == [0, 10, 20, 30, 40]
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("compression", ["AUTO", None, "GZIP"])
def test_shards_and_compression_give_the_written_order_back(
    tmp_path: Path, compression: str | None
) -> None:
    ds = _source(n=20).snapshot(str(tmp_path), compression, shard_func=lambda x, v, s: x % 3)
    written = list(ds)
    assert sorted(os.listdir(_only_dir(tmp_path)))[:3] == [
        f"shard-{i:08d}.flsnap" for i in range(3)
    ]
    assert_elements_equal(list(ds), written)
    metadata = json.loads((_only_dir(tmp_path) / "snapshot.json").read_text())
    assert [shard[:2] for shard in metadata["shards"]] == [[0, 7], [1, 7], [2, 6]]
    assert metadata["compression"] == ("GZIP" if compression == "GZIP" else "")


def test_reader_func_chooses_how_shards_are_read(tmp_path: Path) -> None:
    ds = fl.Dataset.range(6).snapshot(
        str(tmp_path),
        shard_func=lambda x: x % 2,
        reader_func=lambda shards: shards.flat_map(lambda d: d),
    )
    assert list(ds) == list(range(6))  # the writing pass yields the input's order
    assert list(ds) == [0, 2, 4, 1, 3, 5]  # then shard after shard


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_state_round_trip_while_writing_and_reading(
    tmp_path: Path, compression: str | None
) -> None:
    ds = _source(n=12).snapshot(str(tmp_path / "a"), compression, shard_func=lambda x, v, s: x % 2)
    # Every cut of the round trip makes passes that end: the first complete one publishes.
    assert_state_roundtrip(ds, cut_points=(0, 1, 5, 11))
    assert (tmp_path / "a").exists()
    assert_state_roundtrip(ds, cut_points=(0, 1, 5, 11))


def test_a_writing_pass_resumed_publishes_the_whole_dataset(tmp_path: Path) -> None:
    ds = _source(n=8).snapshot(str(tmp_path))
    with ds.iterator() as it:
        take(it, 5)
        state = json.loads(json.dumps(it.get_state()))
    assert state["root"]["mode"] == "write"
    with ds.iterator(state) as resumed:
        rest = list(resumed)
    assert len(rest) == 3
    assert_elements_equal(list(ds), list(_source(n=8)))


def test_crafted_states_are_refused(tmp_path: Path) -> None:
    ds = fl.Dataset.range(6).snapshot(str(tmp_path))
    writing = saved_state(ds, 2)
    assert_state_rejected(ds, {**writing, "root": {**writing["root"], "index": 99}}, "index")
    list(ds)
    reading = saved_state(ds, 2)
    assert_state_rejected(ds, {**reading, "root": {**reading["root"], "mode": "x"}}, "mode")
    shard = reading["root"]["reader"]["slots"][0][1]
    assert shard == {"index": 2, "offset": shard["offset"]}
    for field, value in (("offset", shard["offset"] + 1), ("offset", 10**9), ("index", 7)):
        crafted = json.loads(json.dumps(reading))
        crafted["root"]["reader"]["slots"][0][1][field] = value
        assert_state_rejected(ds, crafted, field)


def test_damage_is_data_loss_naming_the_file(tmp_path: Path) -> None:
    ds = _source(n=5).snapshot(str(tmp_path))
    list(ds)
    shard = _only_dir(tmp_path) / "shard-00000000.flsnap"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataLossError, match="fails its checksum"):
        list(ds)
    (_only_dir(tmp_path) / "snapshot.json").write_text("{}")
    with pytest.raises(DataLossError, match="is not a feedline snapshot's metadata"):
        list(ds)


def test_elements_that_cannot_be_stored_and_bad_arguments(tmp_path: Path) -> None:
    windows = fl.Dataset.range(4).window(2).snapshot(str(tmp_path))
    with pytest.raises(TypeError, match="datasets"):
        list(windows)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="SNAPPY"):
        fl.Dataset.range(3).snapshot(str(tmp_path), compression="SNAPPY")
    negative = fl.Dataset.range(3).snapshot(str(tmp_path), shard_func=lambda x: x - 1)
    with pytest.raises(StageError, match="non-negative int"):
        list(negative)
    assert list(tmp_path.iterdir()) == []
