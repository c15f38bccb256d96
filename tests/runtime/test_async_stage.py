"""The asynchronous stage: order, errors, knobs, bounds, lifecycle and resumable state."""

from __future__ import annotations

import _thread
import gc
import random
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.runtime.parallel import default_parallelism
from feedline.runtime.stage import workers
from feedline.runtime.stage.sizing import MAX_CHUNK
from tests.conftest import feedline_threads
from tests.helpers import assert_elements_equal, assert_state_roundtrip, take

D = fl.Dataset
PARALLELISMS = [1, 2, 3, 8, fl.AUTOTUNE]


def jittery(seed: int, max_delay: float = 0.002) -> Any:
    """A map function with a random (but per-element fixed) delay."""

    def fn(x: Any) -> Any:
        time.sleep(random.Random(seed * 100_003 + int(x)).random() * max_delay)
        return x * 10

    return fn


def untuned(ds: fl.Dataset) -> fl.Dataset:
    """The dataset with AUTOTUNE off, for tests that move knobs themselves."""
    options = fl.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def stages(it: fl.DatasetIterator) -> dict[str, Any]:
    return {s.name: s for s in it._ctx.stages()}


def drain_with_errors(it: Any) -> list[Any]:
    """Everything an iterator yields, with each error recorded as ``("error", position)``."""
    out: list[Any] = []
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except fl.StageError as e:
            out.append(("error", e.position))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parallelism", PARALLELISMS)
def test_parallel_map_keeps_sequential_order(parallelism: int) -> None:
    ds = D.range(300).map(jittery(parallelism), num_parallel_calls=parallelism)
    assert [int(x) for x in ds] == [10 * i for i in range(300)]


@pytest.mark.timeout(60)
def test_out_of_order_mode_lets_fast_elements_overtake() -> None:
    def slow_first(x: Any) -> Any:
        time.sleep(0.3 if x == 0 else 0.0)
        return x

    ds = D.range(50).map(slow_first, num_parallel_calls=4, deterministic=False)
    out = [int(x) for x in ds]
    assert sorted(out) == list(range(50))
    assert out[0] != 0  # element 0 took 0.3 s; others finished long before


@pytest.mark.timeout(60)
def test_options_deterministic_false_applies_when_op_does_not_say() -> None:
    def slow_first(x: Any) -> Any:
        time.sleep(0.3 if x == 0 else 0.0)
        return x

    options = fl.Options()
    options.deterministic = False
    ds = D.range(30).map(slow_first, num_parallel_calls=4).with_options(options)
    out = [int(x) for x in ds]
    assert sorted(out) == list(range(30)) and out[0] != 0
    # ... and the op's own deterministic=True wins over the option.
    ds = D.range(30).map(slow_first, num_parallel_calls=4, deterministic=True)
    assert [int(x) for x in ds.with_options(options)] == list(range(30))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parallelism", [None, 1, 4, fl.AUTOTUNE])
def test_errors_surface_at_their_position_and_the_pass_goes_on(parallelism: Any) -> None:
    bad = {3, 17, 18, 90}

    def fn(x: Any) -> Any:
        if int(x) in bad:
            raise ValueError(f"bad element {int(x)}")
        return x

    ds = D.range(100).map(fn, num_parallel_calls=parallelism, name="check")
    out = drain_with_errors(iter(ds))
    expected = [("error", i) if i in bad else i for i in range(100)]
    assert [o if isinstance(o, tuple) else int(o) for o in out] == expected
    assert [int(x) for x in ds.ignore_errors()] == [i for i in range(100) if i not in bad]


@pytest.mark.timeout(30)
def test_error_names_stage_and_keeps_original_traceback() -> None:
    def parse(x: Any) -> Any:
        raise KeyError("missing field")

    with pytest.raises(fl.StageError) as info:
        next(iter(D.range(5).map(parse, num_parallel_calls=2)))
    assert "map(parse)" in str(info.value) and "element 0" in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, KeyError)
    frames = []
    tb = cause.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "parse" in frames


