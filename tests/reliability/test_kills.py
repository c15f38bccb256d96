"""Deaths of processes around ``executor="process"``: a worker, the forkserver, the parent.

The guarantees: nothing feedline made stays behind — no shared memory (in ``/dev/shm`` or held
by a process still running), no worker process, no thread — whoever dies, however (SIGKILL of
a worker or of the forkserver; SIGTERM, as schedulers stop jobs, or SIGKILL of the parent),
and wherever they were (idle, in the middle of a function, sending large arrays). The
surviving parent gets a clear error, never a hang; and after a worker's death, a state taken
right after the error resumes the pass with every element not yet delivered, none twice.

Parents are killed in a subprocess: a small script reading large arrays from workers.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing import forkserver, resource_tracker
from typing import Any

import numpy as np
import psutil
import pytest

import feedline as fl
from tests.conftest import feedline_threads
from tests.reliability.figures import record

if not sys.platform.startswith("linux"):
    pytest.skip("kills forkserver workers and reads /dev/shm (Linux)", allow_module_level=True)

D = fl.Dataset
MIB = 2**20


# -- what is left behind --------------------------------------------------------------------------


def shm_of_feedline() -> set[str]:
    """Names in /dev/shm feedline makes or made (its shared memory now has none)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("fl-") or "feedline" in n}


def running(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has let go of everything but its pid)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def helpers_of_this_process() -> set[int]:
    """The forkserver and the resource tracker: started once, they serve the whole process."""
    pids = {
        getattr(forkserver._forkserver, "_forkserver_pid", None),
        getattr(resource_tracker._resource_tracker, "_pid", None),
    }
    return {pid for pid in pids if pid is not None}


def descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.fixture
def nothing_left_behind() -> Iterator[set[int]]:
    """Checks, once the test is over, that no worker process, shared memory or feedline thread
    it made is left; yields a set the test adds the pids of processes it made to."""
    shm_before = shm_of_feedline()
    made: set[int] = set()
    yield made
    made |= descendants(os.getpid())
    made -= helpers_of_this_process()
    assert wait_until(lambda: not running(made), 10), f"left running: {running(made)}"
    assert wait_until(lambda: not feedline_threads(), 5), feedline_threads()
    assert shm_of_feedline() <= shm_before, shm_of_feedline() - shm_before


# -- a worker dies: a clear error, and a restore with nothing lost or twice ----------------------


def untuned(ds: fl.Dataset) -> fl.Dataset:
    options = fl.Options()
    options.autotune.enabled = False  # the parallelism the test asks for, from the start
    return ds.with_options(options)


