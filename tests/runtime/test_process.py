"""The process executor: same outputs, order, errors and state as threads; workers that start
once per iterator, follow the parallelism knob, and leave no process or shared memory behind."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.runtime import process
from feedline.runtime.chunks import RowList
from feedline.runtime.tunable import PROCESSES, THREADS
from tests.helpers import assert_elements_equal, assert_state_roundtrip, take

if not sys.platform.startswith("linux"):
    pytest.skip("checks /dev/shm and forkserver workers (Linux)", allow_module_level=True)

D = fl.Dataset
BIG = process.SHM_MIN_BYTES // 8 + 1  # float64 elements: a buffer that goes through /dev/shm


def our_shared_memory() -> list[str]:
    """Shared memory feedline made that this process still maps or holds open, and anything
    of ours in /dev/shm (where feedline puts nothing: its shared memory has no name)."""
    found = [n for n in os.listdir("/dev/shm") if n.startswith("fl-")]
    with open("/proc/self/maps") as maps:
        found += [line.split(maxsplit=5)[-1] for line in maps if "/memfd:feedline" in line]
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own descriptor, closed by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("/memfd:feedline"):
                found.append(target)
    return found


def wait_for(condition: Any, seconds: float = 5.0) -> bool:
    """Whether ``condition()`` comes true in time (dropped iterators are collected meanwhile)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.02)
    return True


