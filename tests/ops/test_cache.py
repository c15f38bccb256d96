"""cache: memory and file caches replay only complete passes, and never return wrong data."""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.ops.cache import MAGIC
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
    ds = fl.Dataset.range(N).map(fn).cache(filename)
    # A file cache checks what it stores against the element spec, which feedline finds by
    # running fn on a few elements: found here, so that the counts below are the passes' own.
    assert ds.element_spec == fl.TensorSpec((), np.dtype(np.int64))
    fn.calls = 0
    return ds


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


def times_ten_unless_told(x: Any) -> Any:
    """x * 10, in a module a new process imports; raises where the environment says the
    input must not run (that process must read the cache file instead)."""
    if os.environ.get("FEEDLINE_TEST_INPUT_MUST_NOT_RUN"):
        raise AssertionError("the cache was not used")
    return x * 10


@pytest.mark.timeout(60)
def test_file_cache_is_reused_by_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    list(fl.Dataset.range(N).map(times_ten_unless_told).cache(path))
    script = textwrap.dedent(
        f"""
        import feedline as fl
        from tests.ops.test_cache import times_ten_unless_told
        ds = fl.Dataset.range({N}).map(times_ten_unless_told).cache({str(path)!r})
        print([int(x) for x in ds])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "FEEDLINE_TEST_INPUT_MUST_NOT_RUN": "1"},
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


# -- a cache file is data, from this pipeline ---------------------------------------------------

# The layout cache.py writes: MAGIC, records of (index u64, length u64, crc32 u32) + payload,
# an end record holding the metadata, the metadata's length, TRAILER_MAGIC.
RECORD = struct.Struct("<QQI")


def records_of(data: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of each record of a cache file's bytes."""
    out: list[tuple[int, int]] = []
    pos = len(MAGIC)
    while True:
        index, length, _ = RECORD.unpack_from(data, pos)
        if index == 2**64 - 1:
            return out
        out.append((pos, length))
        pos += RECORD.size + length


def with_payloads(
    data: bytes,
    payloads: dict[int, bytes],
    layout: Callable[[bytes], list[tuple[int, int]]] = records_of,
) -> bytes:
    """``data`` with the payloads of some records replaced, every checksum right; ``layout``
    finds the records (a cache file's by default)."""
    out, last = [], 0
    for index, (pos, length) in enumerate(layout(data)):
        if index in payloads:
            head = struct.pack("<QQ", index, len(payloads[index]))
            crc = zlib.crc32(payloads[index], zlib.crc32(head))
            out += [data[last:pos], head, struct.pack("<I", crc), payloads[index]]
            last = pos + RECORD.size + length
    return b"".join([*out, data[last:]])


class MakesMarker:
    """Unpickling it creates a directory: the sign that loading a file ran its code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def test_a_cache_file_is_never_run_as_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = pickle.dumps(MakesMarker(marker))
    # A file in the first format, whose records were pickles, with every checksum right.
    old = tmp_path / "old"
    old.write_bytes(
        b"FLCACHE\x01"
        + struct.pack("<II", len(payload), zlib.crc32(payload))
        + payload
        + struct.pack("<II", 0xFFFFFFFF, 1)
        + b"FLCACHE-END"
    )
    with pytest.raises(fl.CacheFileError, match="older feedline"):
        list(fl.Dataset.range(3).cache(old))
    # Today's format, the pickle in place of a record, every checksum right.
    new = tmp_path / "new"
    list(fl.Dataset.range(3).cache(new))
    new.write_bytes(with_payloads(new.read_bytes(), {1: payload}))
    got: list[Any] = []
    with pytest.raises(fl.CacheFileError, match="record 1: it has"):
        got.extend(fl.Dataset.range(3).cache(new))
    assert_elements_equal(got, [np.int64(0)])
    assert not marker.exists(), "reading a cache file ran code from it"


def test_cache_file_errors_are_data_loss_errors() -> None:
    assert issubclass(fl.CacheFileError, fl.DataLossError)


def test_errors_name_the_file_and_the_place(tmp_path: Path) -> None:
    path = written_cache(tmp_path)
    data = path.read_bytes()
    pos, length = records_of(data)[2]
    path.write_bytes(data[: pos + RECORD.size] + bytes(length) + data[pos + RECORD.size + length :])
    with pytest.raises(fl.CacheFileError) as caught:
        list(cached(Counted(), path))
    assert str(path) in str(caught.value)
    assert f"at byte {pos} (record 2 fails its checksum)" in str(caught.value)


Pair = collections.namedtuple("Pair", ["image", "meta"])


def rich(i: Any) -> Pair:
    """An element with leaves of many dtypes, strings, nested dicts and tuples, and sizes
    that vary."""
    n = int(i)
    return Pair(
        image=np.full((2 + n, 3, 3), n, dtype=np.uint8),
        meta={
            "half": np.arange(n, dtype=np.float16),
            "pair": (np.complex64(n + 1j), np.datetime64(n, "D")),
            "big_endian": np.arange(3, dtype=">i4"),
            "flag": np.bool_(n % 2),
            "zero_d": np.array(n / 2),
            "name": b"x" * n,
            "names": np.array([b"a", b"bb", b""][: n % 4], dtype=bytes),
            "empty": np.zeros((0, n), dtype=np.int16),
        },
    )


def test_elements_of_many_kinds_come_back_as_they_were(cache_file: str) -> None:
    source = fl.Dataset.range(5).map(rich)
    want = list(source)
    ds = source.cache(cache_file)
    list(ds)
    got = list(ds)
    assert_elements_equal(got, want)
    assert all(e.image.flags.aligned for e in got)


def test_a_file_another_pipeline_wrote_is_refused(tmp_path: Path) -> None:
    D = fl.Dataset
    cases = [
        (D.range(5), D.range(100).map(lambda x: x * 10), "its ops"),
        (D.range(5).map(lambda x: x * 10), D.range(5).map(lambda x: x * 20), "code"),
        (D.from_tensor_slices(np.arange(5)), D.from_tensor_slices(np.arange(5.0)), "elements"),
        (D.range(5).batch(2), D.range(5).batch(2).unbatch().batch(2), "its ops"),
    ]
    for i, (writer, reader, why) in enumerate(cases):
        path = tmp_path / str(i)
        list(writer.cache(path))
        written = path.read_bytes()
        with pytest.raises(fl.CacheFileError, match=f"not written by this pipeline.*{why}"):
            list(reader.cache(path))
        assert path.read_bytes() == written, "a file that is not ours must stay as it is"
        assert_elements_equal(list(writer.cache(path)), list(writer))


def test_what_cannot_be_stored_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="elements that are datasets"):
        list(fl.Dataset.range(4).window(2).cache(tmp_path / "windows"))
    objects = fl.Dataset.range(3).map(lambda x: {"x": x, "o": np.array([object()])})
    with pytest.raises(TypeError, match="cannot store element 0"):
        list(objects.cache(tmp_path / "objects"))
    assert list(tmp_path.iterdir()) == []


# -- restoring a pass gives what one uninterrupted pass would ---------------------------------


def shuffled(filename: str | Path) -> fl.Dataset:
    """Each pass over the shuffle is in another order: only the cache makes epochs agree."""
    return fl.Dataset.range(6).shuffle(6, seed=1).cache(filename).repeat(2)


@pytest.mark.parametrize("new_process", [False, True], ids=["same-dataset", "new-dataset"])
def test_a_restored_pass_matches_an_uninterrupted_one(
    cache_file: str, tmp_path: Path, new_process: bool
) -> None:
    """Cut in the first epoch (writing) or the second (reading), restored from JSON; a new
    dataset stands for a new process: its memory cache is empty."""
    want = list(shuffled(str(tmp_path / "reference") if cache_file else ""))
    assert_elements_equal(want[6:], want[:6])
    for cut in (0, 1, 3, 5, 6, 7, 9, 12):
        filename = f"{cache_file}-{cut}" if cache_file else ""
        ds = shuffled(filename)
        with ds.iterator() as it:
            got = take(it, cut)
            state = json.loads(json.dumps(it.get_state()))
        with (shuffled(filename) if new_process else ds).iterator(state) as resumed:
            got += list(resumed)
        try:
            assert_elements_equal(got, want)
        except AssertionError as e:
            raise AssertionError(f"restored after {cut} elements: {e}") from e


def test_a_restored_writer_publishes_the_cache(cache_file: str) -> None:
    fn = Counted()
    with cached(fn, cache_file).iterator() as it:
        take(it, 2)
        state = it.get_state()
    fresh = cached(fn, cache_file)
    with fresh.iterator(state) as resumed:
        assert_elements_equal(list(resumed), WANT[2:])
    calls = fn.calls
    assert_elements_equal(list(fresh), WANT)
    assert fn.calls == calls, "the restored pass did not publish its cache"


def cache_state(ds: fl.Dataset, cut: int) -> dict[str, Any]:
    with ds.iterator() as it:
        take(it, cut)
        state: dict[str, Any] = it.get_state()
    return state


BAD_STATES: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("not a dict", lambda root: [root]),
    ("no mode", lambda root: {k: v for k, v in root.items() if k != "mode"}),
    ("unknown mode", lambda root: {**root, "mode": "sideways"}),
    ("negative index", lambda root: {**root, "index": -1}),
    ("index past the end", lambda root: {**root, "index": N + 1}),
    ("index of a string", lambda root: {**root, "index": "2"}),
    ("index of a bool", lambda root: {**root, "index": True}),
    ("no index", lambda root: {k: v for k, v in root.items() if k != "index"}),
]


@pytest.mark.parametrize("stage", ["write", "read"])
@pytest.mark.parametrize("bad", [b for _, b in BAD_STATES], ids=[name for name, _ in BAD_STATES])
def test_bad_states_are_refused(
    cache_file: str, stage: str, bad: Callable[[dict[str, Any]], Any]
) -> None:
    ds = cached(Counted(), cache_file)
    if stage == "read":
        list(ds)
    state = cache_state(ds, 2)
    assert state["root"]["mode"] == stage
    state["root"] = bad(state["root"])
    with pytest.raises(fl.InvalidStateError):
        list(ds.iterator(state))


def test_bad_starts_are_refused(cache_file: str) -> None:
    ds = cached(Counted(), cache_file)
    for stage in ("write", "read"):
        if stage == "read":
            list(ds)
        state = cache_state(ds, 2)
        if "start" not in state["root"]:
            continue  # a file reader reads the file: it has no start
        for start in (None, 3, "x", [0]):
            state["root"]["start"] = start
            with pytest.raises(fl.InvalidStateError, match="start"):
                list(ds.iterator(state))


def test_reading_a_file_that_is_gone_cannot_resume(tmp_path: Path) -> None:
    path = written_cache(tmp_path)
    ds = cached(Counted(), path)
    state = cache_state(ds, 2)
    path.unlink()
    with pytest.raises(fl.CacheFileError, match="is gone"):
        list(ds.iterator(state))


def test_a_cached_pipeline_resumes_in_a_fresh_build() -> None:
    # What a restart does: the state of one process, the dataset built anew in another.
    def build() -> fl.Dataset:
        return fl.Dataset.range(10).map(lambda x: x * 2).cache().shuffle(4, seed=1).repeat(2)

    for cut in (0, 5, 10, 13, 20):
        with build().iterator() as it:
            before = [int(x) for _, x in zip(range(cut), it)]
            state = json.loads(json.dumps(it.get_state()))
            rest = [int(x) for x in it]
        with build().iterator(state) as resumed:
            assert [int(x) for x in resumed] == rest
        assert len(before + rest) == 20


def test_cached_arrays_are_read_only_so_no_epoch_changes_another() -> None:
    # Every epoch hands out the same cached arrays: a training loop writing into its batch
    # (an in-place normalisation) would otherwise change what the next epoch reads.
    ds = fl.Dataset.from_tensor_slices(np.arange(12.0).reshape(4, 3)).batch(2).cache()
    first = list(ds)
    for batch in first:
        assert not batch.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            batch /= 255.0
    again = list(ds)
    assert [b.tolist() for b in again] == [b.tolist() for b in first]
    assert again[0].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_cached_batches_become_torch_tensors_the_loop_may_write() -> None:
    torch = pytest.importorskip("torch")
    from feedline.torch import to_torch

    ds = fl.Dataset.from_tensor_slices(np.arange(6.0).reshape(3, 2)).batch(3).cache()
    for _ in range(2):
        (batch,) = list(to_torch(ds))
        assert batch.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
        batch.mul_(0)  # a copy: the cache keeps its values for the next epoch
        assert isinstance(batch, torch.Tensor)