def value_pid_array(x: Any) -> tuple[Any, int, np.ndarray]:
    """An element that says who made it, with an array that travels in shared memory."""
    time.sleep(0.001)
    return x, os.getpid(), np.full(MIB // 32 * (1 + int(x) % 2), float(x))  # 256-512 KiB


def mapped(n: int) -> fl.Dataset:
    return untuned(D.range(n).map(value_pid_array, num_parallel_calls=2, executor="process"))


def interleaved(files: int, records: int) -> fl.Dataset:
    def records_of(i: Any) -> fl.Dataset:
        return D.range(records).map(lambda x: value_pid_array(i * records + x))

    return untuned(
        D.range(files).interleave(
            records_of, cycle_length=3, block_length=2, num_parallel_calls=2, executor="process"
        )
    )


def kill_a_worker_then_restore(ds: fl.Dataset, rng: random.Random, made: set[int]) -> list[int]:
    """Read ``ds``; SIGKILL the worker that made a recent element, at a random moment; take
    the state after the error and read the rest from it. Every value read, in order."""
    got: list[int] = []
    after = rng.randrange(5, 60)
    timer: threading.Timer | None = None
    with ds.iterator() as it:
        try:
            for value, pid, _ in it:
                got.append(int(value))
                made.add(int(pid))
                if len(got) == after:
                    timer = threading.Timer(rng.uniform(0, 0.05), os.kill, (int(pid), 9))
                    timer.start()
        except fl.StageCrashedError as e:
            assert "SIGKILL" in str(e), e
            state = it.get_state()
        else:
            raise AssertionError(f"the pass ended without an error after {len(got)} elements")
        finally:
            if timer is not None:
                timer.join()
    with ds.iterator(state) as resumed:
        got += [int(value) for value, _, _ in resumed]
    return got


@pytest.mark.timeout(60)
def test_a_killed_worker_is_an_error_and_a_restore_loses_nothing(
    nothing_left_behind: set[int],
) -> None:
    rng = random.Random(16)
    kills = elements = 0
    for _ in range(3):
        got = kill_a_worker_then_restore(mapped(2000), rng, nothing_left_behind)
        assert got == list(range(2000))  # a map keeps order: the very sequence
        kills, elements = kills + 1, elements + len(got)
    for _ in range(3):
        got = kill_a_worker_then_restore(interleaved(12, 60), rng, nothing_left_behind)
        assert Counter(got) == Counter(range(12 * 60)), "lost or twice"
        kills, elements = kills + 1, elements + len(got)
    record("kills", kills=kills, restores=kills, elements_compared=elements)


# -- the forkserver dies: the workers it made go on, and end with the pass ----------------------


@pytest.mark.timeout(60)
def test_a_killed_forkserver_leaves_nothing_behind(nothing_left_behind: set[int]) -> None:
    ds = mapped(600)
    got: list[int] = []
    with ds.iterator() as it:
        for value, pid, _ in it:
            got.append(int(value))
            nothing_left_behind.add(int(pid))
            if len(got) == 50:
                server = getattr(forkserver._forkserver, "_forkserver_pid", None)
                assert server is not None
                nothing_left_behind.add(server)
                os.kill(server, signal.SIGKILL)
    assert got == list(range(600))
    # A new pass starts a new forkserver, and its workers.
    again = []
    for value, pid, _ in mapped(50):
        again.append(int(value))
        nothing_left_behind.add(int(pid))
    assert again == list(range(50))
    record("kills", kills=1, elements_compared=650)


# -- the parent dies: its workers follow, and free everything ------------------------------------

CHILD = """
import os, sys, time
import numpy as np
import feedline as fl

D = fl.Dataset
kind = sys.argv[1]


def big(x):
    # 4-8 MiB results: each travels in shared memory, several in flight.
    return np.full((4 + int(x) % 5) * 2**20 // 8, float(x))


def stuck(x):
    os.write(1, b"reading\\n")  # on the parent's stdout, in one piece even if both say it
    time.sleep(120)  # the parent dies while the workers are in the middle of a call
    return x


if kind == "map":
    ds = D.range(10**6).map(big, num_parallel_calls=2, executor="process")
elif kind == "interleave":
    ds = D.range(10**6).interleave(
        lambda i: D.range(50).map(lambda x: big(i + x)),
        cycle_length=2,
        num_parallel_calls=2,
        executor="process",
    )
else:
    ds = D.range(10**6).map(stuck, num_parallel_calls=2, executor="process")
for i, _ in enumerate(ds):
    if i == 3:
        print("reading", flush=True)
"""


def start_child(script: str, kind: str) -> subprocess.Popen[str]:
    """The child script reading ``kind``, once it says it is reading."""
    child = subprocess.Popen(
        [sys.executable, script, kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(child.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(30)
    if line != ["reading\n"]:
        family = descendants(child.pid)
        for pid in {child.pid} | family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, errors = child.communicate(timeout=10)
        raise AssertionError(f"the child did not start reading: {line}\n{errors}")
    return child


def kill_the_parent(script: str, kind: str, sig: signal.Signals, moment: float) -> None:
    """Run the child script reading ``kind``; ``moment`` seconds after it started reading,
    send it ``sig``: every process it made must end within seconds."""
    child = start_child(script, kind)
    family: set[int] = set()
    try:
        time.sleep(moment)
        family = descendants(child.pid)  # forkserver, resource tracker, workers
        assert len(family) >= 3, family
        child.send_signal(sig)
        child.wait(10)
        # Workers notice at once, even those in the middle of a call (stuck).
        assert wait_until(lambda: not running(family), 5), (kind, sig, running(family))
    finally:
        for pid in {child.pid} | running(family):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait(10)


@pytest.mark.timeout(60)
def test_a_killed_parent_leaves_nothing_behind(tmp_path: Any) -> None:
    script = str(tmp_path / "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    rng = random.Random(4)
    shm_before = shm_of_feedline()
    runs = [
        (kind, sig)
        for kind in ("map", "interleave", "map", "interleave", "stuck")
        for sig in (signal.SIGTERM, signal.SIGKILL)
    ]
    for kind, sig in runs:
        kill_the_parent(script, kind, sig, rng.uniform(0, 0.3))  # a random moment
        left = shm_of_feedline() - shm_before
        assert not left, f"{kind}, {sig.name}: left in /dev/shm: {sorted(left)}"
    record("kills", kills=len(runs))
