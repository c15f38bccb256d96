"""With no Ray running and ``address=None``, feedline starts one itself: on 127.0.0.1 only,
usage statistics off, its own temp dir; closing the pass shuts it down and removes the dir.
Run in a child process: this one may hold another test module's Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

CHILD = textwrap.dedent(
    """
    import glob, json, os, tempfile, time
    import feedline as fl, feedline.ray as flr
    from tests.ray.conftest import listening, ray_processes, wait_gone

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "feedline-ray-*")))
    ds = fl.Dataset.range(50).map(lambda x: x + 1).apply(flr.distribute(num_workers=1))
    out = {}
    with ds.iterator() as it:
        first = [int(next(it)) for _ in range(3)]
        import ray
        (temp_dir,) = set(glob.glob(os.path.join(tempfile.gettempdir(), "feedline-ray-*"))) - before
        out["ports"] = listening(ray_processes(temp_dir))
        out["nodes"] = [n["NodeManagerAddress"] for n in ray.nodes()]
        out["usage_stats"] = os.environ.get("RAY_USAGE_STATS_ENABLED")
        out["elements"] = first + [int(x) for x in it]
    out["initialized_after"] = ray.is_initialized()
    out["left"] = [p.name() for p in wait_gone(temp_dir)]
    out["dir_left"] = os.path.exists(temp_dir)
    print(json.dumps(out))
    """
)


def test_a_ray_started_here_stays_on_loopback_and_goes_with_the_pass() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["elements"] == list(range(1, 51))
    assert out["ports"], "no listening port found: the check would prove nothing"
    bad = [p for p in out["ports"] if p[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not bad, bad
    assert out["nodes"] == ["127.0.0.1"]
    assert out["usage_stats"] == "0"
    assert not out["initialized_after"]
    assert not out["left"], out["left"]
    assert not out["dir_left"]
