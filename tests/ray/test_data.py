"""Ray Data interop: a Ray ``Dataset`` as a feedline source (resumable), and a feedline
pipeline as a Ray Data datasource whose read tasks each run one virtual shard."""

from __future__ import annotations

import json

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, take
from tests.ray.functions import square

pytest.importorskip("ray")
import feedline.ray as flr

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120), pytest.mark.usefixtures("local_ray")]


def test_round_trip_through_ray_data() -> None:
    ds = fl.Dataset.range(100).map(square)
    ray_ds = flr.to_ray_dataset(ds, num_shards=4)
    rows = sorted(ray_ds.take_all(), key=lambda row: int(row["item"][0]))
    assert_elements_equal([row["item"] for row in rows], list(ds))

    with flr.from_ray_dataset(ray_ds).iterator() as it:
        got = sorted(tuple(int(v) for v in x) for x in it)
    assert got == sorted(tuple(int(v) for v in x) for x in ds)


def test_ray_dataset_source_resumes() -> None:
    import ray

    ray_ds = ray.data.from_items([{"a": i, "b": float(i) / 2} for i in range(30)])
    ds = flr.from_ray_dataset(ray_ds).map(lambda row: row["a"] * 2)
    want = [int(x) for x in ds]
    assert want == [2 * i for i in range(30)]
    with ds.iterator() as it:
        first = take(it, 11)
        state = json.loads(json.dumps(it.get_state()))
    with ds.iterator(state) as it:
        rest = list(it)
    assert [int(x) for x in first + rest] == want
    assert isinstance(first[0], np.integer)
