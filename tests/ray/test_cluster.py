"""``distribute`` on a local multi-node cluster (``ray.cluster_utils.Cluster``: a head with no
CPU and two nodes of one, all on 127.0.0.1): a node removed mid-run loses and repeats nothing,
and every port the cluster's processes listen on is bound to loopback."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, take
from tests.ray.conftest import listening, loopback, ray_processes, wait_gone, wait_no_actors
from tests.ray.functions import slow, square

ray = pytest.importorskip("ray")
import feedline.ray as flr  # noqa: E402
from feedline.ray.cluster import loopback_only  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, list[Any], str]]:
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="feedline-ray-cluster-")
    # The cluster writes its address under RAY_TMPDIR: this run's own, not the machine's.
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"))
    c = None
    local = {"node_ip_address": "127.0.0.1", "temp_dir": temp_dir, "include_dashboard": False}
    try:
        with loopback_only(ray):
            c = Cluster(
                initialize_head=True,
                connect=True,
                head_node_args={**local, "num_cpus": 0, "object_store_memory": 80 * 2**20},
            )
            nodes = [c.add_node(**local, num_cpus=1, object_store_memory=80 * 2**20)]
            nodes.append(c.add_node(**local, num_cpus=1, object_store_memory=80 * 2**20))
        yield c, nodes, temp_dir
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        left = wait_gone(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = saved
        assert not left, f"ray processes left: {[p.name() for p in left]}"


def test_node_removed_mid_run_every_element_once_in_order(
    cluster: tuple[Any, list[Any], str],
) -> None:
    c, nodes, temp_dir = cluster
    # Every listening socket of the cluster's processes (nodes, workers, agents): loopback.
    ports = listening(ray_processes(temp_dir))
    assert ports and all(loopback(address) for address, _, _ in ports), ports

    # ~1.5 s of work per actor: the node goes while most of it is still to do.
    ds = fl.Dataset.range(1500).map(slow).map(square)
    want = list(fl.Dataset.range(1500).map(square))
    with ds.apply(flr.distribute(num_workers=2, num_shards=8)).iterator() as it:
        got = take(it, 40)
        nodes_used = {a["node"].split()[0] for a in flr.actors(it)}
        assert len(nodes_used) == 2, flr.actors(it)  # one actor on each node
        c.remove_node(nodes[1], allow_graceful=False)
        got += list(it)
        history = flr.history(it)
    assert_elements_equal(got, want)
    assert any("lost" in e["reason"] for e in history), history
    assert not wait_no_actors()
