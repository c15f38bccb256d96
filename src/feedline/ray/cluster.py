"""Ray for feedline: a cluster already running, or one started on this machine, safely.

``ray.init`` without care binds its processes to every interface, reports usage statistics,
writes its address into a temp dir that every user of the machine shares, and sizes its
object store at 30% of RAM. A Ray that feedline starts (no Ray running, ``address=None``) is
bound to 127.0.0.1, with usage statistics off, an object store capped from feedline's RAM
budget and a temp dir of its own, removed when the last pass using it closes. feedline never
calls ``ray stop``, never turns Ray's authentication off, and shuts down only what it started:
a Ray the user initialised stays up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType

from feedline.io.fs import require

# Share of feedline's RAM budget that the object store of a Ray started here may take: the
# rest is for the actors' own memory and the caller's buffers.
OBJECT_STORE_SHARE = 0.5
# Ray refuses an object store smaller than 75 MiB.
MIN_OBJECT_STORE = 80 * 2**20


def require_ray() -> ModuleType:
    return require("ray", "ray", "feedline.ray (pipeline shards on Ray actors)")


@contextlib.contextmanager
def loopback_only(ray: ModuleType) -> Iterator[None]:
    """While Ray starts processes on this machine: their address is 127.0.0.1, which is also
    what they bind to.

    Ray 2.60 turns "127.0.0.1" into the machine's outward address (asking a public resolver
    first) unless its cluster mode is off, a flag read at import time from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER; the user may have imported ray already, so the flag
    itself is set for the start and put back after (the node keeps the address it got).
    """
    constants = ray._private.ray_constants
    before = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


def local_init_args(temp_dir: str, object_store_bytes: int) -> dict[str, object]:
    """``ray.init`` arguments of a Ray that stays on this machine (tests start theirs so too)."""
    return {
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "_temp_dir": temp_dir,
        "object_store_memory": max(MIN_OBJECT_STORE, int(object_store_bytes)),
        "configure_logging": False,
    }


class _Session:
    """This process's use of Ray by feedline: how many passes hold it, and what to undo."""

    def __init__(self) -> None:
        self.holders = 0
        self.started = False  # feedline called ray.init (a local Ray, or a connection)
        self.temp_dir: str | None = None


_lock = threading.Lock()
_session = _Session()


def acquire(address: str | None, ram_budget: int) -> ModuleType:
    """Ray, ready for a pass: the running one, a connection to ``address``, or one started
    here (see the module's docstring). Each call is matched by one ``release()``."""
    ray = require_ray()
    with _lock:
        if _session.holders == 0 and not ray.is_initialized():
            _start(ray, address, ram_budget)
        _session.holders += 1
    return ray


def _start(ray: ModuleType, address: str | None, ram_budget: int) -> None:
    # Read by Ray's processes when they start, and by this one: no usage report leaves.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is not None:
        ray.init(address=address, configure_logging=False)
        _session.started = True
        return
    # A temp dir of this run's own: Ray writes the cluster's address there, and a shared one
    # would let another user's `ray.init(address="auto")` find it.
    temp_dir = tempfile.mkdtemp(prefix="feedline-ray-")
    try:
        with loopback_only(ray):
            ray.init(**local_init_args(temp_dir, int(OBJECT_STORE_SHARE * ram_budget)))
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    _session.started, _session.temp_dir = True, temp_dir


def release() -> None:
    """One pass is done with Ray: the last shuts down what feedline started, if it did."""
    ray = require_ray()
    with _lock:
        _session.holders -= 1
        if _session.holders > 0 or not _session.started:
            return
        ray.shutdown()
        if _session.temp_dir is not None:
            shutil.rmtree(_session.temp_dir, ignore_errors=True)
        _session.started, _session.temp_dir = False, None


def started_here() -> bool:
    """Whether the Ray in use is one feedline started (or connected) itself."""
    with _lock:
        return _session.started
