"""num_parallel_reads for ParquetDataset and TarShardDataset: tf.data's interleave order (checked
against TensorFlow), exact resume, damage after the elements before it, ignore_errors(),
sharding, projection, streaming, URLs, and AUTOTUNE's decisions in the tuner's history."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_state_roundtrip, saved_state
from tests.io.conftest import HttpServer
from tests.io.test_parquet import damage_column
from tests.io.test_tar import samples, write_shard

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.timeout(120)

ERR = object()  # where a file's damage comes in its sequence of element ids
# Files of unequal lengths, an empty one among them: slots empty and refill at different
# points of the cycle. File k holds the ids 100 k, 100 k + 1, ...
LENGTHS = [5, 1, 0, 7, 3, 4]
READS = [1, 2, 3, 4]


# -- the two readers, as one interface ----------------------------------------------------------


def write_parquet(path: Path, start: int, n: int) -> str:
    table = pa.table(
        {"x": np.arange(start, start + n, dtype=np.int64), "y": np.arange(n, dtype=np.float64)}
    )
    # Row groups of two rows (of 100 in long files: a read that comes in bursts), pages with
    # checksums (damage_column needs them to be seen).
    pq.write_table(
        table,
        str(path),
        row_group_size=2 if n < 100 else 100,
        compression="NONE",
        use_dictionary=False,
        write_page_checksum=True,
    )
    return str(path)


def damage_parquet(path: str, start: int) -> tuple[list[Any], str]:
    """Row group 1 (rows 2 and 3) damaged: the file's ids with the error in their place."""
    damage_column(path, group=1, column=1)
    return [start, start + 1, ERR, start + 4, start + 5], rf"{Path(path).name}: row group 1"


def damage_tar(path: str, start: int) -> tuple[list[Any], str]:
    """Sample 3's header damaged: the sample being read (2) goes with it, and the shard ends."""
    offset = saved_state(fl.io.TarShardDataset(path), 3)["root"]["offset"]
    raw = bytearray(Path(path).read_bytes())
    raw[offset + 10] ^= 0xFF
    Path(path).write_bytes(bytes(raw))
    return [start, start + 1, ERR], rf"{Path(path).name}: at byte {offset}\b"


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    write: Callable[[Path, int, int], str]  # a file of the elements start, start + 1, ...
    read: Callable[..., fl.Dataset]
    ident: Callable[[Any], int]  # an element's id
    damage: Callable[[str, int], tuple[list[Any], str]]  # of a file of 6 elements


PARQUET = Format(
    "parquet",
    ".parquet",
    write_parquet,
    fl.io.ParquetDataset,
    lambda row: int(row["x"]),
    damage_parquet,
)
TAR = Format(
    "tar",
    ".tar",
    lambda path, start, n: write_shard(path, samples(n, start)),
    fl.io.TarShardDataset,
    lambda sample: int(sample["__key__"][2:]),
    damage_tar,
)
FORMATS = [pytest.param(PARQUET, id="parquet"), pytest.param(TAR, id="tar")]


def make_files(fmt: Format, directory: Path, lengths: list[int]) -> list[str]:
    return [fmt.write(directory / f"{k}{fmt.suffix}", 100 * k, n) for k, n in enumerate(lengths)]


def file_ids(lengths: list[int]) -> list[list[Any]]:
    return [list(range(100 * k, 100 * k + n)) for k, n in enumerate(lengths)]


def ids(fmt: Format, ds: fl.Dataset) -> list[int]:
    with ds.iterator() as it:
        return [fmt.ident(e) for e in it]


def interleave_order(files: list[list[Any]], n: int) -> list[Any]:
    """tf.data's ``interleave(cycle_length=n, block_length=1)`` of these sequences, in plain
    Python: an exhausted slot is refilled in place when the cycle comes back to it, and an
    error (``ERR``) is no turn: the next call reads the same slot again."""
    inputs = iter(files)
    slots: list[Iterator[Any] | None] = [None] * n
    out: list[Any] = []
    i, input_done = 0, False
    while True:
        slot = slots[i]
        if slot is not None:
            x = next(slot, None)
            if x is None:
                slots[i] = None
            else:
                out.append(x)
                if x is ERR:
                    continue
            i = (i + 1) % n
        elif not input_done:
            opened = next(inputs, None)
            input_done = opened is None
            slots[i] = None if opened is None else iter(opened)
        elif any(s is not None for s in slots):
            i = (i + 1) % n
        else:
            return out


