"""What the framework tests share: child processes that must all be gone afterwards, and
scripts run in fresh interpreters (a framework missing, XLA flags, ranks of a process group)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import feedline as fl

ROOT = Path(__file__).resolve().parents[2]


# multiprocessing's helpers live as long as this interpreter, shared by every pool started
# from it (feedline's workers fork from that forkserver too): not left behind by a test.
_LIFELONG = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def children() -> set[int]:
    """This process's descendants but those helpers (what they forked counts)."""
    me = os.getpid()
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            helper = p.ppid() == me and any(h in " ".join(p.cmdline()) for h in _LIFELONG)
        except psutil.Error:
            continue
        if not helper:
            pids.add(p.pid)
    return pids


@contextmanager
def no_process_left(grace: float = 10.0) -> Iterator[None]:
    """Fails if a child process started inside the block is still alive ``grace`` seconds
    after it (DataLoader workers and feedline's workers take a moment to exit)."""
    before = children()
    yield
    deadline = time.monotonic() + grace
    while (left := children() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [psutil.Process(pid) for pid in left if psutil.pid_exists(pid)]
    names = []
    for p in alive:
        try:
            names.append(f"{p.pid} {p.name()} {p.cmdline()[:4]}")
        except psutil.Error:
            continue
    assert not names, f"processes left running: {names}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_script(
    code: str, env: dict[str, str] | None = None, timeout: float = 120, ranks: int = 0
) -> list[Any]:
    """Run ``code`` in fresh interpreters (one, or ``ranks`` with RANK / WORLD_SIZE and a
    rendezvous on 127.0.0.1 set); each prints one JSON line last, returned in rank order."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    runs = []
    if ranks:
        port = str(free_port())
        for rank in range(ranks):
            rank_env = {"RANK": str(rank), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1"}
            runs.append({**base, **rank_env, "MASTER_PORT": port})
    else:
        runs.append(base)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for e in runs
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"exit {p.returncode}:\n{err.decode()[-3000:]}"
            outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs


def assert_feed_resumes(
    make: Callable[[fl.Dataset], Any],
    ds: fl.Dataset,
    cuts: Sequence[int],
    leaf: Callable[[Any], np.ndarray],
) -> None:
    """A feed (``to_torch``, ``device_put``) saved after each of ``cuts`` elements, through
    JSON, and loaded into a new feed that had moved elsewhere, goes on exactly as the first:
    compared on ``leaf(element)``."""
    for cut in cuts:
        with make(ds) as it:
            for _ in range(cut):
                next(it)
            saved = json.loads(json.dumps(it.state_dict()))
            rest = [leaf(e) for e in it]
        with make(ds) as resumed:
            next(resumed, None)  # somewhere else first: load_state_dict moves it
            resumed.load_state_dict(saved)
            again = [leaf(e) for e in resumed]
        assert len(again) == len(rest), f"after {cut}"
        for a, r in zip(again, rest):
            np.testing.assert_array_equal(a, r, err_msg=f"after {cut}")


def outcomes(feed: Iterator[Any], leaf: Callable[[Any], Any]) -> list[Any]:
    """What each ``next(feed)`` gave, ``leaf`` of it or the error's type, to the end."""
    out: list[Any] = []
    while True:
        try:
            out.append(leaf(next(feed)))
        except StopIteration:
            return out
        except Exception as e:
            out.append(type(e).__name__)


def failing_every_4th() -> fl.Dataset:
    """Elements 0..9; those at 3 and 7 fail (a ``StageError`` each, the pass going on)."""

    def check(x: Any) -> Any:
        if x % 4 == 3:
            raise ValueError(f"element {x}")
        return x

    return fl.Dataset.range(10).map(check)


FAILING_EVERY_4TH = [0, 1, 2, "StageError", 4, 5, 6, "StageError", 8, 9]


def regression(weights: Sequence[float], bias: float, rows: int, epochs: int) -> fl.Dataset:
    """A linear regression's data, ``(x, y)`` batches of 16 through an AUTOTUNE'd map, for
    ``epochs`` epochs: a model that learns it takes the loss near zero."""
    rng = np.random.default_rng(len(weights))
    x = rng.normal(size=(rows, len(weights))).astype(np.float32)
    y = (x @ np.array(weights, np.float32) + np.float32(bias))[:, None]
    return (
        fl.Dataset.from_tensor_slices((x, y))
        .shuffle(rows, seed=0)
        .map(lambda a, b: (a, b), num_parallel_calls=fl.AUTOTUNE)
        .batch(16)
        .prefetch(fl.AUTOTUNE)
        .repeat(epochs)
    )


def tile(i: Any) -> np.ndarray:
    """A 64 KiB element: rows this large are stacked in the workers' shared memory."""
    return np.full((32, 32, 16), int(i) % 251, np.float32) + np.arange(16, dtype=np.float32)


def assert_worker_batches_stay_right(
    convert: Callable[[Iterator[np.ndarray]], Iterator[Any]], pointer: Callable[[Any], int]
) -> None:
    """Batches stacked in worker processes' shared memory, converted by ``convert`` (a feed
    over numpy batches) without a copy (``pointer``: where a converted batch's memory is),
    50 of them kept while the pass goes on: each still equals its numpy reference, though
    the workers' memory is handed out again once no array uses it."""
    # Enough batches after the kept ones for the workers to reuse their memory many times.
    ds = fl.Dataset.range(2000).map(tile, num_parallel_calls=2, executor="process").batch(4)
    source: list[int] = []  # where each numpy batch was: its address, not a reference

    def addresses(it: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for batch in it:
            source.append(batch.ctypes.data)
            yield batch

    with no_process_left(), ds.iterator() as it:
        kept: list[Any] = []
        for converted in convert(addresses(it)):
            if len(kept) < 50:
                kept.append(converted)  # only the converted batch: the numpy one is gone
            del converted
    assert len(source) == 500
    # Shared, not copied: the kept batches lie in the workers' memory, which the workers
    # hand out again once no array uses it (how often depends on timing: not asserted) ...
    assert [pointer(k) for k in kept] == source[:50]
    # ... but never while a kept one does.
    assert not set(source[:50]) & set(source[50:])
    for i, k in enumerate(kept):
        want = np.stack([tile(j) for j in range(4 * i, 4 * i + 4)])
        np.testing.assert_array_equal(np.asarray(k), want, err_msg=f"batch {i}")


def aligned(a: np.ndarray, offset: int = 0) -> np.ndarray:
    """A copy of ``a`` starting ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# Leaves whose values and dtypes must come out as they went in, whether shared or copied.
IMAGES = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
LEAVES = {
    "int64": np.arange(-5, 7, dtype=np.int64).reshape(3, 4),
    "float32": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
    "bool": np.arange(10) % 3 == 0,
    "uint8 images": IMAGES,
    "non-contiguous": IMAGES[:, ::2, 1::3, ::-1],
    "read-only": frozen(np.arange(6, dtype=np.float32)),
    "0-d": np.array(2.5, np.float32),
    "scalar": np.int64(-3),
    "empty": np.zeros((0, 3), np.float32),
    "misaligned": aligned(np.arange(40, dtype=np.float32), offset=16),
}
