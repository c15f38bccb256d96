"""The TFRecord reader's block walk (io/tfrecord_reader.py) against a record-by-record
reference and TensorFlow: random record sizes around the block's size, damage and cuts at
block edges, large records read where they lie, resuming among them."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.io import tfrecord_reader
from feedline.io.crc32c import masked_crc32c
from feedline.io.tfrecord import TFRecordDataset, TFRecordWriter
from tests.helpers import assert_state_roundtrip

pytestmark = pytest.mark.timeout(120)

BLOCK = 4096  # the buffer_size these tests read with: records land on every side of it


def sizes_around_the_block(rng: np.random.Generator, n: int) -> list[int]:
    """Record sizes from empty to several blocks, many near the block's size and near the
    direct-read threshold, where the walk hands over to the other paths."""
    picks = [0, 1, BLOCK - 16, BLOCK - 15, BLOCK, 32 * 1024 - 1, 32 * 1024, 3 * BLOCK + 5]
    return [
        int(rng.choice(picks)) if rng.random() < 0.3 else int(rng.integers(0, 2 * BLOCK))
        for _ in range(n)
    ]


def write(path: Path, recs: list[bytes], compression: str = "") -> str:
    with TFRecordWriter(path, compression or None) as w:
        for r in recs:
            w.write(r)
    return str(path)


def reference(data: bytes) -> tuple[list[bytes], str | None, int]:
    """Record by record, as the format says: the records before any damage, what the damage
    is (None: none) and where its record starts."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 12:
            return out, "truncated record header", pos
        length, length_crc = struct.unpack_from("<QI", data, pos)
        if masked_crc32c(data[pos : pos + 8]) != length_crc:
            return out, "corrupt record length", pos
        if len(data) - pos < 16 + length:
            return out, "truncated record", pos
        record = data[pos + 12 : pos + 12 + length]
        if masked_crc32c(record) != struct.unpack_from("<I", data, pos + 12 + length)[0]:
            return out, "corrupt record data", pos
        out.append(record)
        pos += 16 + length
    return out, None, pos


def read_all(path: str, compression: str = "", buffer_size: int = BLOCK) -> tuple[list[bytes], Any]:
    got: list[bytes] = []
    try:
        for record in TFRecordDataset(path, compression, buffer_size):
            got.append(record)
    except fl.DataLossError as error:
        return got, error
    return got, None


@pytest.mark.parametrize("compression", ["", "GZIP"])
@pytest.mark.parametrize("buffer_size", [0, 100, BLOCK, None])
def test_random_sizes_read_as_tensorflow_reads_them(
    tmp_path: Path, compression: str, buffer_size: int | None
) -> None:
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(len(compression) + (buffer_size or 7))
    recs = [rng.bytes(n) for n in sizes_around_the_block(rng, 60)]
    path = str(tmp_path / "f")
    with tf.io.TFRecordWriter(path, compression or None) as w:
        for r in recs:
            w.write(r)
    want = [x.numpy() for x in tf.data.TFRecordDataset(path, compression)]
    got = list(TFRecordDataset(path, compression, buffer_size))
    assert want == recs
    assert len(got) == len(want) and all(g == w for g, w in zip(got, want))
    assert all(type(g) is bytes for g in got)


@pytest.mark.parametrize("part", ["length", "length_crc", "data", "data_crc"])
def test_damage_anywhere_stops_where_the_reference_does(tmp_path: Path, part: str) -> None:
    """A flipped byte in each part of records placed on every side of the block's edges:
    exactly the records before it come out, then the error names the file and its offset."""
    rng = np.random.default_rng(["length", "length_crc", "data", "data_crc"].index(part))
    recs = [rng.bytes(n) for n in sizes_around_the_block(rng, 40)]
    clean = Path(write(tmp_path / "clean", recs)).read_bytes()
    starts = np.cumsum([0] + [16 + len(r) for r in recs])[:-1].tolist()
    for trial, victim in enumerate(rng.choice(len(recs), 12, replace=False).tolist()):
        size = len(recs[victim])
        if part == "data" and not size:
            continue  # no data bytes to flip
        where = {
            "length": int(rng.integers(0, 8)),
            "length_crc": 8 + int(rng.integers(0, 4)),
            "data": 12 + int(rng.integers(0, max(size, 1))),
            "data_crc": 12 + size + int(rng.integers(0, 4)),
        }[part]
        data = bytearray(clean)
        data[starts[victim] + where] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"bad{trial}"
        path.write_bytes(bytes(data))
        want, problem, offset = reference(bytes(data))
        assert problem is not None
        got, error = read_all(str(path))
        assert got == want, f"victim {victim}"
        assert error is not None and f"{path}: {problem}" in str(error)
        assert str(error).endswith(f"at byte {offset}")


