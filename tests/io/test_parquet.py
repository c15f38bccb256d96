"""ParquetDataset, checked against pyarrow's own reading of the same files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import (
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
)
from tests.io.conftest import HttpServer, S3Server

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.timeout(60)

STRING = np.dtype(object)
NUMERIC = ["int8", "int16", "int32", "int64", "uint8", "uint32", "uint64", "float32", "float64"]


def random_table(rng: np.random.Generator, rows: int) -> Any:
    """Every supported kind of column, each with nulls in about one row of five."""

    def nulls() -> np.ndarray:
        return rng.random(rows) < 0.2

    columns: dict[str, Any] = {}
    for name in NUMERIC:
        values = rng.integers(0, 100, rows).astype(name)
        columns[name] = pa.array(values, mask=nulls())
    columns["bool"] = pa.array(rng.random(rows) < 0.5, mask=nulls())
    words = ["", "a", "héllo", "x" * 50, "日本"]
    columns["string"] = pa.array(
        [None if n else words[k] for n, k in zip(nulls(), rng.integers(0, 5, rows))]
    )
    columns["binary"] = pa.array(
        [None if n else rng.bytes(int(k)) for n, k in zip(nulls(), rng.integers(0, 9, rows))],
        pa.binary(),
    )
    columns["ints"] = pa.array(
        [
            None if n else list(rng.integers(-5, 5, int(k)))
            for n, k in zip(nulls(), rng.integers(0, 4, rows))
        ],
        pa.list_(pa.int64()),
    )
    columns["floats"] = pa.array(
        [
            None if n else list(rng.random(int(k)))
            for n, k in zip(nulls(), rng.integers(0, 4, rows))
        ],
        pa.large_list(pa.float32()),
    )
    columns["words"] = pa.array(
        [None if n else words[: int(k)] for n, k in zip(nulls(), rng.integers(0, 4, rows))],
        pa.list_(pa.string()),
    )
    return pa.table(columns)


DEFAULTS = {
    **{name: 7 for name in NUMERIC},
    "bool": True,
    "string": "none",
    "binary": b"\x00",
    "ints": [-1],
    "floats": [],
    "words": ["?"],
}


def expected_rows(table: Any, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """pyarrow's rows as numpy values, nulls replaced by ``defaults``."""
    rows = []
    for row in table.to_pylist():
        out = {}
        for field in table.schema:
            value = row[field.name]
            value = defaults[field.name] if value is None else value
            t = field.type
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                item = t.value_type
                if pa.types.is_string(item):
                    arr = np.empty(len(value), dtype=object)
                    arr[:] = [v.encode() for v in value]
                    out[field.name] = arr
                else:
                    out[field.name] = np.array(value, dtype=item.to_pandas_dtype())
            elif pa.types.is_string(t):
                out[field.name] = value.encode() if isinstance(value, str) else value
            elif pa.types.is_binary(t):
                out[field.name] = value
            else:
                out[field.name] = np.dtype(t.to_pandas_dtype()).type(value)
        rows.append(out)
    return rows


def write(path: Path, table: Any, **kw: Any) -> str:
    pq.write_table(table, path, **kw)
    return str(path)


def rows_of(n: int, start: int = 0) -> Any:
    return pa.table({"x": np.arange(start, start + n, dtype=np.int64)})