def until_error(order: list[Any]) -> list[Any]:
    return order[: order.index(ERR)] if ERR in order else order


# -- order ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", READS)
def test_the_reference_order_is_tf_datas(n: int) -> None:
    tf = pytest.importorskip("tensorflow")
    starts = tf.constant([100 * k for k in range(len(LENGTHS))], tf.int64)
    lengths = tf.constant(LENGTHS, tf.int64)
    files = tf.data.Dataset.range(len(LENGTHS))
    got = files.interleave(
        lambda k: tf.data.Dataset.range(starts[k], starts[k] + lengths[k]),
        cycle_length=n,
        block_length=1,
        num_parallel_calls=n,
    )
    assert [int(x) for x in got] == interleave_order(file_ids(LENGTHS), n)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", READS)
def test_order_equals_the_interleave_of_single_file_readers(
    tmp_path: Path, fmt: Format, n: int
) -> None:
    paths = make_files(fmt, tmp_path, LENGTHS)
    names = fl.Dataset.from_tensor_slices(paths)
    by_hand = names.interleave(
        lambda f: fmt.read(f), cycle_length=n, block_length=1, num_parallel_calls=n
    )
    want = interleave_order(file_ids(LENGTHS), n)
    assert ids(fmt, by_hand) == want
    assert ids(fmt, fmt.read(paths, num_parallel_reads=n)) == want
    assert ids(fmt, fmt.read(names, num_parallel_reads=n)) == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_autotune_is_a_tuned_interleave_in_its_order(tmp_path: Path, fmt: Format) -> None:
    paths = make_files(fmt, tmp_path, LENGTHS)
    names = fl.Dataset.from_tensor_slices(paths)
    ds = fmt.read(paths, num_parallel_reads=fl.AUTOTUNE)
    assert ds._op.num_parallel_calls == fl.AUTOTUNE  # type: ignore[attr-defined]
    want = ids(fmt, names.interleave(lambda f: fmt.read(f), num_parallel_calls=fl.AUTOTUNE))
    assert sorted(want) == sorted(x for f in file_ids(LENGTHS) for x in f)
    assert ids(fmt, ds) == want
    assert ids(fmt, fmt.read(names, num_parallel_reads=fl.AUTOTUNE)) == want


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_a_bad_num_parallel_reads_fails_at_build(
    tmp_path: Path, fmt: Format, value: Any, error: type[Exception]
) -> None:
    paths = make_files(fmt, tmp_path, [2])
    with pytest.raises(error, match="num_parallel_reads"):
        fmt.read(paths, num_parallel_reads=value)
    with pytest.raises(error, match="num_parallel_reads"):
        fmt.read(fl.Dataset.from_tensor_slices(paths), num_parallel_reads=value)


# -- state -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("reads", [2, fl.AUTOTUNE])
def test_state_round_trip_mid_file(tmp_path: Path, fmt: Format, reads: int) -> None:
    paths = make_files(fmt, tmp_path, LENGTHS)
    ds = fmt.read(paths, num_parallel_reads=reads)
    assert_state_roundtrip(ds, cut_points=(0, 1, 3, 6, 9, 14, 19))
    assert_state_roundtrip(ds.batch(3), cut_points=(1, 4))


# -- damage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [2, 3])
def test_damage_comes_after_the_elements_before_it(tmp_path: Path, fmt: Format, n: int) -> None:
    lengths = [6, 6, 6, 6]
    paths = make_files(fmt, tmp_path, lengths)
    files = file_ids(lengths)
    files[1], message = fmt.damage(paths[1], 100)
    order = interleave_order(files, n)
    ds = fmt.read(paths, num_parallel_reads=n)
    got = []
    with pytest.raises(fl.io.DataLossError, match=message), ds.iterator() as it:
        for element in it:
            got.append(fmt.ident(element))
    # The other files' elements come, in order, up to the damage's turn; none after it.
    assert got == until_error(order)
    assert ids(fmt, ds.ignore_errors()) == [x for x in order if x is not ERR]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_file_names_it_and_ignore_errors_goes_on(tmp_path: Path, fmt: Format) -> None:
    lengths = [3, 4, 2]
    paths = make_files(fmt, tmp_path, lengths)
    Path(paths[1]).unlink()
    ds = fmt.read(paths, num_parallel_reads=2)
    with pytest.raises(FileNotFoundError, match=rf"1\{fmt.suffix}"):
        ids(fmt, ds)
    files = file_ids(lengths)
    files[1] = [ERR]
    assert ids(fmt, ds.ignore_errors()) == [x for x in interleave_order(files, 2) if x is not ERR]