def test_every_cut_of_a_file_is_truncation_after_the_records_before_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    recs = [rng.bytes(n) for n in [0, 40, 3, 200, 0, 70]]
    full = Path(write(tmp_path / "f", recs)).read_bytes()
    for cut in range(len(full)):
        path = tmp_path / "cut"
        path.write_bytes(full[:cut])
        want, problem, offset = reference(full[:cut])
        for buffer_size in (0, 17, 64, BLOCK):
            got, error = read_all(str(path), buffer_size=buffer_size)
            assert got == want, (cut, buffer_size)
            if problem is None:
                assert error is None
            else:
                assert problem in str(error) and str(error).endswith(f"at byte {offset}")


def test_large_records_are_read_where_they_lie(tmp_path: Path) -> None:
    """Records past the direct threshold come from the file into their own bytes; the block
    then holds only what follows one (not a block's worth of the next large record)."""
    rng = np.random.default_rng(6)
    recs = [rng.bytes(n) for n in [40_000, 10, 100_000, 100_000, 5, 33_000]]
    path = write(tmp_path / "f", recs)
    with TFRecordDataset(path, buffer_size=64 * 1024).iterator() as it:
        got = list(it)
    assert got == recs
    reader = tfrecord_reader.open_records(path, "", 64 * 1024)
    out: list[bytes] = []
    reader.read(out)
    assert out == recs[:2]  # in the first block read
    reader.read(out)
    assert out == recs[:3]
    assert reader.end - reader.start == 12  # after it, only the next record's header read
    reader.close()


def test_many_distinct_lengths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checked formats kept per length are bounded; reading goes on past the bound."""
    monkeypatch.setattr(tfrecord_reader, "_FORMATS_KEPT", 4)
    recs = [bytes([i % 256]) * i for i in range(300)]
    path = write(tmp_path / "f", recs)
    assert list(TFRecordDataset(path, buffer_size=2000)) == recs


@pytest.mark.parametrize("length", [2**40, 2**63 + 5])
def test_a_huge_length_is_checked_before_it_is_trusted(tmp_path: Path, length: int) -> None:
    """A length with a wrong CRC is damage; one with a right CRC but no data behind it is a
    truncated record: neither allocates or unpacks what it claims."""
    good = b"x" * 10
    head = struct.pack("<Q", length)
    tail = struct.pack("<I", masked_crc32c(good))
    for length_crc, problem in [(0, "corrupt record length"), (masked_crc32c(head), "truncated")]:
        path = tmp_path / f"huge{length_crc}"
        path.write_bytes(
            struct.pack("<QI", 10, masked_crc32c(struct.pack("<Q", 10)))
            + good
            + tail
            + head
            + struct.pack("<I", length_crc)
            + b"y" * 100
        )
        got, error = read_all(str(path))
        assert got == [good] and problem in str(error) and str(error).endswith("at byte 26")


@pytest.mark.parametrize("compression", ["", "ZLIB"])
def test_state_round_trip_among_large_and_small_records(tmp_path: Path, compression: str) -> None:
    rng = np.random.default_rng(9)
    recs = [rng.bytes(n) for n in [5, 40_000, 7, 7, 70_000, 0, 3000, 33_000, 1]]
    files = [write(tmp_path / f"{i}", recs, compression) for i in range(2)]
    ds = TFRecordDataset(files, compression, buffer_size=BLOCK)
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 4, 5, 8, 9, 10, 13))