def xs(ds: fl.Dataset) -> list[int]:
    return [int(r["x"]) for r in ds.as_numpy_iterator()]


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_tables_equal_pyarrows_reading(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    table = random_table(rng, int(rng.integers(1, 300)))
    path = write(tmp_path / "t.parquet", table, row_group_size=int(rng.integers(1, 100)))
    ds = fl.io.ParquetDataset(path, defaults=DEFAULTS)
    assert_elements_equal(
        list(ds.as_numpy_iterator()), expected_rows(pq.read_table(path), DEFAULTS)
    )


def test_element_spec_from_the_schema(tmp_path: Path) -> None:
    table = random_table(np.random.default_rng(0), 5).append_column(
        "pair", pa.array([[1.0, 2.0]] * 5, pa.list_(pa.float32(), 2))
    )
    spec = fl.io.ParquetDataset(write(tmp_path / "t.parquet", table)).element_spec
    assert spec["int8"] == fl.TensorSpec((), np.dtype("int8"))
    assert spec["uint64"] == fl.TensorSpec((), np.dtype("uint64"))
    assert spec["bool"] == fl.TensorSpec((), np.dtype(bool))
    assert spec["string"] == spec["binary"] == fl.TensorSpec((), STRING)
    assert spec["ints"] == fl.TensorSpec((None,), np.dtype("int64"))
    assert spec["words"] == fl.TensorSpec((None,), STRING)
    assert spec["pair"] == fl.TensorSpec((2,), np.dtype("float32"))
    assert list(spec) == [*table.schema.names]


def test_dates_timestamps_and_dictionary_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "day": pa.array([0, 365], pa.date32()),
            "when": pa.array([1, 2], pa.timestamp("us")),
            "cat": pa.array(["a", "b"]).dictionary_encode(),
        }
    )
    ds = fl.io.ParquetDataset(write(tmp_path / "t.parquet", table))
    rows = list(ds.as_numpy_iterator())
    assert rows[1]["day"] == np.datetime64("1971-01-01")
    assert rows[0]["when"] == np.datetime64(1, "us")
    assert [r["cat"] for r in rows] == [b"a", b"b"]


def test_a_null_without_a_default_names_its_place(tmp_path: Path) -> None:
    table = pa.table({"x": pa.array([1, 2, 3, None], pa.int64())})
    ds = fl.io.ParquetDataset(write(tmp_path / "t.parquet", table, row_group_size=2))
    with ds.iterator() as it:
        assert [int(next(it)["x"]) for _ in range(2)] == [1, 2]
        with pytest.raises(ValueError, match=r"t.parquet: row group 1, row 1: column 'x' is null"):
            next(it)


def test_a_null_inside_a_list_is_refused(tmp_path: Path) -> None:
    table = pa.table({"l": pa.array([[1, None]], pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match="null inside a list"):
        list(fl.io.ParquetDataset(write(tmp_path / "t.parquet", table)))


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(pa.array([{"a": 1}]), id="struct"),
        pytest.param(pa.array([[[1]]]), id="list-of-lists"),
        pytest.param(pa.array([1], pa.decimal128(5, 2)), id="decimal"),
        pytest.param(pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64())), id="map"),
        pytest.param(pa.array([1], pa.time32("s")), id="time-of-day"),
    ],
)
def test_columns_numpy_cannot_hold_are_refused_at_build(tmp_path: Path, column: Any) -> None:
    path = write(tmp_path / "t.parquet", pa.table({"bad": column, "x": [1]}))
    with pytest.raises(ValueError, match="column 'bad'"):
        fl.io.ParquetDataset(path)
    # ...and can be left out.
    assert xs(fl.io.ParquetDataset(path, columns=["x"])) == [1]


def test_bad_arguments_fail_at_build(tmp_path: Path) -> None:
    path = write(tmp_path / "t.parquet", rows_of(3))
    with pytest.raises(ValueError, match=r"no column \['y'\]"):
        fl.io.ParquetDataset(path, columns=["y"])
    with pytest.raises(ValueError, match="each column once"):
        fl.io.ParquetDataset(path, columns=["x", "x"])
    with pytest.raises(ValueError, match="at least one"):
        fl.io.ParquetDataset(path, columns=[])
    with pytest.raises(ValueError, match="not read"):
        fl.io.ParquetDataset(path, defaults={"y": 1})
    with pytest.raises(ValueError, match="must be a scalar"):
        fl.io.ParquetDataset(path, defaults={"x": [1, 2]})
    with pytest.raises(ValueError, match="shard"):
        fl.io.ParquetDataset(path, shard=(2, 2))
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        fl.io.ParquetDataset(str(tmp_path / "nope.parquet"))