@pytest.mark.timeout(30)
@pytest.mark.parametrize("buffer", [3, fl.AUTOTUNE], ids=["thread", "tuned-inline"])
def test_upstream_error_passes_through_a_prefetch_at_its_position(buffer: int) -> None:
    def fn(x: Any) -> Any:
        if int(x) == 5:
            raise RuntimeError("boom")
        return x

    out = drain_with_errors(iter(D.range(10).map(fn).prefetch(buffer)))
    assert [o if isinstance(o, tuple) else int(o) for o in out] == [
        0,
        1,
        2,
        3,
        4,
        ("error", 5),
        6,
        7,
        8,
        9,
    ]


class Fatal(BaseException):
    """Not an Exception: escapes user-error handling and kills the worker."""


@pytest.mark.timeout(30)
def test_a_crashing_worker_is_reported_not_hung() -> None:
    def fn(x: Any) -> Any:
        if int(x) == 7:
            raise Fatal()
        return x

    with pytest.raises(fl.StageError, match="crashed"):
        list(D.range(100).map(fn, num_parallel_calls=2))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("calls", [2, None])
def test_ignore_errors_does_not_spin_on_a_crashed_stage(calls: int | None) -> None:
    """A crash (a BaseException on a worker thread, or inline) is raised once through
    ignore_errors, and the pass ends: it used to be skipped on every next(), forever."""

    def fn(x: Any) -> Any:
        if int(x) == 7:
            raise Fatal()
        return x

    ds = D.range(100).map(fn, num_parallel_calls=calls).ignore_errors()
    got, crashes, raised_as_is = [], 0, 0
    with ds.iterator() as it:
        for _ in range(200):  # a spinning stage would raise on every one of these
            try:
                got.append(int(next(it)))
            except StopIteration:
                break
            except fl.StageCrashedError:
                crashes += 1
            except Fatal:  # inline, the function's own BaseException reaches the caller first
                raised_as_is += 1
    assert crashes == 1
    assert raised_as_is == (1 if calls is None else 0)
    assert got == list(range(len(got))) and len(got) <= 7


