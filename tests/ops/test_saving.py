"""save / load in feedline's own directory format; the parts of loading tf.data's that need no
TensorFlow (the rest, against TensorFlow: tests/conformance/test_divergences.py)."""

from __future__ import annotations

import collections
import gzip
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.ops.records import FRAME
from tests.helpers import assert_elements_equal, assert_state_roundtrip

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
Point = collections.namedtuple("Point", ["x", "y"])


def mixed() -> fl.Dataset:
    """Namedtuples of an int64 scalar and a dict of a string and a ragged float16 vector."""
    return D.range(5).map(
        lambda x: Point(x, {"s": b"s" * int(x), "v": np.arange(int(x), dtype=np.float16)})
    )


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_roundtrip_keeps_elements_spec_and_count(tmp_path: Path, compression: Any) -> None:
    mixed().save(tmp_path / "saved", compression=compression)
    loaded = D.load(tmp_path / "saved")
    assert loaded.cardinality() == 5
    got = list(loaded)
    want = list(mixed())
    # The namedtuple class is made anew from the saved names; compared field by field.
    assert type(got[0]).__name__ == "Point" and type(got[0])._fields == ("x", "y")
    assert_elements_equal([tuple(p) for p in got], [tuple(p) for p in want])
    spec = loaded.element_spec
    assert tuple(spec) == tuple(mixed().element_spec)


def test_cardinality_is_the_number_of_saved_elements(tmp_path: Path) -> None:
    D.range(10).filter(lambda x: x % 3 == 0).save(tmp_path)
    loaded = D.load(tmp_path)
    assert loaded.cardinality() == 4
    assert [int(v) for v in loaded] == [0, 3, 6, 9]


def test_a_new_save_replaces_the_old_one(tmp_path: Path) -> None:
    D.range(5).save(tmp_path, compression="GZIP")
    D.from_tensor_slices(["a", "b"]).save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["element_spec.json", "elements.bin"]
    assert list(D.load(tmp_path)) == [b"a", b"b"]


def test_compression_must_match_and_be_known(tmp_path: Path) -> None:
    D.range(3).save(tmp_path, compression="GZIP")
    assert [int(v) for v in D.load(tmp_path, compression="GZIP")] == [0, 1, 2]
    D.range(3).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="saved with compression None, not 'GZIP'"):
        D.load(tmp_path / "plain", compression="GZIP")
    with pytest.raises(ValueError, match="compression must be None or 'GZIP'"):
        D.range(3).save(tmp_path, compression="SNAPPY")


def test_missing_or_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved dataset"):
        D.load(tmp_path / "nothing")
    (tmp_path / "element_spec.json").write_text('{"format": "other"}')
    with pytest.raises(fl.DataLossError, match="not from feedline's save"):
        D.load(tmp_path)


def test_datasets_of_datasets_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="elements that are datasets"):
        D.range(4).window(2).save(tmp_path)
    assert not os.listdir(tmp_path)


def test_element_spec_may_be_given(tmp_path: Path) -> None:
    D.range(3).batch(2).save(tmp_path)
    spec = fl.TensorSpec((None,), np.dtype(np.int64))
    assert D.load(tmp_path, element_spec=spec).element_spec == spec


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_loaded_state_roundtrip(tmp_path: Path, compression: Any) -> None:
    D.from_tensor_slices((["x", "yy", "zzz"] * 5, np.ones((15, 2)))).save(tmp_path, compression)
    assert_state_roundtrip(D.load(tmp_path).repeat(2))


# -- damage is found, never loaded ---------------------------------------------------------------


def saved(tmp_path: Path, compression: Any = None) -> tuple[Path, list[Any]]:
    """``mixed()`` saved to a fresh directory: the directory and the elements."""
    path = tmp_path / f"saved-{compression}"
    mixed().save(path, compression=compression)
    return path, list(mixed())


def data_file(path: Path) -> Path:
    [data] = [p for p in path.iterdir() if p.name.startswith("elements")]
    return data


def read_records(path: Path) -> list[bytes]:
    """The framed records of a save (header and payload each), decompressed."""
    data = data_file(path)
    raw = gzip.decompress(data.read_bytes()) if data.suffix == ".gz" else data.read_bytes()
    records, pos = [], 0
    while pos < len(raw):
        _, length, _ = FRAME.unpack_from(raw, pos)
        records.append(raw[pos : pos + FRAME.size + length])
        pos += FRAME.size + length
    return records


def write_records(path: Path, records: list[bytes]) -> None:
    data = data_file(path)
    raw = b"".join(records)
    data.write_bytes(gzip.compress(raw) if data.suffix == ".gz" else raw)


