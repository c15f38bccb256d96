"""A stage's state: the short way (a run of plain ranges, the oldest partly delivered) gives
what the general computation gives, and a buffer of cheap work holds the chunks its workers
take, not the size it learnt."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

import feedline as fl
from feedline.runtime.iterator import State
from feedline.runtime.stage.core import Chunk
from feedline.runtime.stage.positions import plain_run_state, resume_state
from feedline.runtime.stage.sizing import MAX_THREAD_CHUNK
from tests.helpers import take


class Source:
    """An input whose state is never read when chunks are open."""

    def get_state(self) -> State:
        raise AssertionError("the input's state is read only when no chunk is open")


def plain_run(rng: random.Random) -> tuple[list[Chunk], int]:
    """Open chunks tiling [start, next_position), the oldest partly delivered."""
    at = start = rng.randrange(0, 1000)
    chunks = []
    for seq in range(rng.randrange(1, 12)):
        size = rng.randrange(1, 300)
        chunk = Chunk(seq, {"at": start}, at, at + size, range(at, at + size))
        chunk.outputs = list(range(size))
        chunks.append(chunk)
        at += size
    chunks[0].delivered = rng.randrange(0, len(chunks[0].outputs))
    return chunks, at


@pytest.mark.parametrize("seed", range(50))
def test_the_plain_run_state_is_the_general_state(seed: int) -> None:
    rng = random.Random(seed)
    chunks, next_position = plain_run(rng)
    expected = resume_state(chunks, next_position, [], None, Source())  # type: ignore[arg-type]
    assert plain_run_state(chunks[0]) == expected


def stage_named(it: fl.DatasetIterator, prefix: str) -> Any:
    return next(s for s in it._ctx.stages() if s.name.startswith(prefix))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parallelism", [1, 3, 8])
def test_a_running_stage_gives_the_general_state(parallelism: int) -> None:
    """The state a map gives at random moments, workers running, is what ``resume_state``
    computes from the same open chunks."""

    def uneven(x: Any) -> Any:
        time.sleep(0.001 * (int(x) % 3))
        return x

    ds = fl.Dataset.range(5_000).map(uneven, num_parallel_calls=parallelism)
    rng = random.Random(parallelism)
    with ds.iterator() as it:
        mapper = stage_named(it, "map")
        for _ in range(30):
            take(it, rng.randrange(1, 40))
            # This thread is the consumer: with the input lock held, no chunk is issued,
            # delivered or retired between the two readings.
            with mapper._input_lock:
                given = mapper.get_state()
                general = resume_state(
                    mapper._open.values(),
                    mapper._next_position,
                    mapper._skip,
                    mapper._replay,
                    mapper._input,
                )
            assert given == general


@pytest.mark.timeout(60)
def test_a_buffer_of_cheap_work_on_threads_holds_two_taken_chunks_a_worker() -> None:
    """Cheap work learns chunks of thousands, but threads take at most MAX_THREAD_CHUNK: the
    buffer is two of those a worker (it held 190k elements on 45 workers before)."""
    workers = 8
    ds = fl.Dataset.range(10**9).map(lambda x: x + 1, num_parallel_calls=workers).prefetch(1)
    options = fl.Options()
    options.autotune.enabled = False
    with ds.with_options(options).iterator() as it:
        mapper = stage_named(it, "map")
        highest = 0
        for _ in range(40):
            next(it)
            time.sleep(0.01)  # a slow consumer: the workers fill the buffer
            highest = max(highest, mapper._reserved)
        assert mapper.chunk_size > MAX_THREAD_CHUNK  # the work is cheap enough to matter
    assert highest <= 2 * workers * MAX_THREAD_CHUNK + MAX_THREAD_CHUNK