@pytest.mark.timeout(30)
def test_system_exit_from_an_inline_map_then_next_does_not_block() -> None:
    def fn(x: Any) -> Any:
        if int(x) == 3:
            raise SystemExit(2)
        return x

    with D.range(10).map(fn).iterator() as it:
        assert [int(next(it)) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(SystemExit):
            next(it)
        with pytest.raises(fl.StageCrashedError, match="SystemExit"):
            next(it)
        with pytest.raises(StopIteration):
            next(it)
        state = it.get_state()

    # The state still holds the work the exit stopped: a restore makes it again.
    def fine(x: Any) -> Any:
        return x

    resumed = D.range(10).map(fine, name="fn")
    with resumed.iterator(state) as it:
        assert [int(x) for x in it] == list(range(3, 10))


@pytest.mark.timeout(30)
def test_a_crash_upstream_ends_a_downstream_stage_without_losing_its_place() -> None:
    """A stage whose input crashed delivers what it made, the crash once, then ends; its
    state resumes with every element not delivered."""

    def fn(x: Any) -> Any:
        if int(x) == 40:
            raise Fatal()
        return x

    ds = D.range(60).map(fn, num_parallel_calls=2).prefetch(3).map(lambda x: x)
    got = []
    with ds.iterator() as it:
        with pytest.raises(fl.StageCrashedError):
            for x in it:
                got.append(int(x))
        assert list(it) == []
        state = it.get_state()
    assert got == list(range(len(got)))
    resumed = D.range(60).map(lambda x: x, num_parallel_calls=2, name="fn")
    resumed = resumed.prefetch(3).map(lambda x: x)
    with resumed.iterator(state) as it:
        assert got + [int(x) for x in it] == list(range(60))


@pytest.mark.timeout(60)
def test_knobs_change_while_running_without_losing_or_repeating() -> None:
    ds = untuned(D.range(3000).map(jittery(5, 0.0002), num_parallel_calls=fl.AUTOTUNE).prefetch(4))
    out = []
    with ds.iterator() as it:
        by_name = stages(it)
        mapper = next(s for n, s in by_name.items() if n.startswith("map"))
        prefetcher = next(s for n, s in by_name.items() if n.startswith("prefetch"))
        settings = [(1, 1), (8, 16), (0, 2), (3, 1), (16, 64), (2, 3)]
        for parallelism, buffer in settings:
            mapper.knobs["parallelism"].set(parallelism)
            prefetcher.knobs["buffer_size"].set(buffer)
            out.extend(take(it, 400))
            assert mapper.parallelism == parallelism
        out.extend(it)
    assert [int(x) for x in out] == [10 * i for i in range(3000)]


@pytest.mark.timeout(60)
def test_parallelism_zero_runs_inline_without_threads() -> None:
    ds = untuned(D.range(500).map(lambda x: x + 1, num_parallel_calls=fl.AUTOTUNE))
    with ds.iterator() as it:
        (stage,) = stages(it).values()
        stage.knobs["parallelism"].set(0)
        seen_threads = set()
        out = []
        for x in it:
            out.append(int(x))
            seen_threads.update(t.name for t in feedline_threads())
    assert out == list(range(1, 501))
    assert not seen_threads


@pytest.mark.timeout(60)
def test_workers_let_go_are_parked_not_idle() -> None:
    # The tuner reads idle workers as workers to spare: those beyond the parallelism are
    # neither, and counting them would make the rest look idler than they are.
    ds = untuned(D.range(10**6).map(lambda x: x, num_parallel_calls=8))
    with ds.iterator() as it:
        next(it)  # the workers fill the buffer, then wait for room: all idle
        (mapper,) = stages(it).values()
        time.sleep(0.1)
        mapper.knobs["parallelism"].set(2)
        time.sleep(0.1)  # the six let go park
        before = mapper.metrics.snapshot()["worker_idle"]
        started = time.perf_counter()
        time.sleep(0.3)
        idle = mapper.metrics.snapshot()["worker_idle"] - before
        elapsed = time.perf_counter() - started
    assert elapsed < idle < 3 * elapsed  # two workers idle (of the eight started)


@pytest.mark.timeout(60)
def test_parked_workers_end_when_released(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parked, they would wait a minute to be taken back; released (another stage needs their
    # share of the thread budget), they end now, and the two the stage keeps go on working.
    monkeypatch.setattr(workers, "PARKED_SECONDS", 60.0)
    ds = untuned(D.range(10**6).map(lambda x: x, num_parallel_calls=8))
    with ds.iterator() as it:
        next(it)
        (mapper,) = stages(it).values()
        mapper.knobs["parallelism"].set(2)

        def alive() -> int:
            return sum(1 for t in feedline_threads() if t.name.startswith("feedline-map"))

        deadline = time.monotonic() + 10
        while alive() != 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # every one started is alive: the six let go are parked
        assert alive() == 8
        mapper.release_parked()
        while alive() > 2 and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        assert alive() == 2
        assert len(take(it, 1000)) == 1000


@pytest.mark.timeout(60)
def test_buffers_stay_bounded_in_elements_behind_a_slow_consumer() -> None:
    ds = D.range(100_000).map(lambda x: x, num_parallel_calls=4).prefetch(3)
    with ds.iterator() as it:
        by_name = stages(it)
        prefetcher = by_name["prefetch(3)"]
        mapper = next(s for n, s in by_name.items() if n.startswith("map"))
        # The map's limit follows its chunk size, which follows the cost it measures: a slow
        # chunk (a loaded machine) lowers it after elements were taken under a higher one.
        highest = mapper.buffer_limit()
        for _ in range(20):
            next(it)
            time.sleep(0.005)
            highest = max(highest, mapper.buffer_limit())
            assert prefetcher._reserved <= 3
            assert mapper._reserved <= max(highest, 2 * 4 * MAX_CHUNK) + 256


def spin(seconds: float) -> None:
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "work, max_parallelism",
    [("sleep", None), ("sleep", 12), ("spin", None), ("lazy", None)],
)
def test_a_tuned_map_starts_with_workers_for_what_its_first_call_did(
    work: str, max_parallelism: int | None
) -> None:
    def fn(x: Any) -> Any:
        # "lazy": the first call waits (a set-up), the calls after it compute. A wait of
        # 20 ms keeps the call's own CPU (~0.3 ms on a loaded machine) well under 5% of it.
        waits = work == "sleep" or (work == "lazy" and x == 0)
        if waits:
            time.sleep(0.02)
        else:
            spin(0.005)
        return x

    options = fl.Options()
    options.autotune.max_parallelism = max_parallelism
    ds = D.range(100).map(fn, num_parallel_calls=fl.AUTOTUNE).with_options(options)
    with ds.iterator() as it:
        (stage,) = stages(it).values()
        next(it)  # the first chunk runs inline and is measured ...
        assert stage.parallelism == (0 if work != "spin" else default_parallelism())
        next(it)  # ... and a second one too if the first waited: one call is a thin sample
        cores = default_parallelism()
        if work != "sleep":
            assert stage.parallelism == cores  # computing: a worker per core
        else:
            # Waiting: as many calls in flight as would keep the cores busy (cores / the
            # call's CPU share: well over 20 per core for a 20 ms sleep), within the maximum.
            assert stage.solo_cpu_share < 0.05
            most = max_parallelism or 256
            assert min(most, 20 * cores) <= stage.parallelism <= most


@pytest.mark.timeout(60)
def test_a_tuned_map_whose_first_call_paid_a_set_up_starts_inline_when_the_rest_is_cheap() -> None:
    def fn(x: Any) -> Any:
        if x == 0:
            spin(0.0003)  # first-call costs: a spec traced, a table built
        return x

    ds = D.range(1000).map(fn, num_parallel_calls=fl.AUTOTUNE)
    with ds.iterator() as it:
        (stage,) = stages(it).values()
        assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
        assert stage.parallelism == 0
        assert stage.start_choice is not None
        assert "cheaper inline than a hand-off" in stage.start_choice.reason


class CountingCondition(threading.Condition):
    """A condition that counts the waits it ends (notified or not)."""

    wakeups = 0

    def wait(self, timeout: float | None = None) -> bool:
        notified = super().wait(timeout)
        self.wakeups += 1
        return notified


@pytest.mark.timeout(60)
def test_room_in_the_buffer_wakes_one_worker_not_all() -> None:
    """With many workers waiting for room, each retired chunk wakes one of them: waking them
    all cost every one a GIL hand-off per chunk (256 threads: a third of the throughput)."""
    workers, elements = 32, 400

    def wait_a_little(x: Any) -> Any:
        time.sleep(0.002)
        return x

    ds = untuned(D.range(elements).map(wait_a_little, num_parallel_calls=workers))
    with ds.iterator() as it:
        (stage,) = stages(it).values()
        counting = stage._space_free = CountingCondition(stage._lock)
        out = []
        for x in it:
            out.append(int(x))
            time.sleep(0.0005)  # slower than the workers: they wait for room
        chunks = stage.metrics.chunks
    assert out == list(range(elements))
    # One wake-up per retired chunk, one more per chunk reserved while room was left, and one
    # per worker at the end.
    assert counting.wakeups <= 2 * chunks + workers


@pytest.mark.timeout(60)
def test_buffers_stay_bounded_in_bytes_and_report_them() -> None:
    megabyte = 2**20
    ds = D.range(200).map(lambda x: np.zeros(megabyte, np.uint8), num_parallel_calls=2)
    with ds.iterator() as it:
        (stage,) = stages(it).values()
        limit = 8 * megabyte
        stage.max_buffer_bytes = limit
        for _ in range(5):
            next(it)
            time.sleep(0.1)  # let the workers fill what they may
            held = it.buffered_bytes()
            # Chunks in flight are capped at half the limit in all: 1.5x the limit at most,
            # plus the first chunk, sized before the stage had seen an element's size.
            assert 0 < held <= 1.5 * limit + megabyte
            assert stage.metrics.snapshot()["buffered_bytes"] == held


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["break", "close", "drop", "context"])
def test_stopping_early_leaves_no_thread(how: str) -> None:
    ds = D.range(100_000).map(jittery(1, 0.0005), num_parallel_calls=4).prefetch(8)
    if how == "break":
        for i, _ in enumerate(ds):
            if i == 50:
                break
    elif how == "close":
        it = iter(ds)
        take(it, 50)
        it.close()
        assert list(it) == []
    elif how == "drop":
        it = iter(ds)
        take(it, 50)
        del it
        gc.collect()
    else:
        with ds.iterator() as it:
            take(it, 50)
    assert all_feedline_threads_end()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("parallelism", [None, 2, fl.AUTOTUNE])
@pytest.mark.parametrize("fails_every", [0, 10])
@pytest.mark.parametrize("prefetched", [True, False])
def test_dropping_an_iterator_after_an_error_leaves_no_thread(
    parallelism: Any, fails_every: int, prefetched: bool
) -> None:
    """A raised error's traceback leads back to the consumer's frames; the stage must not keep
    it, or its worker (and tuner) threads would keep the dropped iterator (and themselves)
    alive. With errors in most elements, an error still waiting in a chunk shares that chunk
    with one already raised: nothing it keeps may lead to the raised one (a Python int
    result makes the map convert its chunk into a new list, and the first stays behind)."""

    def fn(x: Any) -> Any:
        if (int(x) % fails_every != 0) if fails_every else int(x) == 3:
            raise ValueError("bad")
        return int(x)

    ds = D.range(1000).map(fn, num_parallel_calls=parallelism).ignore_errors()
    break_after_three_then_no_thread(ds.prefetch(2) if prefetched else ds)


@pytest.mark.timeout(30)
def test_dropping_an_iterator_while_an_inline_map_holds_errors_leaves_no_thread() -> None:
    """A map run inline on the consumer's thread keeps the rest of its chunk, errors included,
    and an error keeps the frames it was made in, and their callers'. The stage is kept by
    the threads of the stage before it; those frames must not lead back to the iterator."""

    def fails_most(x: Any) -> Any:
        if int(x) % 10 != 0:
            raise ValueError("bad")
        return int(x)

    ds = D.range(100_000).map(lambda x: x, num_parallel_calls=2).map(fails_most)
    break_after_three_then_no_thread(ds.ignore_errors().batch(4))


def break_after_three_then_no_thread(ds: fl.Dataset) -> None:
    """A loop that breaks early, then the garbage collector: no feedline thread is left."""
    for i, _ in enumerate(ds):
        if i == 3:
            break
    assert all_feedline_threads_end(collecting=True)


def all_feedline_threads_end(collecting: bool = False) -> bool:
    """Whether every feedline thread ends soon. A stopped pass's threads end within a
    moment; the 10 s allowed are for a loaded machine, where a join can take that long."""
    deadline = time.monotonic() + 10.0
    while feedline_threads() and time.monotonic() < deadline:
        if collecting:
            gc.collect()
        time.sleep(0.01)
    return not feedline_threads()


@pytest.mark.timeout(30)
def test_keyboard_interrupt_while_waiting_stops_the_workers() -> None:
    def slow(x: Any) -> Any:
        time.sleep(0.05)
        return x

    ds = D.range(10_000).map(slow, num_parallel_calls=4).prefetch(2)
    it = iter(ds)
    next(it)
    # A shell starts background jobs with SIGINT ignored, and then interrupt_main does
    # nothing: give this process Python's own Ctrl-C handler, as an interactive run has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            for _ in it:
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert all_feedline_threads_end()


@pytest.mark.timeout(60)
def test_random_map_is_the_same_at_any_parallelism_and_new_each_pass() -> None:
    def augment(x: Any, rng: np.random.Generator) -> Any:
        return x * 1000 + rng.integers(1000)

    def run(parallelism: Any) -> list[int]:
        ds = D.range(200).random_map(augment, seed=7, num_parallel_calls=parallelism)
        return [int(v) for v in ds]

    reference = run(None)
    for parallelism in [1, 4, fl.AUTOTUNE]:
        assert run(parallelism) == reference
    ds = D.range(200).random_map(augment, seed=7)
    with ds.iterator() as first, ds.iterator() as second:
        assert [int(v) for v in first] != [int(v) for v in second]
    unseeded = D.range(50).random_map(augment)
    assert [int(v) for v in unseeded] != [int(v) for v in unseeded]
    two_epochs = [int(v) for v in D.range(50).random_map(augment, seed=3).repeat(2)]
    assert two_epochs[:50] != two_epochs[50:]


ROUNDTRIP_CASES = {
    "parallel map": lambda: D.range(40).map(lambda x: x * 2, num_parallel_calls=3),
    "map with errors ignored": lambda: (
        D.range(40).map(lambda x: 10 // (int(x) % 7), num_parallel_calls=2).ignore_errors()
    ),
    "random_map": lambda: D.range(40).random_map(
        lambda x, rng: x + rng.integers(100), num_parallel_calls=4
    ),
    "unseeded random_map": lambda: D.range(30).random_map(lambda x, rng: x + rng.random()),
    "prefetch": lambda: D.range(40).prefetch(3),
    "batched parallel map with prefetch": lambda: (
        D.range(101)
        .map(lambda x: x + 1, num_parallel_calls=fl.AUTOTUNE)
        .batch(8)
        .prefetch(fl.AUTOTUNE)
    ),
    "parallel interleave": lambda: D.range(6).interleave(
        lambda x: D.range(int(x) * 3), cycle_length=3, block_length=2, num_parallel_calls=3
    ),
    "repeat over prefetched shuffle": lambda: D.range(15).shuffle(5, seed=1).prefetch(2).repeat(3),
    "nested async stages": lambda: (
        D.range(60)
        .map(lambda x: x * 3, num_parallel_calls=2)
        .prefetch(2)
        .map(lambda x: x + 1, num_parallel_calls=3)
        .prefetch(1)
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(ROUNDTRIP_CASES))
def test_state_round_trip(case: str) -> None:
    assert_state_roundtrip(ROUNDTRIP_CASES[case](), cut_points=(0, 1, 2, 5, 9, 17))


@pytest.mark.timeout(60)
def test_out_of_order_state_loses_and_repeats_nothing() -> None:
    def uneven(x: Any) -> Any:
        time.sleep(0.02 if int(x) % 5 == 0 else 0.0)
        return x

    ds = D.range(120).map(uneven, num_parallel_calls=4, deterministic=False)
    for cut in (1, 7, 30, 77):
        with ds.iterator() as it:
            before = [int(x) for x in take(it, cut)]
            state = it.get_state()
        with ds.iterator(state) as resumed:
            after = [int(x) for x in resumed]
        assert sorted(before + after) == list(range(120)), f"cut at {cut}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(12))
def test_stress_random_pipelines_delays_failures_breaks_and_restores(seed: int) -> None:
    """Random parallelism, random per-element delays and failures, restores at random
    points: whatever comes out equals the sequential run, with nothing lost or repeated."""
    rng = random.Random(seed)
    n = rng.randrange(50, 400)
    failing = set(rng.sample(range(n), rng.randrange(0, 5)))
    calls = [None, 1, 2, 5, 16, fl.AUTOTUNE]

    def fn(x: Any) -> Any:
        i = int(x)
        time.sleep(random.Random(seed * 7919 + i).random() * 0.0005)
        if i in failing:
            raise ValueError(i)
        return x * 2

    def build(parallel: Any, buffer: Any) -> fl.Dataset:
        ds = D.range(n).map(fn, num_parallel_calls=parallel).ignore_errors()
        if rng.random() < 0.5:
            ds = ds.prefetch(buffer)
        return ds.batch(rng.choice([1, 3, 16])) if rng.random() < 0.3 else ds

    def flat(items: list[Any]) -> list[int]:
        return [int(v) for item in items for v in np.atleast_1d(item)]

    expected = [2 * i for i in range(n) if i not in failing]
    for _ in range(3):
        ds = build(rng.choice(calls), rng.choice([1, 2, 7, fl.AUTOTUNE]))
        assert flat(list(ds)) == expected
        cut = rng.randrange(0, 30)
        with ds.iterator() as it:
            before = take(it, cut)
            state = it.get_state()
            if rng.random() < 0.5:
                take(it, rng.randrange(0, 20))  # wander on before restoring
        with ds.iterator(state) as resumed:
            assert flat(before + list(resumed)) == expected
        for i, _ in enumerate(ds):  # an early break must not hang or leak
            if i == cut:
                break


@pytest.mark.timeout(60)
def test_output_identical_across_parallelism_for_nested_elements() -> None:
    def to_pair(x: Any) -> Any:
        return {"id": x, "feat": np.full((3,), float(x), np.float32)}

    reference = list(D.range(64).map(to_pair).batch(8))
    for parallelism in [1, 2, 8, fl.AUTOTUNE]:
        got = list(D.range(64).map(to_pair, num_parallel_calls=parallelism).batch(8).prefetch(2))
        assert_elements_equal(got, reference)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("deterministic", [True, False])
def test_chaos_knob_changes_never_lose_reorder_or_hang(seed: int, deterministic: bool) -> None:
    """A thread flips every knob at random (including to inline and back) while the pipeline
    runs; the output is still exactly the sequential one (as a multiset when out of order)."""
    n = 3000
    ds = (
        D.range(n)
        .map(jittery(seed, 0.0002), num_parallel_calls=fl.AUTOTUNE, deterministic=deterministic)
        .batch(7)
        .prefetch(fl.AUTOTUNE)
        .unbatch()
        .map(lambda x: x + 1, num_parallel_calls=fl.AUTOTUNE, deterministic=deterministic)
        .prefetch(fl.AUTOTUNE)
    )
    ds = untuned(ds)  # only the chaos thread moves knobs
    stop = threading.Event()
    rng = random.Random(seed)

    with ds.iterator() as it:

        def chaos() -> None:
            while not stop.is_set():
                for stage in it._ctx.stages():
                    knob = stage.knobs[rng.choice(["parallelism", "buffer_size"])]
                    knob.set(
                        rng.randrange(0, 9) if knob.name == "parallelism" else rng.randrange(1, 17)
                    )
                time.sleep(rng.random() * 0.003)

        flipper = threading.Thread(target=chaos, name="chaos")
        flipper.start()
        try:
            out = [int(x) for x in it]
        finally:
            stop.set()
            flipper.join()
    expected = [10 * i + 1 for i in range(n)]
    assert (out if deterministic else sorted(out)) == expected


@pytest.mark.timeout(60)
def test_chunks_from_a_slow_input_stay_short_however_cheap_the_work() -> None:
    # Workers pull chunks from the input one at a time, and a chunk is delivered whole: sized
    # on the map's own work alone (a multiplication), chunks from a generator that reads
    # grew to 4096 elements, 0.8 s each, and the second batch waited seconds for them.
    def slow_reads() -> Any:
        for i in range(10**6):
            time.sleep(0.0005)
            yield i

    source = D.from_generator(slow_reads, output_signature=fl.TensorSpec((), np.int64))
    ds = untuned(source.map(lambda x: x * 2, num_parallel_calls=8).batch(8))
    with ds.iterator() as it:
        for _ in range(40):
            next(it)
        (mapper,) = (s for s in stages(it).values() if s.name.startswith("map"))
        # 10 ms of pulling at no less than 0.5 ms an element, with room for one doubling
        assert mapper.chunk_size <= 2 * 20
