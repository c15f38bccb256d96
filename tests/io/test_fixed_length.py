"""FixedLengthRecordDataset: records, headers and footers, compression, parallel reads,
states (the shared round trip and crafted states), and damaged files. tf.data's own outputs
on the same files are compared in tests/conformance/test_ported_api.py."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest

import feedline as fl
from feedline.errors import DataLossError
from tests.helpers import assert_state_rejected, assert_state_roundtrip, saved_state

COMPRESS = {"": lambda b: b, "GZIP": gzip.compress, "ZLIB": zlib.compress}


def _records(first: int, count: int, size: int = 4) -> list[bytes]:
    return [bytes((first + i + j) % 256 for j in range(size)) for i in range(count)]


def _write(path: Path, records: list[bytes], compression: str = "") -> str:
    path.write_bytes(COMPRESS[compression](b"HEAD" + b"".join(records) + b"FT"))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[str, list[bytes]]]:
    out = []
    for i, count in enumerate((5, 0, 3)):
        records = _records(10 * i, count)
        out.append((_write(tmp_path / f"f{i}.bin", records), records))
    return out


def _dataset(paths: list[str], **kwargs: object) -> fl.Dataset:
    return fl.FixedLengthRecordDataset(paths, 4, header_bytes=4, footer_bytes=2, **kwargs)


def test_records_of_files_one_after_another(files: list[tuple[str, list[bytes]]]) -> None:
    ds = _dataset([p for p, _ in files])
    assert list(ds) == [r for _, records in files for r in records]
    assert ds.element_spec == fl.TensorSpec((), np.dtype(object))
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY
    assert fl.io.FixedLengthRecordDataset is fl.FixedLengthRecordDataset


def test_no_header_or_footer_and_one_path(tmp_path: Path) -> None:
    path = tmp_path / "plain.bin"
    path.write_bytes(bytes(range(12)))
    assert list(fl.FixedLengthRecordDataset(path, 3)) == [
        bytes(range(i, i + 3)) for i in (0, 3, 6, 9)
    ]


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB"])
def test_compressed_files(tmp_path: Path, compression: str) -> None:
    records = _records(0, 40)
    path = _write(tmp_path / "c.bin", records, compression)
    # A small buffer makes records and the footer straddle the pieces read.
    ds = _dataset([path], compression_type=compression, buffer_size=7)
    assert list(ds) == records
    assert_state_roundtrip(ds, cut_points=(0, 1, 13, 39))


def test_parallel_reads_interleave_a_record_from_each(files: list[tuple[str, list[bytes]]]) -> None:
    paths = [p for p, _ in files]
    got = list(_dataset(paths, num_parallel_reads=2))
    first, _, third = (records for _, records in files)
    assert sorted(got) == sorted(first + third)  # the order: tf.data's, in conformance
    from_dataset = _dataset(fl.Dataset.from_tensor_slices(paths), num_parallel_reads=2)  # type: ignore[arg-type]
    assert list(from_dataset) == got


def test_state_round_trip_mid_file_and_across_files(files: list[tuple[str, list[bytes]]]) -> None:
    paths = [p for p, _ in files]
    assert_state_roundtrip(_dataset(paths), cut_points=(0, 1, 4, 5, 6, 8))
    assert_state_roundtrip(_dataset(paths, num_parallel_reads=2), cut_points=(0, 1, 3, 5))


def test_a_restore_seeks_to_the_record(files: list[tuple[str, list[bytes]]]) -> None:
    paths = [p for p, _ in files]
    state = saved_state(_dataset(paths), 3)
    assert state["root"] == {"file": 0, "record": 3}
    with _dataset(paths).iterator(state) as it:
        assert next(it) == files[0][1][3]


def test_crafted_states_are_refused(files: list[tuple[str, list[bytes]]]) -> None:
    paths = [p for p, _ in files]
    ds = _dataset(paths)
    good = saved_state(ds, 2)
    for field, value in (("file", 7), ("file", -1), ("record", 6), ("record", "2")):
        state = {**good, "root": {**good["root"], field: value}}
        assert_state_rejected(ds, state, field)
    past_end = {**good, "root": {"file": 3, "record": 1}}
    assert_state_rejected(ds, past_end, "record")
    gz = _dataset(
        [_write(Path(paths[0]).with_suffix(".gz"), _records(0, 2), "GZIP")], compression_type="GZIP"
    )
    assert_state_rejected(gz, {**good, "root": {"file": 0, "record": 3}}, "record")


def test_a_body_that_is_not_whole_records_is_data_loss(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"HEAD" + bytes(9) + b"FT")
    # Uncompressed: refused before any record, as tf.data does.
    with pytest.raises(DataLossError, match="body of 9 bytes"):
        list(_dataset([str(bad)]))
    # Compressed: the whole records come first, then the error.
    gz = tmp_path / "bad.gz"
    gz.write_bytes(gzip.compress(b"HEAD" + bytes(9) + b"FT"))
    got = []
    with pytest.raises(DataLossError, match="body of 9 bytes"):
        for record in _dataset([str(gz)], compression_type="GZIP"):
            got.append(record)
    assert got == [bytes(4), bytes(4)]


def test_a_file_that_is_not_its_compression_is_data_loss(tmp_path: Path) -> None:
    path = _write(tmp_path / "plain.bin", _records(0, 3))
    with pytest.raises(DataLossError, match="not valid GZIP"):
        list(_dataset([path], compression_type="GZIP"))


def test_bad_arguments_fail_at_build(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="record_bytes must be >= 1"):
        fl.FixedLengthRecordDataset("x", 0)
    with pytest.raises(ValueError, match="compression_type"):
        fl.FixedLengthRecordDataset("x", 4, compression_type="BZ2")
    with pytest.raises(ValueError, match="header_bytes"):
        fl.FixedLengthRecordDataset("x", 4, header_bytes=-1)


@pytest.mark.timeout(60)
def test_reads_urls(http_server: object, tmp_path: Path) -> None:
    root = http_server.root  # type: ignore[attr-defined]
    records = _records(3, 6)
    _write(root / "r.bin", records)
    ds = _dataset([f"{http_server.url}/r.bin"])  # type: ignore[attr-defined]
    assert list(ds) == records
    assert_state_roundtrip(ds, cut_points=(0, 2, 5))