# -- files, projection, damage ----------------------------------------------------------------


def test_files_in_order_and_a_dataset_of_paths(tmp_path: Path) -> None:
    paths = [
        write(tmp_path / f"{k}.parquet", rows_of(5, 10 * k), row_group_size=2) for k in range(3)
    ]
    want = [10 * k + i for k in range(3) for i in range(5)]
    assert xs(fl.io.ParquetDataset(paths)) == want
    files = fl.Dataset.list_files(str(tmp_path / "*.parquet"), shuffle=False)
    assert xs(fl.io.ParquetDataset(files)) == want
    assert_state_roundtrip(fl.io.ParquetDataset(files), cut_points=(0, 4, 5, 11))


def test_a_file_with_other_columns_is_refused_by_name(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parquet", rows_of(2))
    b = write(tmp_path / "b.parquet", pa.table({"x": pa.array([1.0])}))
    with fl.io.ParquetDataset([a, b]).iterator() as it:
        assert [int(next(it)["x"]) for _ in range(2)] == [0, 1]
        with pytest.raises(ValueError, match=r"b\.parquet: its schema differs"):
            next(it)


def damage_column(path: str, group: int, column: int) -> None:
    """Flip a byte among the values of one column chunk (its last page's last bytes)."""
    meta = pq.ParquetFile(path).metadata.row_group(group).column(column)
    end = meta.data_page_offset + meta.total_compressed_size
    data = bytearray(Path(path).read_bytes())
    data[end - 3] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def checked_file(tmp_path: Path) -> str:
    """40 rows in row groups of 10, pages written plainly with checksums (pyarrow's default
    writes none, and a flipped byte in a page without one cannot be told from data)."""
    table = pa.table({"x": np.arange(40, dtype=np.int64), "y": np.arange(40, dtype=np.float64)})
    return write(
        tmp_path / "t.parquet",
        table,
        row_group_size=10,
        compression="NONE",
        use_dictionary=False,
        write_page_checksum=True,
    )


def test_a_damaged_page_is_data_loss_naming_file_and_row_group(tmp_path: Path) -> None:
    path = checked_file(tmp_path)
    damage_column(path, group=2, column=1)
    got = []
    with pytest.raises(fl.io.DataLossError, match=r"t.parquet: row group 2"):
        for row in fl.io.ParquetDataset(path).as_numpy_iterator():
            got.append(int(row["x"]))
    assert got == list(range(20))  # rows before the damage, none after it
    # The column is projected in the reader: its damaged page is never read.
    assert xs(fl.io.ParquetDataset(path, columns=["x"])) == list(range(40))
    # ignore_errors() goes on after the damaged row group.
    assert xs(fl.io.ParquetDataset(path).ignore_errors()) == [*range(20), *range(30, 40)]


def test_not_a_parquet_file_is_data_loss(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(fl.io.DataLossError, match=r"t\.parquet"):
        fl.io.ParquetDataset(str(path))


# -- state and splitting ----------------------------------------------------------------------


@pytest.fixture
def three_files(tmp_path: Path) -> list[str]:
    sizes = [7, 0, 12]
    return [
        write(tmp_path / f"{k}.parquet", rows_of(n, 100 * k), row_group_size=3)
        for k, n in enumerate(sizes)
    ]


def test_state_roundtrip_across_row_groups_and_files(three_files: list[str]) -> None:
    ds = fl.io.ParquetDataset(three_files)
    assert_state_roundtrip(ds, cut_points=range(0, 20))
    assert_state_roundtrip(ds.batch(4), cut_points=range(0, 6))


def test_state_names_file_row_group_and_row(three_files: list[str]) -> None:
    ds = fl.io.ParquetDataset(three_files)
    assert saved_state(ds, 4)["root"] == {"file": 0, "row_group": 1, "row": 1}
    assert saved_state(ds, 19)["root"] == {"file": 2, "row_group": 3, "row": 3}


@pytest.mark.parametrize(
    "field, value",
    [
        ("file", 4),
        ("file", -1),
        ("row_group", 3),
        ("row", 4),
        ("row", "1"),
    ],
)
def test_crafted_states_are_refused(three_files: list[str], field: str, value: Any) -> None:
    ds = fl.io.ParquetDataset(three_files)
    state = saved_state(ds, 4)
    state["root"][field] = value
    assert_state_rejected(ds, state, field)
    del state["root"][field]
    assert_state_rejected(ds, state, field)


def test_a_resume_reads_only_its_row_group(tmp_path: Path) -> None:
    path = checked_file(tmp_path)
    ds = fl.io.ParquetDataset(path)
    state = saved_state(ds, 25)
    damage_column(path, group=0, column=0)
    damage_column(path, group=1, column=0)
    with pytest.raises(fl.io.DataLossError, match="row group 0"):
        xs(ds)
    with ds.iterator(state) as it:
        assert [int(r["x"]) for r in it] == list(range(25, 40))


def test_shard_keyword_splits_by_file_and_by_row_group(three_files: list[str]) -> None:
    everything = xs(fl.io.ParquetDataset(three_files))
    for n in (1, 2, 3, 4, 5):
        parts = [xs(fl.io.ParquetDataset(three_files, shard=(n, i))) for i in range(n)]
        assert sorted(x for part in parts for x in part) == sorted(everything), n
    # Files when there are as many as shards: shard 0 of 2 reads files 0 and 2.
    assert xs(fl.io.ParquetDataset(three_files, shard=(2, 0))) == [
        *range(0, 7),
        *range(200, 212),
    ]
    # Row groups when there are fewer: 3 + 0 + 4 groups, every 4th from the second.
    assert xs(fl.io.ParquetDataset(three_files, shard=(4, 1))) == [3, 4, 5, 203, 204, 205]


def test_a_missing_file_names_it_and_ignore_errors_goes_on(three_files: list[str]) -> None:
    Path(three_files[1]).unlink()
    ds = fl.io.ParquetDataset(three_files)
    with pytest.raises(FileNotFoundError, match=r"1\.parquet"):
        xs(ds)
    assert xs(ds.ignore_errors()) == [*range(7), *range(200, 212)]


def test_shard_keyword_never_opens_the_files_it_drops(three_files: list[str]) -> None:
    Path(three_files[1]).write_bytes(b"damaged")
    assert xs(fl.io.ParquetDataset(three_files, shard=(2, 0)))[:2] == [0, 1]


def test_sharded_state_roundtrip(three_files: list[str]) -> None:
    assert_state_roundtrip(fl.io.ParquetDataset(three_files, shard=(4, 1)), range(7))


def test_dataset_shard_keeps_every_nth_row(three_files: list[str]) -> None:
    ds = fl.io.ParquetDataset(three_files)
    assert xs(ds.shard(3, 1)) == xs(ds)[1::3]


# -- URLs ---------------------------------------------------------------------------------------


def table_bytes(tmp_path: Path) -> bytes:
    path = write(tmp_path / "t.parquet", rows_of(10), row_group_size=4)
    return Path(path).read_bytes()


def check_url(url: str) -> None:
    ds = fl.io.ParquetDataset(url)
    assert xs(ds) == list(range(10))
    assert_state_roundtrip(ds, cut_points=(0, 5, 9))


def test_memory_url(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://feedline-test/t.parquet", "wb") as f:
        f.write(table_bytes(tmp_path))
    try:
        check_url("memory://feedline-test/t.parquet")
    finally:
        fsspec.filesystem("memory").rm("/feedline-test", recursive=True)


def test_http_url(tmp_path: Path, http_server: HttpServer) -> None:
    (http_server.root / "t.parquet").write_bytes(table_bytes(tmp_path))
    check_url(http_server.url + "t.parquet")


def test_s3_url(tmp_path: Path, s3_server: S3Server) -> None:
    s3_server.put("t.parquet", table_bytes(tmp_path))
    check_url(s3_server.bucket_url + "t.parquet")