def edited(record: bytes, old: bytes, new: bytes, fix_checksum: bool = False) -> bytes:
    """``record`` with ``old`` replaced in its payload; its CRC made right again if asked."""
    head, payload = record[: FRAME.size], record[FRAME.size :]
    assert old in payload
    payload = payload.replace(old, new)
    if fix_checksum:
        index, length, _ = FRAME.unpack(head)
        crc = zlib.crc32(payload, zlib.crc32(head[:16]))
        head = FRAME.pack(index, length, crc)
    return head + payload


DAMAGE: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "a record removed": lambda records: records[:2] + records[3:],
    "the last record removed": lambda records: records[:-1],
    "a record repeated": lambda records: records[:3] + records[2:],
    "a record added at the end": lambda records: [*records, records[-1]],
    "two records swapped": lambda records: [records[0], records[2], records[1], *records[3:]],
    "no records": lambda records: [],
    "a value edited": lambda records: [records[0], edited(records[1], b"s", b"t"), *records[2:]],
    "a record cut short": lambda records: [*records[:-1], records[-1][:-1]],
}


@pytest.mark.parametrize("compression", [None, "GZIP"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_save_is_never_loaded(tmp_path: Path, compression: Any, damage: str) -> None:
    path, want = saved(tmp_path, compression)
    write_records(path, DAMAGE[damage](read_records(path)))
    got: list[Any] = []
    with pytest.raises(fl.DataLossError, match=r"elements\.bin.* is damaged at record \d"):
        got.extend(D.load(path))
    assert_elements_equal([tuple(p) for p in got], [tuple(p) for p in want[: len(got)]])


def test_an_edited_dtype_is_found_even_with_its_checksum_right(tmp_path: Path) -> None:
    D.range(3).map(lambda x: np.float32(x)).save(tmp_path)
    records = read_records(tmp_path)
    records[1] = edited(records[1], b"<f4", b"<i4", fix_checksum=True)
    write_records(tmp_path, records)
    with pytest.raises(fl.DataLossError, match=r"record 2.*a dtype other than float32"):
        list(D.load(tmp_path))


def test_raw_payloads_take_the_size_of_the_data(tmp_path: Path) -> None:
    # The case, scaled down: float32 arrays stored as their bytes, not base64 JSON.
    images = D.range(64).map(lambda x: np.full((64, 64, 3), x, np.float32))
    images.save(tmp_path)
    data_bytes = 64 * 64 * 64 * 3 * 4
    assert data_bytes < data_file(tmp_path).stat().st_size < data_bytes * 1.01
    assert_elements_equal(list(D.load(tmp_path)), list(images))


def test_a_save_of_format_2_is_still_read(tmp_path: Path) -> None:
    leaves = json.dumps([{"dtype": "<i8", "shape": [], "data": "AQAAAAAAAAA=", "scalar": True}])
    (tmp_path / "elements.jsonl").write_text(f"[0, {zlib.crc32(leaves.encode())}, {leaves}]\n")
    fields = {
        "format": "feedline-saved-dataset",
        "version": 2,
        "element_spec": {"shape": [], "dtype": "<i8"},
        "cardinality": 1,
        "compression": None,
    }
    checksum = zlib.crc32(json.dumps(fields, sort_keys=True).encode())
    (tmp_path / "element_spec.json").write_text(json.dumps({**fields, "checksum": checksum}))
    assert [int(v) for v in D.load(tmp_path)] == [1]


def test_damaged_gzip_files_are_data_loss(tmp_path: Path) -> None:
    path, _ = saved(tmp_path, "GZIP")
    data = path / "elements.bin.gz"
    whole = data.read_bytes()
    for cut in (0, 10, len(whole) // 2, len(whole) - 4):
        data.write_bytes(whole[:cut])
        with pytest.raises(fl.DataLossError, match=r"elements\.bin\.gz"):
            list(D.load(path))
    data.unlink()
    with pytest.raises(fl.DataLossError, match="missing"):
        list(D.load(path))


def test_damaged_metadata_is_data_loss(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    meta = path / "element_spec.json"
    original = json.loads(meta.read_text())
    edits: list[dict[str, Any]] = [
        {"cardinality": 4},
        {"cardinality": -1, "checksum": 0},
        {"element_spec": {"shape": [], "dtype": "<f4"}},
        {"version": 7},
        {"compression": "GZIP"},
    ]
    for edit in edits:
        meta.write_text(json.dumps({**original, **edit}))
        with pytest.raises(fl.DataLossError, match=r"element_spec\.json"):
            D.load(path)
    meta.write_text(meta.read_text()[:-5])
    with pytest.raises(fl.DataLossError, match=r"element_spec\.json"):
        D.load(path)


def test_a_save_of_format_1_is_still_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "elements.jsonl").write_text(
        "".join(
            json.dumps([{"dtype": "<i8", "shape": [], "data": b64, "scalar": True}]) + "\n"
            for b64 in ("AAAAAAAAAAA=", "AQAAAAAAAAA=")
        )
    )
    metadata = {
        "format": "feedline-saved-dataset",
        "version": 1,
        "element_spec": {"shape": [], "dtype": "<i8"},
        "cardinality": 2,
        "compression": None,
    }
    (tmp_path / "element_spec.json").write_text(json.dumps(metadata))
    assert [int(v) for v in D.load(tmp_path)] == [0, 1]
    (tmp_path / "element_spec.json").write_text(json.dumps({**metadata, "cardinality": 3}))
    with pytest.raises(fl.DataLossError, match="ends after 2 of 3"):
        list(D.load(tmp_path))


def test_element_spec_must_fit_the_saved_one(tmp_path: Path) -> None:
    D.range(3).batch(2).save(tmp_path)
    for spec in (
        fl.TensorSpec((None,), np.dtype(np.float32)),
        fl.TensorSpec((None, None), np.dtype(np.int64)),
        (fl.TensorSpec((None,), np.dtype(np.int64)),),
    ):
        with pytest.raises(ValueError, match="does not fit the saved"):
            D.load(tmp_path, element_spec=spec)


def test_what_cannot_be_saved_is_refused(tmp_path: Path) -> None:
    objects = D.range(3).map(lambda x: {"x": x, "o": np.array([object()])})
    with pytest.raises(TypeError, match="save cannot store element 0"):
        objects.save(tmp_path)
    assert os.listdir(tmp_path) == []


def load_state(path: Path, cut: int) -> dict[str, Any]:
    with D.load(path).iterator() as it:
        for _ in range(cut):
            next(it)
        state: dict[str, Any] = it.get_state()
    return state


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_bad_load_states_are_refused(tmp_path: Path, compression: Any) -> None:
    path, _ = saved(tmp_path, compression)
    root = load_state(path, 2)["root"]
    one_line = load_state(path, 1)["root"]["offset"]
    bad = [
        {**root, "offset": -1},
        {**root, "offset": root["offset"] - 1},  # not the start of a record
        {**root, "offset": 10**9},
        {**root, "offset": one_line},  # record 1's place, element 2's index
        {**root, "offset": 0},
        {**root, "index": 6},
        {**root, "index": -1},
        {**root, "index": "2"},
        {"offset": root["offset"]},
    ]
    for state_root in bad:
        state = {**load_state(path, 2), "root": state_root}
        with pytest.raises(fl.InvalidStateError):
            list(D.load(path).iterator(state))


# -- tf.data.Dataset.save directories, without TensorFlow ---------------------------------------

# What TensorFlow 2.21 wrote for ``({"i": int64, "s": string, "x": float32[2]}, int64)``.
TF_SPEC = bytes.fromhex(
    "a2033c0a31aa032e0a0c0a017312078a0204120018070a100a0178120b8a0208120412020802"
    "18010a0c0a016912078a0204120018090a078a020412001809"
)
TF_METADATA = bytes.fromhex(
    "1214313138383136373334303134313032343434373618c7fcee8ddbb7980320022a04090701093003c03e01"
)


def test_tf_data_element_specs_decode() -> None:
    from feedline.ops.tf_snapshot import spec_from_structured_value

    assert spec_from_structured_value(TF_SPEC) == (
        {
            "i": fl.TensorSpec((), np.dtype(np.int64)),
            "s": fl.TensorSpec((), np.dtype(object)),
            "x": fl.TensorSpec((2,), np.dtype(np.float32)),
        },
        fl.TensorSpec((), np.dtype(np.int64)),
    )


@pytest.mark.parametrize(
    "spec, metadata, message",
    [
        (TF_SPEC[:-3], TF_METADATA, "not a tf.data save feedline reads"),
        (TF_SPEC, TF_METADATA[:-1] + b"\x00", "not finalized"),
        (TF_SPEC, TF_METADATA.replace(b"\x2a\x04\x09\x07", b"\x2a\x04\x01\x07"), "agree"),
        (TF_SPEC, TF_METADATA, "shard files of run 11881673401410244476 are missing"),
    ],
    ids=["spec-cut-short", "not-finalized", "dtypes-disagree", "no-shards"],
)
def test_a_damaged_tf_data_save_is_data_loss(
    tmp_path: Path, spec: bytes, metadata: bytes, message: str
) -> None:
    (tmp_path / "dataset_spec.pb").write_bytes(spec)
    (tmp_path / "snapshot.metadata").write_bytes(metadata)
    with pytest.raises(fl.DataLossError, match=message):
        D.load(tmp_path)