# -- sharding and projection -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_dataset_shard_keeps_every_nth_element(tmp_path: Path, fmt: Format) -> None:
    paths = make_files(fmt, tmp_path, LENGTHS)
    ds = fmt.read(paths, num_parallel_reads=3)
    for n, i in [(2, 0), (3, 1), (4, 3)]:
        assert ids(fmt, ds.shard(n, i)) == ids(fmt, ds)[i::n]


@pytest.mark.parametrize("fmt", FORMATS)
def test_shard_keyword_reads_its_files_in_parallel(tmp_path: Path, fmt: Format) -> None:
    paths = make_files(fmt, tmp_path, LENGTHS)
    Path(paths[1]).write_bytes(b"damaged: never opened by shard 0 of 3")
    files = file_ids(LENGTHS)
    got = ids(fmt, fmt.read(paths, num_parallel_reads=2, shard=(3, 0)))
    assert got == interleave_order(files[0::3], 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_shard_splits_a_parallel_read_by_file(tmp_path: Path, fmt: Format) -> None:
    paths = make_files(fmt, tmp_path, LENGTHS)
    ds = fmt.read(paths, num_parallel_reads=2)
    parts = [ids(fmt, fl.distribute.auto_shard(ds, 2, i)) for i in range(2)]
    files = file_ids(LENGTHS)
    # Each rank reads every other file; "drop" cuts both to the smaller count (8 elements).
    assert parts == [interleave_order(files[i::2], 2)[:8] for i in range(2)]


def test_parquet_row_group_shards_read_in_parallel(tmp_path: Path) -> None:
    # Fewer files than shards: each reads every 4th row group, its pieces in parallel.
    paths = make_files(PARQUET, tmp_path, [7, 6])  # groups of 2 rows: 4 + 3 groups
    ds = fl.io.ParquetDataset(paths, num_parallel_reads=2, shard=(4, 1))
    # Shard 1 reads group 1 of the first file and groups 1 of the second (the 5th group).
    assert ids(PARQUET, ds) == [2, 102, 3, 103]
    assert_state_roundtrip(ds, cut_points=(1, 2, 3))


def test_parquet_projection_with_parallel_reads(tmp_path: Path) -> None:
    lengths = [6, 6, 6]
    paths = make_files(PARQUET, tmp_path, lengths)
    damage_column(paths[1], group=1, column=1)  # "y": never read when only "x" is asked for
    ds = fl.io.ParquetDataset(paths, columns=["x"], num_parallel_reads=2)
    assert ds.element_spec == {"x": fl.TensorSpec((), np.dtype(np.int64))}
    with ds.iterator() as it:
        rows = list(it)
    assert all(list(row) == ["x"] for row in rows)
    assert [int(r["x"]) for r in rows] == interleave_order(file_ids(lengths), 2)


# -- streaming, URLs and AUTOTUNE -------------------------------------------------------------


@pytest.fixture
def slow_memory() -> Iterator[Any]:
    """fsspec's in-memory filesystem under the protocol ``slowmem://``, each read waiting
    ``delay`` seconds (as an object store's round trips) and counting the bytes it returned."""
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    class SlowFile(MemoryFile):
        def read(self, size: int = -1) -> bytes:
            time.sleep(SlowMemory.delay)
            data: bytes = super().read(size)
            SlowMemory.bytes_read[self.path] = SlowMemory.bytes_read.get(self.path, 0) + len(data)
            return data

    class SlowMemory(MemoryFileSystem):
        protocol = "slowmem"
        delay = 0.0
        bytes_read: dict[str, int] = {}
        # Its own store, apart from memory:// (MemoryFileSystem keeps one per class).
        store: dict[str, Any] = {}
        pseudo_dirs = [""]

        def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
            opened = super()._open(path, mode, **kw)
            if "r" not in mode:
                return opened
            return SlowFile(self, self._strip_protocol(path), opened.getvalue())

    fsspec.register_implementation("slowmem", SlowMemory, clobber=True)
    try:
        yield SlowMemory
    finally:
        SlowMemory.store.clear()
        SlowMemory.bytes_read.clear()
        SlowMemory.clear_instance_cache()


def upload(directory: Path, names: list[str], prefix: str) -> list[str]:
    """The local files ``names`` copied to ``prefix`` (a URL ending in "/")."""
    import fsspec

    urls = []
    for name in names:
        url = prefix + Path(name).name
        with fsspec.open(url, "wb") as f:
            f.write(Path(name).read_bytes())
        urls.append(url)
    return urls


def test_parallel_reads_stream_a_row_group_at_a_time(tmp_path: Path, slow_memory: Any) -> None:
    # Three files of 20 row groups of 80 KB: taking the first rows of each reads its footer
    # and a row group or two (the read-ahead's), never the whole file.
    paths = []
    for k in range(3):
        table = pa.table({"x": np.arange(1_000_000 * k, 1_000_000 * k + 200_000, dtype=np.int64)})
        paths.append(str(tmp_path / f"{k}.parquet"))
        pq.write_table(table, paths[-1], row_group_size=10_000, compression="NONE")
    urls = upload(tmp_path, paths, "slowmem://stream/")
    ds = fl.io.ParquetDataset(urls, num_parallel_reads=3)
    with ds.iterator() as it:
        first = [int(next(it)["x"]) for _ in range(30)]
    assert first == [1_000_000 * k + i for i in range(10) for k in range(3)]
    for path, url in zip(paths, urls):
        size = Path(path).stat().st_size
        read = slow_memory.bytes_read[slow_memory._strip_protocol(url)]
        assert read < size / 4, f"{url}: {read} of {size} bytes read for its first rows"


@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_urls(tmp_path: Path, fmt: Format) -> None:
    fsspec = pytest.importorskip("fsspec")
    urls = upload(tmp_path, make_files(fmt, tmp_path, LENGTHS), "memory://feedline-parallel/")
    try:
        ds = fmt.read(urls, num_parallel_reads=2)
        assert ids(fmt, ds) == interleave_order(file_ids(LENGTHS), 2)
        assert_state_roundtrip(ds, cut_points=(2, 7))
    finally:
        fsspec.filesystem("memory").rm("/feedline-parallel", recursive=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_http_urls(tmp_path: Path, fmt: Format, http_server: HttpServer) -> None:
    for path in make_files(fmt, tmp_path, LENGTHS):
        (http_server.root / Path(path).name).write_bytes(Path(path).read_bytes())
    urls = [http_server.url + f"{k}{fmt.suffix}" for k in range(len(LENGTHS))]
    ds = fmt.read(urls, num_parallel_reads=3)
    assert ids(fmt, ds) == interleave_order(file_ids(LENGTHS), 3)
    assert_state_roundtrip(ds, cut_points=(4,))


@pytest.mark.parametrize("fmt", FORMATS)
def test_autotune_decisions_are_in_the_history(
    tmp_path: Path, fmt: Format, slow_memory: Any
) -> None:
    # Many small files, each read waiting 10 ms (an object store's round trips), before a
    # consumer with nothing else to do: reading more of the next files at once pays, and the
    # tuner raises how many. Only decisions are asserted, never speed.
    slow_memory.delay = 0.01
    lengths = [30] * 40
    urls = upload(tmp_path, make_files(fmt, tmp_path, lengths), "slowmem://tuned/")
    ds = fmt.read(urls, num_parallel_reads=fl.AUTOTUNE)
    with ds.iterator() as it:
        got = [fmt.ident(element) for element in it]
        history = it.stats()["autotune"]["history"]
    assert got == [x for f in file_ids(lengths) for x in f]  # one file at a time (2-core cycle)
    stage = "parquet" if fmt is PARQUET else "tar_shards"
    raised = [d for d in history if d["stage"] == stage and d["new"] > d["old"]]
    assert raised and "wait" in raised[0]["reason"], history
