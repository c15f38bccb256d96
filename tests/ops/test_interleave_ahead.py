"""A parallel interleave reads the next input elements' datasets before their turn (tf.data's
future elements): the order, errors and states stay those of reading them in turn."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.ops.interleave_ahead import DATASETS_AHEAD_UNDER_AUTOTUNE, datasets_ahead
from tests.helpers import assert_state_roundtrip

D = fl.Dataset
pytestmark = pytest.mark.timeout(60)


def sequential_order(lengths: list[int]) -> list[int]:
    return [100 * k + i for k, n in enumerate(lengths) for i in range(n)]


def files(lengths: list[int]) -> D:
    """Input element k: a "file" of ``lengths[k]`` elements 100k, 100k+1, ... (no map: its
    spec tracing would call the function)."""
    table = [np.arange(100 * k, 100 * k + n, dtype=np.int64) for k, n in enumerate(lengths)]
    return D.range(len(lengths)).map(int), table


def read_at_once(lengths: list[int], calls: Any, cycle_length: int | None = None) -> D:
    names, table = files(lengths)
    return names.interleave(
        lambda k: D.from_tensor_slices(table[k]),
        cycle_length=cycle_length,
        block_length=1,
        num_parallel_calls=calls,
    )


@pytest.mark.parametrize(
    ("calls", "ahead"), [(None, 0), (fl.AUTOTUNE, DATASETS_AHEAD_UNDER_AUTOTUNE), (4, 0)]
)
def test_how_many_are_opened_ahead(calls: Any, ahead: int) -> None:
    assert datasets_ahead(calls) == ahead


LENGTHS = [3, 0, 5, 1, 4, 2, 6]


def test_reading_ahead_keeps_the_order_of_reading_in_turn() -> None:
    # Cycle 1: file after file, whatever is read ahead.
    ds = read_at_once(LENGTHS, fl.AUTOTUNE, cycle_length=1)
    assert [int(x) for x in ds] == sequential_order(LENGTHS)


def test_datasets_ahead_are_read_before_their_turn() -> None:
    started: dict[int, float] = {}
    lock = threading.Lock()

    def opened(k: int) -> D:
        def read(x: Any) -> Any:
            with lock:
                started.setdefault(k, time.perf_counter())
            time.sleep(0.01)
            return x

        return D.from_tensor_slices(np.arange(100 * k, 100 * k + 5)).map(read)

    ds = D.range(4).map(int).interleave(opened, num_parallel_calls=fl.AUTOTUNE)
    with ds.iterator() as it:
        first = next(it)
        time.sleep(0.2)  # the consumer works: files 1 and 2 are read meanwhile
        asked_second_file = time.perf_counter()
        rest = [int(x) for x in it]
    assert [int(first), *rest] == sequential_order([5, 5, 5, 5])
    assert started[1] < asked_second_file and started[2] < asked_second_file
    assert started[3] > asked_second_file - 0.2  # the third ahead only once a slot took one


@pytest.mark.parametrize("cycle", [1, 2])
def test_state_round_trip_while_datasets_are_open_ahead(cycle: int) -> None:
    ds = read_at_once(LENGTHS, fl.AUTOTUNE, cycle_length=cycle)
    assert_state_roundtrip(ds, cut_points=(0, 1, 4, 9, 11))


def test_an_input_error_read_ahead_is_raised_in_its_turn() -> None:
    def check(k: int) -> int:
        if k == 2:
            raise ValueError("bad name")
        return k

    table = [np.arange(100 * k, 100 * k + 3) for k in range(5)]
    names = D.range(5).map(check)
    ds = names.interleave(
        lambda k: D.from_tensor_slices(table[k]), cycle_length=1, num_parallel_calls=fl.AUTOTUNE
    )
    got: list[int] = []
    with ds.iterator() as it, pytest.raises(fl.errors.StageError, match="bad name"):
        while True:
            got.append(int(next(it)))
    # Files 0 and 1 whole, then the error: where reading in turn raises it.
    assert got == [0, 1, 2, 100, 101, 102]
    skipped = [int(x) for x in ds.ignore_errors()]
    assert skipped == [0, 1, 2, 100, 101, 102, 300, 301, 302, 400, 401, 402]


def test_a_dataset_that_fails_to_open_ahead_fails_in_its_turn() -> None:
    table = [np.arange(100 * k, 100 * k + 2) for k in range(4)]

    def opened(k: int) -> D:
        if k == 1:
            raise OSError("no such file: 1")
        return D.from_tensor_slices(table[k])

    ds = D.range(4).map(int).interleave(opened, cycle_length=1, num_parallel_calls=fl.AUTOTUNE)
    got: list[int] = []
    with ds.iterator() as it:
        got.append(int(next(it)))
        got.append(int(next(it)))
        with pytest.raises(fl.errors.StageError, match="no such file: 1"):
            next(it)
        got += [int(x) for x in it]  # reading goes on with the next file, as in turn
    assert got == [0, 1, 200, 201, 300, 301]


def test_closing_early_stops_the_readers_opened_ahead() -> None:
    ds = read_at_once([1000] * 8, fl.AUTOTUNE, cycle_length=1)
    with ds.iterator() as it:
        for _ in range(10):
            next(it)
    # The autouse check (tests/conftest.py) fails the test if a reader thread is left.
