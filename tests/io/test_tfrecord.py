"""TFRecordDataset and TFRecordWriter: round trips, TensorFlow's files both ways, damage,
resumable states, parallel reads in tf.data's order, URLs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.io.crc32c import crc32c_numpy
from feedline.io.tfrecord import TFRecordDataset, TFRecordWriter
from tests.helpers import assert_state_rejected, assert_state_roundtrip, saved_state

pytestmark = pytest.mark.timeout(120)

COMPRESSIONS = ["", "GZIP", "ZLIB"]


def records(seed: int, n: int, max_size: int = 3000) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(int(rng.integers(0, max_size))) for _ in range(n)]


def write(path: Path | str, recs: list[bytes], compression: str = "") -> str:
    with TFRecordWriter(path, compression or None) as w:
        for r in recs:
            w.write(r)
    return str(path)


def tf_module() -> Any:
    return pytest.importorskip("tensorflow")


def tf_read(tf: Any, files: Any, compression: str = "", **kw: Any) -> list[bytes]:
    return [x.numpy() for x in tf.data.TFRecordDataset(files, compression, **kw)]


# -- against TensorFlow ---------------------------------------------------------------------


def test_uncompressed_file_is_byte_identical_to_tensorflows(tmp_path: Path) -> None:
    tf = tf_module()
    recs = [b"", b"x", *records(0, 40), b"\x00" * 70000]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for r in recs:
            w.write(r)
    write(tmp_path / "fl.tfrecord", recs)
    assert (tmp_path / "fl.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_tensorflow_files_read_identically(tmp_path: Path, compression: str) -> None:
    tf = tf_module()
    recs = records(1, 60)
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path, options=compression) as w:
        for r in recs:
            w.write(r)
    assert list(TFRecordDataset(path, compression)) == recs == tf_read(tf, path, compression)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_feedline_files_read_by_tensorflow(tmp_path: Path, compression: str) -> None:
    tf = tf_module()
    recs = records(2, 60)
    path = write(tmp_path / "fl.tfrecord", recs, compression)
    assert tf_read(tf, path, compression) == recs


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_flush_makes_written_records_readable(tmp_path: Path, compression: str) -> None:
    tf = tf_module()
    path = str(tmp_path / "f.tfrecord")
    writer = TFRecordWriter(path, compression)
    writer.write(b"first")
    writer.write("second")
    writer.flush()
    try:
        assert tf_read(tf, path, compression) == [b"first", b"second"]
        got: list[bytes] = []
        if compression:
            # A compressed stream with no end yet: its records, then data loss (TensorFlow
            # stops silently, which would hide records cut off after a flush point).
            with pytest.raises(fl.DataLossError, match="truncated at byte 43"):
                got.extend(TFRecordDataset(path, compression))
        else:
            got.extend(TFRecordDataset(path))
        assert got == [b"first", b"second"]
    finally:
        writer.close()
    assert tf_read(tf, path, compression) == [b"first", b"second"]


def interleaving_files(tmp_path: Path) -> list[str]:
    # Different lengths, so slots empty and refill at different points of the cycle.
    return [
        write(tmp_path / f"{i}.tfrecord", [f"{i}-{j}".encode() for j in range(n)])
        for i, n in enumerate([5, 1, 0, 7, 3, 4])
    ]


@pytest.mark.parametrize("reads", [1, 2, 3, 4, 8])
def test_num_parallel_reads_order_equals_tfs(tmp_path: Path, reads: int) -> None:
    tf = tf_module()
    files = interleaving_files(tmp_path)
    want = tf_read(tf, files, num_parallel_reads=reads)
    assert list(TFRecordDataset(files, num_parallel_reads=reads)) == want
    names = fl.Dataset.from_tensor_slices(files)
    assert list(TFRecordDataset(names, num_parallel_reads=reads)) == want


def test_dataset_of_names_reads_in_order_like_tfs_flat_map(tmp_path: Path) -> None:
    tf = tf_module()
    files = interleaving_files(tmp_path)
    want = tf_read(tf, tf.data.Dataset.from_tensor_slices(files))
    assert list(TFRecordDataset(fl.Dataset.from_tensor_slices(files))) == want
    assert list(TFRecordDataset(files)) == want


def test_autotune_reads_every_record_under_a_tuned_interleave(tmp_path: Path) -> None:
    files = interleaving_files(tmp_path)
    ds = TFRecordDataset(files, num_parallel_reads=fl.AUTOTUNE)
    assert ds._op.num_parallel_calls == fl.AUTOTUNE  # type: ignore[attr-defined]
    assert sorted(ds) == sorted(TFRecordDataset(files))


@pytest.mark.parametrize("n, i", [(2, 0), (3, 1), (4, 3)])
def test_shard_keeps_tfs_meaning(tmp_path: Path, n: int, i: int) -> None:
    tf = tf_module()
    files = interleaving_files(tmp_path)
    want = [x.numpy() for x in tf.data.TFRecordDataset(files).shard(n, i)]
    assert list(TFRecordDataset(files).shard(n, i)) == want


# -- without TensorFlow ---------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("buffer_size", [None, 0, 1, 100])
def test_round_trip(tmp_path: Path, compression: str, buffer_size: int | None) -> None:
    recs = [*records(3, 30), b"", b"y" * 300_000]
    path = write(tmp_path / "f", recs, compression)
    ds = TFRecordDataset([path, path], compression, buffer_size)
    assert ds.element_spec == fl.TensorSpec((), np.dtype(object))
    assert list(ds) == recs + recs


def test_empty_files_and_lists(tmp_path: Path) -> None:
    empty = str(tmp_path / "empty")
    Path(empty).write_bytes(b"")
    assert list(TFRecordDataset(empty)) == []
    assert list(TFRecordDataset(empty, "GZIP")) == []
    assert list(TFRecordDataset([])) == []
    assert list(TFRecordDataset(write(tmp_path / "z", [], "ZLIB"), "ZLIB")) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression_type"):
        TFRecordDataset("x", "BZIP2")
    with pytest.raises(ValueError, match="num_parallel_reads"):
        TFRecordDataset("x", num_parallel_reads=0)
    with pytest.raises(TypeError, match="buffer_size"):
        TFRecordDataset("x", buffer_size=1.5)  # type: ignore[arg-type]
    writer = TFRecordWriter(tmp_path / "w")
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"late")


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.tfrecord")
    with pytest.raises(FileNotFoundError, match=r"nope\.tfrecord"):
        list(TFRecordDataset(missing))


def test_url_round_trip_in_memory() -> None:
    pytest.importorskip("fsspec")
    recs = records(4, 20)
    for compression in COMPRESSIONS:
        url = f"memory://feedline-tfrecord/{compression or 'plain'}.tfrecord"
        write(url, recs, compression)
        ds = TFRecordDataset([url], compression)
        assert list(ds) == recs
        assert_state_roundtrip(ds, cut_points=(1, 5, 19))


def test_http_server(http_server: Any) -> None:
    recs = records(5, 30)
    write(Path(http_server.root) / "a.tfrecord", recs)
    ds = TFRecordDataset(http_server.url + "a.tfrecord")
    assert list(ds) == recs
    assert_state_roundtrip(ds, cut_points=(3,))


def test_s3_server(s3_server: Any, tmp_path: Path) -> None:
    recs = records(6, 30)
    s3_server.put("a.tfrecord.gz", Path(write(tmp_path / "a", recs, "GZIP")).read_bytes())
    ds = TFRecordDataset(s3_server.bucket_url + "a.tfrecord.gz", "GZIP")
    assert list(ds) == recs
    assert_state_roundtrip(ds, cut_points=(3,))


# -- damage ---------------------------------------------------------------------------------


def offsets(recs: list[bytes]) -> list[int]:
    """Where each record starts in an uncompressed file."""
    return [int(x) for x in np.cumsum([0] + [16 + len(r) for r in recs])[:-1]]


@pytest.mark.parametrize(
    "where, problem",
    [(0, "length"), (9, "length"), (12, "data"), (-1, "data")],
    ids=["length", "length-crc", "data", "data-crc"],
)
def test_a_flipped_byte_is_data_loss_after_the_records_before_it(
    tmp_path: Path, where: int, problem: str
) -> None:
    recs = [b"a" * 100, b"b" * 100, b"c" * 100, b"d" * 100]
    path = Path(write(tmp_path / "f", recs))
    start = offsets(recs)[2]
    data = bytearray(path.read_bytes())
    data[start + where if where >= 0 else start + 16 + 100 + where] ^= 0x10
    path.write_bytes(bytes(data))
    it = iter(TFRecordDataset(str(path)))
    assert [next(it), next(it)] == recs[:2]
    with pytest.raises(fl.DataLossError, match=f"{path}.*{problem}.* at byte {start}"):
        next(it)


def test_truncated_files_are_data_loss(tmp_path: Path) -> None:
    recs = [b"a" * 100, b"b" * 100]
    full = Path(write(tmp_path / "f", recs)).read_bytes()
    for cut, problem in [(116 + 5, "truncated record header"), (116 + 50, "truncated record")]:
        path = tmp_path / f"cut{cut}"
        path.write_bytes(full[:cut])
        got: list[bytes] = []
        with pytest.raises(fl.DataLossError, match=f"{problem}.* at byte 116"):
            for r in TFRecordDataset(str(path)):
                got.append(r)
        assert got == recs[:1]
    gz = Path(write(tmp_path / "g", recs * 50, "GZIP")).read_bytes()
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(fl.DataLossError, match=r"cut\.gz.*truncated"):
        list(TFRecordDataset(str(tmp_path / "cut.gz"), "GZIP"))
    (tmp_path / "bad.gz").write_bytes(gz[:10] + b"\xff" * 20 + gz[30:])
    with pytest.raises(fl.DataLossError, match=r"bad\.gz.*damaged"):
        list(TFRecordDataset(str(tmp_path / "bad.gz"), "GZIP"))


def test_ignore_errors_goes_on_with_the_next_file_as_tf_does(tmp_path: Path) -> None:
    tf = tf_module()
    recs = [b"a" * 10, b"b" * 10, b"c" * 10]
    bad = Path(write(tmp_path / "bad", recs))
    data = bytearray(bad.read_bytes())
    data[offsets(recs)[1] + 14] ^= 1
    bad.write_bytes(bytes(data))
    good = write(tmp_path / "good", [b"z"])
    files = [str(bad), good]
    want = [x.numpy() for x in tf.data.TFRecordDataset(files).ignore_errors()]
    assert want == [b"a" * 10, b"z"]
    assert list(TFRecordDataset(files).ignore_errors()) == want


# -- resumable state ------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_state_round_trip_mid_file(tmp_path: Path, compression: str) -> None:
    files = [write(tmp_path / f"{i}", records(10 + i, 25), compression) for i in range(3)]
    # A small buffer, so that states fall inside and across its refills.
    ds = TFRecordDataset(files, compression, buffer_size=2000)
    assert_state_roundtrip(ds, cut_points=(0, 1, 7, 24, 25, 26, 60))


def test_records_handed_out_from_the_readers_block_are_counted_and_end_at_close(
    tmp_path: Path,
) -> None:
    # The pass takes a reader's checked records from its block without calling it: each is
    # still counted, a state still resumes after it, and a closed pass gives none left.
    recs = records(3, 60, max_size=200)
    path = write(tmp_path / "f", recs)
    it = TFRecordDataset(path).iterator()
    assert [next(it) for _ in range(21)] == recs[:21]
    assert it.stats()["consumer"]["elements"] == 21
    with TFRecordDataset(path).iterator(it.get_state()) as resumed:
        assert list(resumed) == recs[21:]
    it.close()
    assert list(it) == []


@pytest.mark.parametrize("reads", [2, fl.AUTOTUNE])
def test_state_round_trip_parallel_reads(tmp_path: Path, reads: int) -> None:
    files = [write(tmp_path / f"{i}", records(20 + i, 9 + i), "GZIP") for i in range(4)]
    assert_state_roundtrip(
        TFRecordDataset(files, "GZIP", num_parallel_reads=reads), cut_points=(1, 5, 17)
    )


def test_a_compressed_restore_skips_forward_without_reading_the_whole_file(
    tmp_path: Path,
) -> None:
    recs = records(30, 400, max_size=2000)
    path = write(tmp_path / "big.gz", recs, "GZIP")
    ds = TFRecordDataset(path, "GZIP", buffer_size=4096)
    state = saved_state(ds, 300)
    assert state["root"]["offset"] == offsets(recs)[300]
    with ds.iterator(state) as it:
        reader = it._root.reader  # type: ignore[attr-defined]
        # Resumed from a record inside the stream, holding one block, not the file.
        assert reader.capacity == 4096 and reader.end - reader.start <= 4096
        assert list(it) == recs[300:]


@pytest.mark.parametrize("size", [100, 40_000, 300_000])
def test_reading_holds_about_a_buffer_not_the_file(tmp_path: Path, size: int) -> None:
    recs = [bytes([i]) * size for i in range(30)]
    path = write(tmp_path / "f", recs)
    with TFRecordDataset(path, buffer_size=64 * 1024).iterator() as it:
        for want in recs:
            assert next(it) == want
            held = sum(map(len, it._root.ready))  # type: ignore[attr-defined]
            assert held <= max(64 * 1024, size)


def test_crafted_states_are_rejected(tmp_path: Path) -> None:
    recs = [b"a" * 100, b"b" * 100, b"c" * 100]
    for compression in COMPRESSIONS:
        path = write(tmp_path / f"f{compression}", recs, compression)
        ds = TFRecordDataset([path, path], compression)
        state = saved_state(ds, 1)
        for field, value in [("offset", 117), ("offset", 10_000), ("offset", -1), ("file", 3)]:
            crafted = {**state, "root": {**state["root"], field: value}}
            assert_state_rejected(ds, crafted, field)
        crafted = {**state, "root": {"file": 2, "offset": 116}}
        assert_state_rejected(ds, crafted, "offset")
        assert_state_rejected(ds, {**state, "root": {"file": "0", "offset": 0}}, "file")
        assert_state_rejected(ds, {**state, "root": {"file": 0}}, "offset")


# -- CRC32C ---------------------------------------------------------------------------------


def test_numpy_crc32c_equals_google_crc32c() -> None:
    google = pytest.importorskip("google_crc32c")
    rng = np.random.default_rng(7)
    sizes = [*range(0, 70), 100, 1000, 1023, 4096, 5000, 65537, 100 * 1024]
    for size in sizes:
        data = rng.bytes(size)
        assert crc32c_numpy(data) == google.value(data), size
    assert crc32c_numpy(b"123456789") == 0xE3069283  # the CRC32C check value


def test_without_google_crc32c_reading_warns_once_and_still_checks(tmp_path: Path) -> None:
    recs = records(8, 20)
    path = write(tmp_path / "f", recs)
    bad = tmp_path / "bad"
    data = bytearray(Path(path).read_bytes())
    data[offsets(recs)[3] + 13] ^= 1
    bad.write_bytes(bytes(data))
    script = f"""
import sys, warnings
sys.modules["google_crc32c"] = None  # as if the extra were not installed
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from feedline.io.tfrecord import TFRecordDataset
    assert len(list(TFRecordDataset({path!r}))) == 20
    assert len(list(TFRecordDataset({path!r}))) == 20
    try:
        list(TFRecordDataset({str(bad)!r}))
    except Exception as e:
        print(type(e).__name__)
print(sum("feedline[tfrecord]" in str(w.message) for w in caught))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=100
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DataLossError", "1"]


def test_public_names() -> None:
    assert fl.TFRecordDataset is TFRecordDataset
    assert fl.io.TFRecordDataset is TFRecordDataset
    assert fl.io.TFRecordWriter is TFRecordWriter
    for name in ["FixedLenFeature", "VarLenFeature", "parse_example", "parse_single_example"]:
        assert callable(getattr(fl.io, name))
    assert callable(fl.io.encode_example)
