"""interleave(executor="process"): the same elements, order, errors and states as on threads,
with the datasets made and read in worker processes that start once per iterator and leave no
process, thread or shared memory behind."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.runtime import closer, process
from feedline.runtime.parallel import default_parallelism
from tests.helpers import assert_elements_equal, assert_state_roundtrip, take
from tests.runtime.test_process import (  # noqa: F401 (nothing_left_behind: an autouse fixture)
    BIG,
    assert_killing_a_worker_fails_the_stage,
    no_workers,
    nothing_left_behind,
    our_shared_memory,
    outcomes,
    outcomes_of,
    wait_for,
)

D = fl.Dataset
CALLS = [None, 2, fl.AUTOTUNE]


def pool_of(it: fl.DatasetIterator) -> process.WorkerPool:
    (pool,) = process._pools[it._ctx].values()
    return pool


def numbers(i: Any) -> fl.Dataset:
    """A "file" of 0-9 records (its length depends on the file), parsed by a map."""
    i = int(i)
    return D.range(i * 10, i * 10 + (i * 3) % 10).map(lambda x: (x, np.float32(x) / 2))


def parse_records(i: Any) -> fl.Dataset:
    """A pure-Python parse of a synthetic text "file" into dicts with strings and arrays."""
    i = int(i)
    text = "\n".join(f"{i},{j},{'x' * j}" for j in range(i % 5 + 2))

    def records() -> Any:
        for line in text.splitlines():
            a, b, word = line.split(",")
            yield {"file": np.int64(a), "index": np.int64(b), "word": word.encode()}

    return D.from_generator(records)


def interleaved(
    make: Callable[[Any], fl.Dataset], executor: str, files: int = 7, **kwargs: Any
) -> fl.Dataset:
    return D.range(files).interleave(make, executor=executor, **kwargs)


# -- same outputs as threads --------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", CALLS)
@pytest.mark.parametrize(("cycle", "block"), [(2, 1), (3, 2), (4, 3)])
@pytest.mark.parametrize("make", [numbers, parse_records])
def test_outputs_equal_threads(
    make: Callable[[Any], fl.Dataset], cycle: int, block: int, calls: int | None
) -> None:
    def build(executor: str) -> fl.Dataset:
        return interleaved(
            make, executor, cycle_length=cycle, block_length=block, num_parallel_calls=calls
        )

    assert_elements_equal(list(build("process")), list(build("thread")))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [None, 2])
def test_large_arrays_come_back_through_shared_memory(calls: int | None) -> None:
    def arrays(i: Any) -> fl.Dataset:
        return D.range(4).map(lambda x: np.full(BIG, float(i * 10 + x)))

    def build(executor: str) -> fl.Dataset:
        return interleaved(arrays, executor, files=5, cycle_length=2, num_parallel_calls=calls)

    got = list(build("process"))
    assert_elements_equal(got, list(build("thread")))
    assert got[0].flags.writeable


@pytest.mark.timeout(60)
def test_out_of_order_mode_yields_the_same_elements() -> None:
    def build(executor: str) -> fl.Dataset:
        return interleaved(
            numbers, executor, files=9, cycle_length=3, num_parallel_calls=2, deterministic=False
        )

    def key(element: Any) -> int:
        return int(element[0])

    got, want = sorted(build("process"), key=key), sorted(build("thread"), key=key)
    assert_elements_equal(got, want)


@pytest.mark.timeout(60)
def test_files_parsed_in_workers(tmp_path: Any) -> None:
    paths = []
    for i in range(5):
        path = tmp_path / f"part-{i}.csv"
        path.write_text("".join(f"{i},{j}\n" for j in range(20 + i)))
        paths.append(str(path))

    def parse(path: Any) -> fl.Dataset:
        def split(line: Any) -> Any:
            a, b = line.decode().split(",")
            return np.int32(a), np.int32(b)

        return fl.TextLineDataset(path).map(split)

    def build(executor: str) -> fl.Dataset:
        return D.from_tensor_slices(paths).interleave(
            parse, cycle_length=3, block_length=2, num_parallel_calls=2, executor=executor
        )

    assert_elements_equal(list(build("process")), list(build("thread")))


# -- where the work runs ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [None, 2])
def test_datasets_are_made_and_read_in_worker_processes(calls: int | None) -> None:
    made_in: list[int] = []  # filled in the workers' copies only

    def pids(i: Any) -> fl.Dataset:
        made_in.append(os.getpid())
        return D.range(5).map(lambda x: (os.getpid(), i))

    ds = interleaved(pids, "process", files=6, cycle_length=4, num_parallel_calls=calls)
    with ds.iterator() as it:
        seen = {int(pid) for pid, _ in it}
        workers = pool_of(it).starts
    assert os.getpid() not in seen
    assert not made_in
    assert workers == min(calls or 1, default_parallelism())  # one per slot read at once
    assert len(seen) == workers


@pytest.mark.timeout(60)
def test_options_executor_applies_and_the_argument_wins() -> None:
    options = fl.Options()
    options.executor = "process"

    def pids(executor: str | None) -> set[int]:
        ds = D.range(4).interleave(
            # The inner map stays on threads: where the interleave runs it is where it runs.
            lambda i: D.range(3).map(lambda x: os.getpid(), executor="thread"),
            cycle_length=2,
            num_parallel_calls=2,
            executor=executor,
        )
        return {int(p) for p in ds.with_options(options)}

    assert os.getpid() not in pids(None)
    assert pids("thread") == {os.getpid()}
    assert pids("auto") == {os.getpid()}  # auto never moves an interleave to processes


@pytest.mark.timeout(60)
def test_options_executor_leaves_flat_map_and_text_lines_on_threads(tmp_path: Any) -> None:
    options = fl.Options()
    options.executor = "process"
    flat = D.range(3).flat_map(lambda i: D.range(2).map(lambda x: os.getpid(), executor="thread"))
    assert {int(p) for p in flat.with_options(options)} == {os.getpid()}
    (tmp_path / "a.txt").write_text("x\ny\n")
    lines = fl.TextLineDataset(D.from_tensor_slices([str(tmp_path / "a.txt")] * 2))
    assert list(lines.with_options(options)) == [b"x", b"y", b"x", b"y"]
    assert no_workers()


@pytest.mark.timeout(60)
def test_a_probe_pass_starts_no_worker() -> None:
    ds = interleaved(numbers, "process", cycle_length=2).map(lambda x, y: y)
    assert ds.element_spec.dtype == np.float32
    assert no_workers()


@pytest.mark.timeout(60)
def test_nested_autotune_runs_inline_in_the_workers() -> None:
    def feedline_threads(x: Any) -> int:
        # Stage threads; the worker's own threads (watching for its parent's end, closing
        # what its garbage collector finds) are not.
        names = [t.name for t in threading.enumerate()]
        own = ("feedline-parent-watch", closer.THREAD_NAME)
        return sum(n.startswith("feedline-") and n not in own for n in names)

    def threads_seen(i: Any) -> fl.Dataset:
        return (
            D.range(6).map(feedline_threads, num_parallel_calls=fl.AUTOTUNE).prefetch(fl.AUTOTUNE)
        )

    ds = interleaved(threads_seen, "process", files=3, cycle_length=3, num_parallel_calls=2)
    assert {int(n) for n in ds} == {0}


# -- state --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("calls", [None, 2])
def test_state_roundtrip(calls: int | None) -> None:
    def noisy(i: Any) -> fl.Dataset:
        return parse_records(i).random_map(lambda r, rng: (r["index"], rng.integers(100)), seed=1)

    ds = interleaved(
        noisy, "process", files=6, cycle_length=3, block_length=2, num_parallel_calls=calls
    )
    assert_state_roundtrip(ds, cut_points=(0, 1, 4, 9))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [2, fl.AUTOTUNE])
def test_states_resume_on_either_executor(calls: int) -> None:
    """With num_parallel_calls (without it, slots in processes still read ahead: their states
    are those of slots read ahead)."""

    def build(executor: str) -> fl.Dataset:
        return interleaved(
            numbers, executor, files=8, cycle_length=3, block_length=2, num_parallel_calls=calls
        )

    for saved_on, resumed_on in [("process", "thread"), ("thread", "process")]:
        with build(saved_on).iterator() as it:
            take(it, 11)
            state = it.get_state()
            rest = list(it)
        with build(resumed_on).iterator(state) as resumed:
            assert_elements_equal(list(resumed), rest)


@pytest.mark.timeout(60)
def test_restored_slots_reopen_in_workers_from_their_state() -> None:
    opened: list[Any] = []

    def pids(i: Any) -> fl.Dataset:
        opened.append(i)  # in the parent only if the slot were reopened there
        return D.range(int(i) * 10, int(i) * 10 + 6).map(lambda x: (x, os.getpid()))

    ds = interleaved(pids, "process", files=4, cycle_length=2, num_parallel_calls=2)
    with ds.iterator() as it:
        take(it, 5)
        state = it.get_state()
    # Both slots open, part-way: restoring must reopen them where they were, in workers.
    assert [position for position, _ in state["root"]["slots"]] == [0, 1]
    with ds.iterator(state) as resumed:
        rest = list(resumed)
    assert not opened
    assert os.getpid() not in {int(pid) for _, pid in rest}
    threaded = interleaved(pids, "thread", files=4, cycle_length=2, num_parallel_calls=2)
    assert [int(x) for x, _ in rest] == [int(x) for x, _ in threaded][5:]


# -- errors -------------------------------------------------------------------------------------


class Unreconstructable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def troubled(i: Any) -> Any:
    """Files whose opening fails (1), that are not datasets (4), or with bad records (2, 5)."""
    i = int(i)
    if i == 1:
        raise KeyError("no such file")
    if i == 4:
        return [1, 2]

    def parse(x: Any) -> Any:
        if x % 10 == 3 and i in (2, 5):
            raise ValueError(f"bad record {x}")
        return x

    return D.range(i * 10, i * 10 + 6).map(parse)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", CALLS)
@pytest.mark.parametrize("block", [1, 2])
def test_errors_arrive_where_threads_raise_them(calls: int | None, block: int) -> None:
    def build(executor: str) -> fl.Dataset:
        return interleaved(
            troubled, executor, cycle_length=3, block_length=block, num_parallel_calls=calls
        )

    got, want = outcomes(build("process")), outcomes(build("thread"))
    assert got == want
    assert ("StageError", "map(parse)", 3, "ValueError") in got
    assert ("StageError", "interleave(troubled)", 1, "KeyError") in got
    assert ("StageError", "interleave(troubled)", 4, None) in got


@pytest.mark.timeout(60)
def test_errors_keep_their_type_message_and_worker_traceback() -> None:
    def fails(i: Any) -> fl.Dataset:
        if int(i) == 2:
            raise Unreconstructable(2, 0)  # pickles, but cannot be rebuilt from its args
        return D.range(2).map(lambda x: 1 // (int(x) - 1))

    with interleaved(fails, "process", files=3, cycle_length=1).iterator() as it:
        assert int(next(it)) == -1
        with pytest.raises(fl.StageError) as info:
            next(it)
        division = "ZeroDivisionError: integer division or modulo by zero"
        assert str(info.value) == f"stage 'map(<lambda>)' at element 1: {division}"
        assert type(info.value.__cause__) is ZeroDivisionError
        assert "1 // (int(x) - 1)" in str(info.value.__cause__.__cause__)  # worker's traceback
        assert int(next(it)) == -1
        with pytest.raises(fl.StageError):
            next(it)
        with pytest.raises(
            fl.StageError, match=r"interleave\(fails\)' at element 2: Unreconstructable: 2/0"
        ):
            next(it)
        assert list(it) == []


@pytest.mark.timeout(60)
def test_other_exceptions_keep_their_type(tmp_path: Any) -> None:
    (tmp_path / "here.txt").write_text("a\nb\n")
    paths = [str(tmp_path / "here.txt"), str(tmp_path / "missing.txt")]

    def build(executor: str) -> fl.Dataset:
        return D.from_tensor_slices(paths).interleave(
            fl.TextLineDataset, cycle_length=2, num_parallel_calls=2, executor=executor
        )

    for executor in ("thread", "process"):
        # Closed here, not by the garbage collector: the error's traceback holds the iterator.
        with build(executor).iterator() as it:
            with pytest.raises(FileNotFoundError, match=r"missing\.txt") as info:
                list(it)
            assert info.value.errno == errno.ENOENT


@pytest.mark.timeout(60)
def test_process_maps_inside_are_refused_with_a_hint() -> None:
    ds = interleaved(
        lambda i: D.range(3).map(lambda x: x, executor="process", name="inner"),
        "process",
        cycle_length=2,
    )
    with pytest.raises(fl.StageError, match="use executor='thread' here") as info:
        list(ds)
    assert info.value.stage == "map(inner)"


@pytest.mark.timeout(60)
def test_unpicklable_function_names_the_stage() -> None:
    lock = threading.Lock()

    def locked(i: Any) -> fl.Dataset:
        with lock:
            return D.range(int(i))

    ds = interleaved(locked, "process", cycle_length=2, num_parallel_calls=2)
    with pytest.raises(fl.StageError, match="executor='thread'") as info:
        list(ds)
    assert info.value.stage == "interleave(locked)"


def some_locks(i: Any) -> fl.Dataset:
    """A "file" whose third and fifth records cannot be pickled. Every record is a 0-d object
    array, so all fit the element spec and only pickling tells them apart."""
    i = int(i)

    def record(x: Any) -> Any:
        return np.array(threading.Lock() if x in (2, 4) else i * 10 + int(x), dtype=object)

    return D.range(6).map(record)


def some_failing(i: Any) -> fl.Dataset:
    """``some_locks`` failing where it has locks: what threads do with an error there."""
    i = int(i)

    def record(x: Any) -> Any:
        if x in (2, 4):
            raise ValueError(i)
        return i * 10 + x

    return D.range(6).map(record)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [None, 2])
def test_elements_that_cannot_come_back_fail_only_themselves(calls: int | None) -> None:
    ds = interleaved(some_locks, "process", files=5, cycle_length=2, num_parallel_calls=calls)
    expected: list[Any] = []
    with interleaved(some_failing, "thread", files=5, cycle_length=2).iterator() as it:
        while True:
            try:
                expected.append(int(next(it)))
            except StopIteration:
                break
            except fl.StageError as e:  # a lock: an error at the input position of its file
                file = int(str(e.__cause__))
                expected.append(("StageError", "interleave(some_locks)", file, "TypeError"))
    assert outcomes(ds) == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [None, 2])
def test_state_after_an_element_that_cannot_come_back_resumes_exactly(calls: int | None) -> None:
    ds = interleaved(some_locks, "process", files=5, cycle_length=2, num_parallel_calls=calls)
    everything = outcomes(ds)
    for errors_before in range(1, 4):
        with ds.iterator() as it:
            seen = 0
            while seen < errors_before:
                try:
                    next(it)
                except fl.StageError:
                    seen += 1
            state = it.get_state()
        with ds.iterator(state) as resumed:
            cut = [i for i, x in enumerate(everything) if isinstance(x, tuple)][errors_before - 1]
            assert outcomes_of(resumed) == everything[cut + 1 :]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [None, 2])
def test_killed_worker_is_a_stage_error_and_stops_every_worker(calls: int | None) -> None:
    def endless(i: Any) -> fl.Dataset:
        def slow(x: Any) -> Any:
            time.sleep(0.002)
            return os.getpid(), np.zeros(BIG)  # big elements: segments in flight when it dies

        return D.range(100_000).map(slow)

    ds = interleaved(endless, "process", files=4, cycle_length=4, num_parallel_calls=calls)
    assert_killing_a_worker_fails_the_stage(
        ds, "interleave(endless)", "input elements at positions"
    )


def dying_once(marker: str, file: int, at: int | None) -> Callable[[Any], fl.Dataset]:
    """Files of 30 records; the worker opening ``file`` (``at`` None) or reading its record
    ``at`` is killed, the first time only (``marker`` says it happened)."""

    def die_once() -> None:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    def records(i: Any) -> fl.Dataset:
        i = int(i)
        if i == file and at is None:
            die_once()

        def record(x: Any) -> Any:
            if i == file and x == at:
                die_once()
            return i * 100 + x

        return D.range(30).map(record)

    return records


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [None, 2])
@pytest.mark.parametrize("at", [None, 17], ids=["opening", "reading"])
def test_state_after_a_killed_worker_resumes_with_every_element(
    tmp_path: Any, calls: int | None, at: int | None
) -> None:
    ds = interleaved(
        dying_once(str(tmp_path / "died"), 3, at),
        "process",
        files=8,
        cycle_length=2,
        block_length=3,
        num_parallel_calls=calls,
    )
    got: list[int] = []
    with ds.iterator() as it:
        with pytest.raises(fl.StageCrashedError, match="SIGKILL"):
            while True:
                got.append(int(next(it)))
        state = it.get_state()
        assert list(it) == []  # the pass ended with the crash
    with ds.iterator(state) as resumed:
        got += [int(x) for x in resumed]
    # None lost, none twice.
    assert sorted(got) == [i * 100 + x for i in range(8) for x in range(30)]


# -- shutdown and lifetime ----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", [None, 2])
def test_nothing_left_after_early_break_close_or_drop(calls: int | None) -> None:
    def arrays(i: Any) -> fl.Dataset:
        return D.range(1000).map(lambda x: np.full(BIG, float(x)))

    def break_early() -> None:
        for i, _ in enumerate(ds):
            if i == 3:
                break

    def close() -> None:
        with ds.iterator() as it:
            take(it, 2)

    def drop() -> None:
        take(iter(ds), 2)

    ds = interleaved(arrays, "process", files=6, cycle_length=3, num_parallel_calls=calls)
    for leave in (break_early, close, drop):
        leave()
        assert wait_for(no_workers), leave
        assert wait_for(lambda: not our_shared_memory()), leave


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cut_short", [False, True])
def test_workers_start_once_per_iterator_across_repeat_epochs(cut_short: bool) -> None:
    ds = interleaved(
        lambda i: D.range(5).map(lambda x: os.getpid()),
        "process",
        cycle_length=4,
        num_parallel_calls=2,
    )
    if cut_short:  # each epoch closes its slots before their end
        ds = ds.take(7)
    ds = ds.repeat(4)
    with ds.iterator() as it:
        pids = {int(p) for p in it}
        pool = pool_of(it)
        assert pool.starts == min(2, default_parallelism())
    assert len(pids) == pool.starts


# -- building -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_executors_checked_at_build_time() -> None:
    assert isinstance(D.range(3).interleave(lambda x: D.range(x), executor="process"), fl.Dataset)
    with pytest.raises(ValueError, match="executor must be one of"):
        D.range(3).interleave(lambda x: D.range(x), executor="fork")
    assert no_workers()  # nothing starts before iterating


@pytest.mark.timeout(30)
def test_stats_report_the_workers_memory() -> None:
    ds = interleaved(numbers, "process", files=40, cycle_length=2, num_parallel_calls=2)
    with ds.iterator() as it:
        take(it, 20)
        (workers,) = it.stats()["worker_processes"]
        assert workers["stage"] == pool_of(it).name
        assert workers["processes"] == min(2, default_parallelism())
        assert workers["rss_bytes"] > 0


@pytest.mark.timeout(30)
def test_map_func_may_close_over_a_dataset() -> None:
    # Datasets hold locks (and an in-memory cache its contents): a copy sent to a worker
    # makes its own.
    template = D.range(5).map(lambda x: x * 10).cache()
    list(template)  # the cache is full here; the workers fill their own

    def build(executor: str) -> fl.Dataset:
        return interleaved(
            lambda i: template.map(lambda x: x + i), executor, cycle_length=2, num_parallel_calls=2
        )

    assert outcomes(build("process")) == outcomes(build("thread"))
