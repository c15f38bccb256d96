"""A local Ray for the tests of ``feedline.ray``: bound to 127.0.0.1, its own temp dir, two
CPUs; shut down (and checked gone) at the end of each module that uses it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
OBJECT_STORE = 128 * 2**20


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: starts a local Ray cluster (tests/ray)")


def ray_processes(temp_dir: str) -> list[psutil.Process]:
    """This machine's processes of the Ray whose temp dir is ``temp_dir``: those naming it,
    and the descendants of this process (its workers name only the session) but those of
    feedline's process executor, which earlier tests of the run leave for the run's length:
    its forkserver, multiprocessing's resource tracker, and its workers."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True) if not _feedline_own(p)}
    for p in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or ()):
            found[p.pid] = p
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _feedline_own(process: psutil.Process) -> bool:
    try:
        line = " ".join(process.cmdline())
        return process.name().startswith("feedline-") or any(
            part in line for part in ("multiprocessing.forkserver", "resource_tracker")
        )
    except psutil.Error:
        return True  # gone already


def listening(processes: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket ``processes`` listen on."""
    pids = {p.pid: p for p in processes}
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, pids[c.pid].name()))
    return out


def loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def wait_gone(temp_dir: str, seconds: float = 20.0) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    left = ray_processes(temp_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = ray_processes(temp_dir)
    return left


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """Ray with two CPUs on 127.0.0.1 for one test module; nothing of it left after."""
    ray = pytest.importorskip("ray")
    from feedline.ray.cluster import local_init_args, loopback_only

    temp_dir = tempfile.mkdtemp(prefix="feedline-ray-test-")
    with loopback_only(ray):
        ray.init(num_cpus=2, **local_init_args(temp_dir, OBJECT_STORE))
    try:
        ports = listening(ray_processes(temp_dir))
        assert ports and all(loopback(address) for address, _, _ in ports), ports
        yield ray
    finally:
        ray.shutdown()
        left = wait_gone(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"ray processes left: {[p.name() for p in left]}"


def actor_processes() -> list[psutil.Process]:
    """Processes of feedline's shard actors (Ray names an actor's process after its class)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if "ShardWorker" in " ".join(p.info["cmdline"] or ()):
            out.append(p)
    return out


def wait_no_actors(seconds: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    left = actor_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = actor_processes()
    return left