def no_workers() -> bool:
    return not multiprocessing.active_children()


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every test ends with no worker process and no shared memory of ours."""
    assert wait_for(no_workers), "worker processes from an earlier test are still running"
    yield
    assert wait_for(no_workers), "worker processes left running"
    assert wait_for(lambda: not our_shared_memory()), f"left behind: {our_shared_memory()}"


def untuned(ds: fl.Dataset) -> fl.Dataset:
    options = fl.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def pool_of(it: fl.DatasetIterator) -> process.ProcessPool:
    (pool,) = process._pools[it._ctx].values()
    return pool


def slow_pid(x: Any) -> int:
    time.sleep(0.005)
    return os.getpid()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("calls", [None, 2, fl.AUTOTUNE])
def test_map_outputs_equal_threads(calls: int | None) -> None:
    offset = 7  # a closure variable, sent with the lambda

    def build(executor: str) -> fl.Dataset:
        return D.range(300).map(
            lambda x: (x + offset, np.full(BIG if x % 50 == 0 else 3, x, np.float64), b"s"),
            num_parallel_calls=calls,
            executor=executor,
        )

    assert_elements_equal(list(build("process")), list(build("thread")))


@pytest.mark.timeout(30)
def test_random_map_outputs_equal_threads_every_epoch() -> None:
    def build(executor: str) -> fl.Dataset:
        ds = D.range(200).random_map(
            lambda x, rng: rng.normal(size=BIG if x % 40 == 0 else 4) + x,
            seed=3,
            num_parallel_calls=2,
            executor=executor,
        )
        return ds.repeat(2)

    got, want = list(build("process")), list(build("thread"))
    assert_elements_equal(got, want)
    assert not np.array_equal(got[1], got[201])  # a new pass draws new numbers


def _row_outputs(kind: str) -> Any:
    """Per-element functions whose outputs a worker may send back as one stacked array."""
    return {
        "rows": lambda x: np.arange(8, dtype=np.int32) * x,
        "views": lambda x: (np.arange(12.0) + x).reshape(3, 4)[:, ::-2],
        "read-only": lambda x: np.frombuffer(bytes([x % 256]) * 16, np.uint8),
        "records": lambda x: np.array([(x, 0.5)], dtype=[("id", "i8"), ("w", "f4")]),
        "0-d": lambda x: np.array(x * 2),
        "ragged": lambda x: np.zeros(1 + x % 3),
        "objects": lambda x: np.array([x, "a"], dtype=object),
    }[kind]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "kind", ["rows", "views", "read-only", "records", "0-d", "ragged", "objects"]
)
def test_arrays_sent_back_stacked_equal_threads(kind: str) -> None:
    def build(executor: str) -> fl.Dataset:
        return untuned(
            D.range(200).map(_row_outputs(kind), num_parallel_calls=2, executor=executor)
        )

    got, want = list(build("process")), list(build("thread"))
    assert_elements_equal(got, want)
    assert [type(g) for g in got] == [type(w) for w in want]


def test_only_same_shape_plain_arrays_are_stacked() -> None:
    def rows_of(kind: str) -> Any:
        return process.as_rows([_row_outputs(kind)(x) for x in range(5)])

    stacked = rows_of("rows")
    assert isinstance(stacked, process.Rows)
    elements = RowList(stacked.stacked)
    assert_elements_equal(elements, [_row_outputs("rows")(x) for x in range(5)])
    assert all(e.base is stacked.stacked for e in elements)  # views, not copies
    for kind in ("0-d", "ragged", "objects"):
        assert isinstance(rows_of(kind), list), kind
    assert isinstance(process.as_rows([np.zeros(3)]), list)  # one element: nothing to save


@pytest.mark.timeout(30)
def test_a_chunk_with_a_failure_keeps_every_other_element() -> None:
    def fn(x: Any) -> np.ndarray:
        if x == 37:
            raise ValueError("bad element")
        return np.full(4, x, np.int64)

    ds = untuned(D.range(80).map(fn, num_parallel_calls=2, executor="process"))
    ds = ds.ignore_errors()
    got = [int(e[0]) for e in ds]
    assert got == [x for x in range(80) if x != 37]


@pytest.mark.timeout(30)
def test_results_arrive_as_writable_arrays_over_shared_memory() -> None:
    ds = D.range(4).map(lambda x: np.full(BIG, x, np.float64), executor="process")
    with ds.iterator() as it:
        first = next(it)
        assert first.flags.writeable
        first[0] = -1.0
        assert our_shared_memory()  # mapped here, and the memory goes with the array


@pytest.mark.timeout(30)
def test_options_executor_is_the_default() -> None:
    options = fl.Options()
    options.executor = "process"
    ds = D.range(20).map(lambda x: os.getpid(), num_parallel_calls=2).with_options(options)
    assert os.getpid() not in {int(p) for p in ds}
    threaded = D.range(20).map(lambda x: os.getpid(), num_parallel_calls=2, executor="thread")
    assert {int(p) for p in threaded.with_options(options)} == {os.getpid()}


def test_bad_executors_are_refused_at_build_time() -> None:
    with pytest.raises(ValueError, match="executor must be one of"):
        D.range(3).map(lambda x: x, executor="gpu")
    options = fl.Options()
    with pytest.raises(ValueError, match=r"Options\.executor"):
        options.executor = "fork"


def test_missing_cloudpickle_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cloudpickle", None)
    with pytest.raises(ImportError, match="a dependency of feedline: reinstall"):
        D.range(3).map(lambda x: x, executor="process")


@pytest.mark.timeout(30)
def test_unpicklable_function_names_the_stage() -> None:
    lock = threading.Lock()

    def locked(x: Any) -> Any:
        with lock:
            return x

    ds = D.range(3).map(locked, num_parallel_calls=2, executor="process", name="guarded")
    with pytest.raises(fl.StageError, match="executor='thread'") as info:
        list(ds)
    assert info.value.stage == "map(guarded)"


class Unreconstructable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


@pytest.mark.timeout(30)
def test_overlapping_process_starts_give_the_main_module_its_names_back() -> None:
    # The forkserver may start on one thread while a stage starts a worker on another; each
    # start hides __main__'s file for its duration, and the last to end must not restore the
    # names as the other left them (hidden).
    main = sys.modules["__main__"]
    names = {name: getattr(main, name, None) for name in ("__file__", "__spec__")}
    first_in, let_first_out, let_second_out = (
        threading.Event(),
        threading.Event(),
        threading.Event(),
    )

    def first() -> None:
        with process._main_not_reimported():
            first_in.set()
            let_first_out.wait(5)

    def second() -> None:
        with process._main_not_reimported():
            let_second_out.wait(5)

    a, b = threading.Thread(target=first), threading.Thread(target=second)
    a.start()
    first_in.wait(5)
    b.start()
    time.sleep(0.05)  # the second start is under way (or waits for the first)
    let_first_out.set()
    a.join(5)
    let_second_out.set()
    b.join(5)
    assert {name: getattr(main, name, None) for name in names} == names


@pytest.mark.timeout(30)
def test_user_errors_arrive_at_their_position_with_their_type() -> None:
    def fn(x: Any) -> Any:
        if x == 7:
            raise KeyError("seven")
        if x == 9:
            raise Unreconstructable(9, 0)  # pickles, but cannot be rebuilt from its args
        return x

    it = iter(D.range(12).map(fn, num_parallel_calls=2, executor="process"))
    assert [int(x) for x in take(it, 7)] == list(range(7))
    with pytest.raises(fl.StageError) as info:
        next(it)
    assert info.value.position == 7
    assert type(info.value.__cause__) is KeyError
    assert "in fn" in str(info.value.__cause__.__cause__)  # the worker's traceback
    assert int(next(it)) == 8
    with pytest.raises(fl.StageError) as info:
        next(it)
    assert info.value.position == 9
    assert "Unreconstructable: 9/0" in str(info.value.__cause__)
    assert [int(x) for x in it] == [10, 11]


@pytest.mark.timeout(30)
def test_upstream_errors_pass_through_at_their_position() -> None:
    def upstream(x: Any) -> Any:
        if x == 2:
            raise ZeroDivisionError("upstream")
        return x

    ds = D.range(5).map(upstream).map(lambda x: x + 10, num_parallel_calls=2, executor="process")
    it = iter(ds)
    assert [int(x) for x in take(it, 2)] == [10, 11]
    with pytest.raises(fl.StageError) as info:
        next(it)
    assert info.value.stage == "map(upstream)" and info.value.position == 2
    assert type(info.value.__cause__) is ZeroDivisionError
    assert [int(x) for x in it] == [13, 14]


def outcomes(ds: fl.Dataset, limit: int = 500) -> list[Any]:
    """Each (int) element, or for an error (type, stage, position, type of its cause), in
    order."""
    with ds.iterator() as it:
        return outcomes_of(it, limit)


def outcomes_of(it: fl.DatasetIterator, limit: int = 500) -> list[Any]:
    """``outcomes`` of what is left of a pass."""
    seen: list[Any] = []
    while len(seen) < limit:
        try:
            seen.append(int(next(it)))
        except StopIteration:
            break
        except Exception as e:
            cause = type(e.__cause__).__name__ if e.__cause__ is not None else None
            seen.append(
                (
                    type(e).__name__,
                    getattr(e, "stage", None),
                    getattr(e, "position", None),
                    cause,
                )
            )
    return seen


def lock_every_7th(x: Any) -> Any:
    return threading.Lock() if x % 7 == 3 else x


@pytest.mark.timeout(30)
@pytest.mark.parametrize("calls", [None, 2])
def test_results_that_cannot_come_back_fail_only_their_element(calls: int | None) -> None:
    ds = D.range(60).map(lock_every_7th, num_parallel_calls=calls, executor="process")
    failed = ("StageError", "map(lock_every_7th)")
    assert outcomes(ds) == [(*failed, x, "TypeError") if x % 7 == 3 else x for x in range(60)]
    with ds.iterator() as it:
        take(it, 3)
        with pytest.raises(fl.StageError, match="its result cannot be sent") as info:
            next(it)
    assert "cannot pickle '_thread.lock'" in str(info.value.__cause__)


def lock_array_every_7th(x: Any) -> Any:
    """``lock_every_7th`` as 0-d object arrays: every element fits one element spec (the
    map's output check passes them all), and only pickling tells the locks apart."""
    return np.array(lock_every_7th(x), dtype=object)


@pytest.mark.timeout(30)
def test_elements_that_cannot_be_sent_fail_only_their_element() -> None:
    ds = D.range(60).map(lock_array_every_7th)
    ds = ds.map(lambda x: x, num_parallel_calls=2, executor="process")
    failed = ("StageError", "map(<lambda>)")
    assert outcomes(ds) == [(*failed, x, "TypeError") if x % 7 == 3 else x for x in range(60)]


class Unpicklable(Exception):
    """An exception holding what cannot be pickled."""

    def __init__(self, x: int) -> None:
        super().__init__(f"element {x}")
        self.lock = threading.Lock()


@pytest.mark.timeout(30)
def test_unpicklable_exceptions_fail_only_their_element() -> None:
    def fn(x: Any) -> Any:
        if x % 7 == 3:
            raise Unpicklable(int(x))
        return x

    ds = D.range(60).map(fn, num_parallel_calls=2, executor="process")
    failed = ("StageError", "map(fn)")
    assert outcomes(ds) == [(*failed, x, "RemoteError") if x % 7 == 3 else x for x in range(60)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("calls", [None, 2])
def test_killed_worker_is_a_stage_error_and_stops_every_worker(calls: int | None) -> None:
    def pid_and_array(x: Any) -> Any:
        return slow_pid(x), np.zeros(BIG)  # big results: segments in flight when it dies

    ds = D.range(100_000).map(pid_and_array, num_parallel_calls=calls, executor="process")
    assert_killing_a_worker_fails_the_stage(ds, "map(pid_and_array)", "positions")


def assert_killing_a_worker_fails_the_stage(ds: fl.Dataset, stage: str, names: str) -> None:
    """SIGKILL the worker that made the first element (a (pid, ...) tuple): the pass fails
    with a StageCrashedError of ``stage`` whose message says ``names``, no worker is left,
    and the pass ends there."""
    it = iter(ds)
    victim = int(next(it)[0])
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(fl.StageCrashedError) as info:
        for _ in range(10_000):
            next(it)
    message = str(info.value)
    assert "SIGKILL" in message and names in message
    assert info.value.stage == stage
    assert info.value.position is not None
    assert wait_for(no_workers)
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    with pytest.raises(StopIteration):  # the pass ended with the crash
        next(it)
    it.close()


@pytest.mark.timeout(30)
def test_no_shared_memory_left_after_normal_end_and_early_break() -> None:
    before = os.listdir("/dev/shm")
    ds = D.range(40).map(lambda x: np.full(BIG, x, np.float64), 2, executor="process")
    assert len(list(ds)) == 40
    for i, _ in enumerate(ds):
        if i == 3:
            break
    with ds.iterator() as it:
        take(it, 2)
    assert wait_for(no_workers)
    assert set(os.listdir("/dev/shm")) <= set(before)


@pytest.mark.timeout(60)
def test_arrays_kept_after_the_pass_keep_only_their_own_memory() -> None:
    ds = untuned(D.range(200).map(row, num_parallel_calls=2, executor="process").batch(16))

    def a_batch() -> np.ndarray:
        with ds.iterator() as it:
            batch: np.ndarray = take(it, 10)[-1]
        return batch

    kept = a_batch()  # the others' segments went back to the workers, then away with them
    assert wait_for(no_workers)
    assert wait_for(lambda: len(mapped_here()) == 1), mapped_here()
    assert kept.sum() > 0
    del kept
    assert wait_for(lambda: not our_shared_memory())


def mapped_here() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "/memfd:feedline" in line]


@pytest.mark.timeout(60)
def test_state_roundtrip() -> None:
    ds = D.range(40).random_map(
        lambda x, rng: x * 100 + rng.integers(100), seed=5, num_parallel_calls=2, executor="process"
    )
    assert_state_roundtrip(ds, cut_points=(0, 3))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cut_short", [False, True])
def test_workers_start_once_per_iterator_across_repeat_epochs(cut_short: bool) -> None:
    ds = D.range(30).map(slow_pid, num_parallel_calls=2, executor="process")
    if cut_short:  # each epoch closes the stage with chunks still in flight
        ds = ds.take(10)
    ds = ds.repeat(4)
    with ds.iterator() as it:
        pids = {int(p) for p in it}
        assert pool_of(it).starts == 2
    assert len(pids) == 2


@pytest.mark.timeout(30)
def test_parallelism_knob_resizes_the_pool() -> None:
    ds = untuned(D.range(100_000).map(slow_pid, num_parallel_calls=fl.AUTOTUNE, executor="process"))
    with ds.iterator() as it:
        (stage,) = it._ctx.stages()
        pool = pool_of(it)
        take(it, 20)
        stage.knobs["parallelism"].set(1)
        take(it, 20)
        assert wait_for(lambda: len(pool.pids()) == 1)
        stage.knobs["parallelism"].set(3)
        pids = {int(p) for p in take(it, 200)}
        assert len(pids) >= 3 and len(pool.pids()) == 3
        stats = it.stats()
        (workers,) = stats["worker_processes"]
        assert workers["stage"] == stage.name and workers["processes"] == 3
        assert stats["worker_rss_bytes"] == workers["rss_bytes"] > 0
        assert f"worker processes of {stage.name}: 3, resident" in it.report()
    assert it._ctx.worker_memory() == []  # closed with the run


# -- batches of worker results, and the reply segments they travel in --------------------------

ROW = process.SHM_MIN_BYTES // 4  # float64 elements: a 32-row batch of them goes out of band


def row(x: Any) -> np.ndarray:
    return np.full(ROW // 8, int(x), np.float64) + np.arange(ROW // 8)


def batched(executor: str, n: int, batch: int, drop_remainder: bool = False) -> fl.Dataset:
    ds = D.range(n).map(row, num_parallel_calls=2, executor=executor)
    return untuned(ds.batch(batch, drop_remainder=drop_remainder))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("n", "batch", "drop"), [(300, 32, False), (300, 7, False), (97, 10, True)]
)
def test_batches_of_worker_results_equal_threads(n: int, batch: int, drop: bool) -> None:
    got = list(batched("process", n, batch, drop))
    assert_elements_equal(got, list(batched("thread", n, batch, drop)))
    # Held all at once: no batch's memory was reused for a later one.
    assert_elements_equal(got, [np.stack([row(x) for x in b]) for b in _positions(n, batch, drop)])


def _positions(n: int, batch: int, drop: bool) -> list[list[int]]:
    out = [list(range(i, min(n, i + batch))) for i in range(0, n, batch)]
    return [b for b in out if len(b) == batch or not drop]


@pytest.mark.timeout(60)
def test_a_batch_is_its_own_memory() -> None:
    # Whole batches come as slices of what a worker stacked, with no copy: each must still be
    # the user's own, writable, and touch nothing else (other batches, a later epoch).
    ds = D.range(128).map(row, num_parallel_calls=2, executor="process")
    ds = untuned(ds.batch(32).repeat(2))
    with ds.iterator() as it:
        batches = []
        for b in it:
            assert b.flags.writeable
            assert not any(np.shares_memory(b, other) for other in batches)
            batches.append(b)
            b[:] = -1.0  # scribbled over at once: later batches must not see it
    assert len(batches) == 8
    fresh = list(batched("process", 128, 32))
    assert_elements_equal(fresh, list(batched("thread", 128, 32)))


@pytest.mark.timeout(60)
def test_padded_batches_of_worker_results_are_padded() -> None:
    def build(executor: str) -> fl.Dataset:
        ds = D.range(64).map(row, num_parallel_calls=2, executor=executor)
        return untuned(ds.padded_batch(16, padded_shapes=[ROW // 8 + 3]))

    got = list(build("process"))
    assert got[0].shape == (16, ROW // 8 + 3)
    assert_elements_equal(got, list(build("thread")))


@pytest.mark.timeout(60)
def test_reply_segments_are_reused_once_batches_are_dropped() -> None:
    ds = untuned(D.range(2000).map(row, num_parallel_calls=2, executor="process").batch(32))
    mapped = []
    with ds.iterator() as it:
        pool = None
        for i, _ in enumerate(it):
            if i == 2:
                pool = pool_of(it)
            if pool is not None:
                with pool._lock:
                    mapped.append(sum(len(w.replies._maps) for w in pool._workers))
    # 63 batches went through; the segments the workers made stay few (those in flight and
    # a couple kept free by each), not one per reply.
    assert len(mapped) > 50
    assert max(mapped) <= 2 * (4 + process.MAX_FREE_REPLY_SEGMENTS), mapped


@pytest.mark.timeout(60)
def test_results_fall_back_to_the_pickle_when_shared_memory_is_full() -> None:
    arena = process.ReplyArena()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    real = os.posix_fallocate
    os.posix_fallocate = full  # type: ignore[assignment]
    try:
        plain = arena.empty((4, ROW // 8), np.dtype(np.float64))
        assert plain.base is None  # an ordinary array: it travels inside the pickle
        assert not arena.place(memoryview(np.zeros(ROW, np.uint8)))
    finally:
        os.posix_fallocate = real
    arena.end_message(sent=False)
    close_arena(arena)


def close_arena(arena: process.ReplyArena) -> None:
    """What a worker's exit does: its segments' descriptors closed (mappings go with it)."""
    for fd in arena._fds.values():
        os.close(fd)


def test_reply_segments_go_back_and_forth_and_few_stay_free() -> None:
    arena = process.ReplyArena()  # a worker's side
    replies = process.ReplySegments()  # the parent's
    sizes = [ROW, 2 * ROW, 3 * ROW, 4 * ROW]
    arrays = [arena.empty((n // 8,), np.dtype(np.float64)) for n in sizes]
    for i, a in enumerate(arrays):
        a[:] = i
        assert arena.place(memoryview(a).cast("B"))
    (segments, layout, _), fds = arena.end_message()
    assert all(new for _, _, new in segments)  # new: their descriptors go along, this once
    assert len(fds) == len(segments) == 4
    leases = [replies.lease(key, fd, size) for (key, size, _), fd in zip(segments, fds)]
    views = [
        lease[offset : offset + n].view(np.float64) for lease, (_, offset, n) in zip(leases, layout)
    ]
    assert [float(v[0]) for v in views] == [0.0, 1.0, 2.0, 3.0]
    assert replies.returned() == []  # all still in use here
    del arrays, a, leases, views
    gc.collect()
    returned = replies.returned()
    assert sorted(returned) == sorted(key for key, _, _ in segments)
    arena.take_back(returned)  # all four free: the smallest beyond the limit are let go
    assert arena.segments == process.MAX_FREE_REPLY_SEGMENTS
    # The next reply reuses a kept segment (mapped already: no descriptor), and says which
    # went.
    again = arena.empty((ROW // 8,), np.dtype(np.float64))
    assert arena.place(memoryview(again).cast("B"))
    (segments_again, _, dropped), fds_again = arena.end_message()
    key, _, new = segments_again[0]
    assert not new and not fds_again and key in returned
    assert sorted(dropped) == sorted(key for key, _, _ in segments[:2])
    replies.forget(dropped)
    assert len(replies._maps) == process.MAX_FREE_REPLY_SEGMENTS
    del again
    close_arena(arena)


def test_worker_heap_keeps_twice_the_largest_chunk() -> None:
    calls: list[tuple[int, int]] = []
    heap = process.WorkerHeap(lambda param, value: calls.append((param, value)) or 1)
    heap.hold(10 * 2**20)
    heap.hold(2**20)  # smaller: nothing changes
    heap.hold(2**40)  # capped
    assert calls == [
        (process._M_TRIM_THRESHOLD, 20 * 2**20),
        (process._M_TRIM_THRESHOLD, process.HEAP_KEEP_MAX),
    ]


@pytest.mark.timeout(60)
def test_every_worker_gets_chunks_when_batches_outgrow_the_learned_chunk() -> None:
    # 5 ms per element makes 8-element chunks; cut at 32-element batch boundaries they hold
    # 32, and the buffer must leave room for one such chunk per worker (else one worker at a
    # time runs, and the same idle worker is always picked again).
    ds = untuned(D.range(960).map(slow_pid, num_parallel_calls=2, executor="process").batch(32))
    batches = list(ds)
    later = {int(pid) for batch in batches[len(batches) // 2 :] for pid in batch}
    assert len(later) == 2


def position_and_pid(x: Any) -> np.ndarray:
    time.sleep(0.001)
    return np.array([x, os.getpid()])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("back_to_threads", [False, True])
def test_threads_go_on_while_worker_processes_start(
    monkeypatch: pytest.MonkeyPatch, back_to_threads: bool
) -> None:
    """A move to processes does not stall the stage: its threads go on with the work until
    the workers have loaded the function (here held back until the test lets them go)."""
    let_go = threading.Event()
    warm = process.ProcessPool.warm

    def held_back_warm(pool: process.ProcessPool) -> None:
        let_go.wait()
        warm(pool)

    monkeypatch.setattr(process.ProcessPool, "warm", held_back_warm)
    n, here = 3000, os.getpid()
    # Tuned, for the executor knob; on a budget of one core the tuner itself never moves it.
    options = fl.Options()
    options.autotune.cpu_budget = 1
    ds = D.range(n).map(position_and_pid, num_parallel_calls=2).with_options(options)
    with ds.iterator() as it:
        (stage,) = it._ctx.stages()
        out = take(it, 50)
        stage.knobs["executor"].set(PROCESSES)
        out += take(it, 300)  # far more than the stage buffers: made after the move
        assert all(pid == here for _, pid in out)
        if back_to_threads:
            stage.knobs["executor"].set(THREADS)
        let_go.set()
        if not back_to_threads:
            assert wait_for(lambda: stage.executor is not None)
        out += list(it)
        history = it.stats()["autotune"]["history"]
    assert [int(x) for x, _ in out] == list(range(n))
    from_workers = {int(pid) for _, pid in out[-1000:]} - {here}
    assert bool(from_workers) != back_to_threads, history


def _sleep_a_minute() -> None:
    time.sleep(60)


@pytest.mark.timeout(120)
def test_a_killed_workers_status_survives_two_threads_reading_it() -> None:
    """The forkserver hands a worker's exit status over once: without one reader at a time,
    the second concurrent reader made multiprocessing report 255 (1 worker in 60 here)."""
    from feedline.runtime.process.pool import WorkerProcess

    context = multiprocessing.get_context("forkserver")
    codes = []
    for _ in range(100):
        started = context.Process(target=_sleep_a_minute, name="feedline-test-status")
        started.start()
        worker = WorkerProcess(started, None)  # type: ignore[arg-type]
        os.kill(started.pid, signal.SIGKILL)
        both = threading.Barrier(2)

        def join(worker: WorkerProcess = worker, both: threading.Barrier = both) -> None:
            both.wait()
            worker.join(10.0)

        other = threading.Thread(target=join, name="feedline-test-join")
        other.start()
        join()
        other.join(10.0)
        codes.append(worker.exitcode())
    assert codes == [-signal.SIGKILL] * 100
