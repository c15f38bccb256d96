"""cache: memory and file caches replay only complete passes, and never return wrong data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, assert_state_roundtrip, take

pytestmark = pytest.mark.timeout(60)

N = 6
WANT = [np.int64(10 * i) for i in range(N)]


class Counted:
    """A map function that counts its calls, so a test sees whether the input was re-run."""

    def __init__(self, fail_once_at: int | None = None) -> None:
        self.calls = 0
        self.fail_once_at = fail_once_at

    def __call__(self, x: Any) -> Any:
        self.calls += 1
        if x == self.fail_once_at:
            self.fail_once_at = None
            raise RuntimeError("flaky decode")
        return x * 10


def cached(fn: Counted, filename: str | Path = "") -> fl.Dataset:
    return fl.Dataset.range(N).map(fn).cache(filename)


@pytest.fixture(params=["memory", "file"])
def cache_file(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """ "" for the memory cache, or a path in a fresh directory for the file cache."""
    return "" if request.param == "memory" else str(tmp_path / "cache")


def test_second_pass_reads_the_cache(cache_file: str) -> None:
    fn = Counted()
    ds = cached(fn, cache_file)
    assert_elements_equal(list(ds), WANT)
    assert fn.calls == N
    for _ in range(2):
        assert_elements_equal(list(ds), WANT)
    assert fn.calls == N
    assert_elements_equal(list(ds.repeat(2)), WANT * 2)
    assert fn.calls == N


def test_repeat_caches_the_first_epoch(cache_file: str) -> None:
    fn = Counted()
    assert_elements_equal(list(cached(fn, cache_file).repeat(3)), WANT * 3)
    assert fn.calls == N


def partial_by_take(ds: fl.Dataset) -> None:
    assert len(list(ds.take(N - 1))) == N - 1


def partial_by_break(ds: fl.Dataset) -> None:
    with ds.iterator() as it:
        take(it, 2)


def partial_by_error(ds: fl.Dataset) -> None:
    # The consumer goes on past the failed element, to the end of the pass.
    got = []
    with ds.iterator() as it:
        while True:
            try:
                got.append(next(it))
            except fl.StageError:
                continue
            except StopIteration:
                break
    assert len(got) == N - 1


@pytest.mark.parametrize("partial", [partial_by_take, partial_by_break, partial_by_error])
def test_a_partial_pass_publishes_nothing(
    cache_file: str, tmp_path: Path, partial: Callable[[fl.Dataset], None]
) -> None:
    fn = Counted(fail_once_at=3 if partial is partial_by_error else None)
    ds = cached(fn, cache_file)
    partial(ds)
    if cache_file:
        assert list(tmp_path.iterdir()) == [], "partial pass left a file behind"
    first_calls = fn.calls
    assert_elements_equal(list(ds), WANT)
    assert fn.calls == first_calls + N, "the full pass must run the input again"
    assert_elements_equal(list(ds), WANT)
    assert fn.calls == first_calls + N


def test_a_full_pass_leaves_only_the_cache_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "data.cache"
    list(cached(Counted(), path))
    assert [p.name for p in path.parent.iterdir()] == ["data.cache"]


@pytest.mark.timeout(60)
def test_file_cache_is_reused_by_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    list(cached(Counted(), path))
    # The new process's pipeline would fail if it ran: it must read the file instead.
    script = textwrap.dedent(
        f"""
        import feedline as fl
        def boom(x):
            raise AssertionError("the cache was not used")
        ds = fl.Dataset.range({N}).map(boom).cache({str(path)!r})
        print([int(x) for x in ds])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == str([int(x) for x in WANT])


def written_cache(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    list(cached(Counted(), path))
    return path


def assert_refused(path: Path) -> None:
    """Reading ``path`` raises CacheFileError; whatever came before the error is correct."""
    got: list[Any] = []
    with pytest.raises(fl.CacheFileError, match="corrupt or truncated"):
        for x in fl.Dataset.range(N).map(Counted()).cache(str(path)):
            got.append(x)
    assert_elements_equal(got, WANT[: len(got)])


@pytest.mark.parametrize("mask", [0xFF, 0x04], ids=["invert", "one-bit"])
def test_every_flipped_byte_is_detected(tmp_path: Path, mask: int) -> None:
    # One bit (0x04) also turns the trailer's record count into a smaller one.
    path = written_cache(tmp_path)
    data = path.read_bytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(len(data)):
            os.pwrite(fd, bytes([data[i] ^ mask]), i)
            try:
                assert_refused(path)
            except BaseException as e:
                raise AssertionError(f"flipping byte {i} of {len(data)} went unnoticed") from e
            os.pwrite(fd, data[i : i + 1], i)
    finally:
        os.close(fd)


def test_every_truncation_is_detected(tmp_path: Path) -> None:
    path = written_cache(tmp_path)
    size = path.stat().st_size
    for cut in range(size - 1, -1, -1):
        os.truncate(path, cut)
        try:
            assert_refused(path)
        except BaseException as e:
            raise AssertionError(f"truncating to {cut} of {size} bytes went unnoticed") from e


def test_elements_keep_their_types(tmp_path: Path) -> None:
    source = fl.Dataset.from_tensor_slices(
        {"img": np.arange(12, dtype=np.uint8).reshape(3, 4), "label": ["a", "b", "c"]}
    ).map(lambda e: (e["img"].astype(np.float32), e["label"]))
    want = list(source)
    for filename in ("", tmp_path / "typed"):
        ds = source.cache(filename)
        assert ds.element_spec == source.element_spec
        assert ds.cardinality() == 3
        list(ds)
        assert_elements_equal(list(ds), want)


def test_state_roundtrip_reading(cache_file: str) -> None:
    ds = cached(Counted(), cache_file)
    list(ds)
    assert_state_roundtrip(ds)
    assert_state_roundtrip(ds.repeat(3), cut_points=(0, 5, 6, 7, 13))


def test_state_roundtrip_writing(cache_file: str, tmp_path: Path) -> None:
    # take() stops before the end, so no pass ever completes and every pass writes.
    fn = Counted()
    ds = cached(fn, cache_file).take(N - 1)
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 4))
    if cache_file:
        assert list(tmp_path.iterdir()) == []
    assert_elements_equal(list(cached(Counted(), cache_file)), WANT)


def test_a_writing_state_resumes_after_the_cache_was_published(cache_file: str) -> None:
    fn = Counted()
    ds = cached(fn, cache_file)
    with ds.iterator() as it:
        take(it, 2)
        state = it.get_state()
        rest = list(it)
    with ds.iterator(state) as resumed:
        assert_elements_equal(list(resumed), rest)
