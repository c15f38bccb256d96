"""CsvDataset and make_csv_dataset, checked against TensorFlow's case by case."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.errors import DataLossError
from tests.helpers import (
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
    take,
)
from tests.io.conftest import HttpServer, S3Server

pytestmark = pytest.mark.timeout(120)

I32, I64, F32, F64, S = "int32", "int64", "float32", "float64", "string"
NP = {I32: np.int32, I64: np.int64, F32: np.float32, F64: np.float64, S: bytes}


def fl_defaults(columns: list[Any]) -> list[Any]:
    """A neutral column list (a type name, or (type name, default)) as feedline takes it."""
    out = []
    for c in columns:
        if isinstance(c, str):
            out.append(NP[c])
        else:
            kind, value = c
            out.append([value] if kind == S else NP[kind](value))
    return out


def tf_defaults(tf: Any, columns: list[Any]) -> list[Any]:
    out = []
    for c in columns:
        if isinstance(c, str):
            out.append(tf.as_dtype(c))
        else:
            kind, value = c
            out.append(tf.constant([value], dtype=tf.as_dtype(kind)))
    return out


def write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


# (id, file content, columns, CsvDataset keyword arguments)
CASES: list[tuple[str, bytes, list[Any], dict[str, Any]]] = [
    ("basic", b"a,1,2.5\nb,2,3.5\n", [S, I32, F32], {}),
    ("no-final-newline", b"a,1,2.5\nb,2,3.5", [S, I32, F32], {}),
    ("crlf", b"a,1,x\r\nb,2,y\r\n", [S, I32, S], {}),
    ("lone-cr", b"a,1\rb,2\r", [S, I32], {}),
    ("cr-inside", b"a\rb,1,x\n", [S, I32, S], {}),
    ("blank-line-cr", b"a,1\r\rb,2\r", [S, I32], {}),
    ("quoted", b'"a,b",1,"x""y"\n"multi\nline",2,z\n', [S, I32, S], {}),
    ("quote-in-unquoted", b'a"b,1,x\nc,2,y\n', [S, I32, S], {}),
    ("quotes-off", b'a"b,1,x\n"c",2,y\n', [S, I32, S], {"use_quote_delim": False}),
    ("text-after-quote", b'"a"b,1,x\n', [S, I32, S], {}),
    ("text-after-quote-then-quote", b'"a"b",1\nc,2\n', [S, I32], {}),
    ("text-after-quote-across-records", b'"a"b,1,z\nb,2,z\n"c",3,y\n', [S, I32, S], {}),
    ("space-after-quote", b'"a" ,1\n', [S, I32], {}),
    ("unclosed", b'"a,1,x\n', [S, I32, S], {}),
    ("escaped-then-unclosed", b'"a""b\n', [S], {}),
    ("quote-at-eof", b'"a"x\n"', [S], {}),
    ("escaped-quotes", b'"a"""\n""""\n', [S], {}),
    ("quote-then-cr", b'"a"\rb\n"c"\r\n"d"', [S], {}),
    ("quoted-crlf-inside", b'"a\r\nb",1\n', [S, I32], {}),
    ("empty-line-required", b"a,1,x\n\nb,2,y\n", [S, I32, S], {}),
    ("empty-line-one-column", b"a\n\nb\n\n", [(S, b"d")], {}),
    ("too-few", b"a,1\nb,2,z\n", [S, I32, S], {}),
    ("too-many", b"a,1,x,y\nb,2,z\n", [S, I32, S], {}),
    ("too-many-quoted-rest", b'a,1,x,"y\nq,4,r"\nb,2,z\n', [S, I32, S], {}),
    ("required-missing", b"a,,x\nb,2,y\n", [S, I32, S], {}),
    ("defaults", b"a,,x\n,3,\n", [(S, b"q"), (I32, 5), (S, b"r")], {}),
    ("na-value", b"a,NA,x\nNA,3,NA\n", [(S, b"q"), (I32, 5), (S, b"r")], {"na_value": "NA"}),
    ("na-required", b"a,NA,x\n", [S, I32, S], {"na_value": "NA"}),
    ("quoted-empty-and-na", b'"",1\n"NA",2\n', [(S, b"d"), I32], {"na_value": "NA"}),
    ("trailing-delimiter", b"a,1,\na,1,", [S, I32, (S, b"e")], {}),
    ("spaces-around-numbers", b" 1 ,\t2\t, 3.5 ,\t-4\n", [I32, I64, F32, F64], {}),
    ("spaces-in-strings", b" a ,b\n", [S, S], {}),
    ("signs", b"+1,-0,+.5e+2,-.5\n", [I32, I64, F32, F64], {}),
    ("underscore-int", b"1_0\n5\n", [I32], {}),
    ("underscore-float", b"1_0.5\n", [F32], {}),
    ("int32-overflow", b"3000000000\n1\n", [I32], {}),
    ("int64-overflow", b"30000000000000000000\n", [I64], {}),
    ("int64-limits", b"9223372036854775807,-9223372036854775808\n", [I64, I64], {}),
    ("float-overflow", b"1e40,-1e39,1e400,1e-50\n", [F32, F32, F64, F32], {}),
    ("float-specials", b"nan,NaN,inf,-Infinity,INF,-nan\n", [F32, F32, F32, F64, F64, F64], {}),
    ("hex", b"0x10,0x1p3,-0X1.8p1\n", [F32, F64, F64], {}),
    ("hex-int", b"0x10\n", [I32], {}),
    ("float-as-int", b"1.0\n", [I32], {}),
    ("exponent-int", b"1e3\n", [I64], {}),
    ("bad-float", b"1.5x\n", [F32], {}),
    ("bad-exponent", b"1e\n", [F64], {}),
    ("inner-space", b"1 2\n", [I32], {}),
    ("double-sign", b"+-1\n", [I64], {}),
    ("float32-double-rounding", b"1.00000005960464477539062500000001\n", [F32], {}),
    ("header", b"h1,h2\n1,2\n", [I32, I32], {"header": True}),
    ("header-quoted-newline", b'"h\n1",h2\n1,2\n', [I32, I32], {"header": True}),
    ("header-only", b"h1,h2\n", [I32, I32], {"header": True}),
    ("header-crlf", b"h\r\n1\r\n", [I32], {"header": True}),
    ("header-empty-file", b"", [I32], {"header": True}),
    ("header-quoted-cr", b'a,"b\rc"\n1\n', [I32], {"header": True}),
    ("header-stray-quote", b'a"b\n1\n', [I32], {"header": True}),
    ("header-unclosed", b'"ab\n1\n', [I32], {"header": True}),
    ("header-text-after-quote", b'"a"b,c\n1\n', [I32], {"header": True}),
    ("header-escaped-quote", b'a,"b""\nc",d\n1\n', [I32], {"header": True}),
    ("header-without-newline", b"h", [I32], {"header": True}),
    ("header-blank", b"\n1\n", [I32], {"header": True}),
    ("empty-file", b"", [S], {}),
    ("only-newline", b"\n", [(S, b"d")], {}),
    ("select", b"a,1,x,9\nb,2,y,8\n", [I32, S], {"select_cols": [1, 2]}),
    ("select-unread-bad", b"a,1,x,zz\n", [I32], {"select_cols": [1]}),
    ("select-too-few", b"a,1\n", [I32, S], {"select_cols": [1, 2]}),
    ("select-rest-quoted", b'a,1,"x\ny",9\nb,2,z,8\n', [I32], {"select_cols": [1]}),
    ("select-rest-bad-quote", b'a,1,x"y,9\nb,2,z,8\n', [I32], {"select_cols": [1]}),
    ("select-middle-bad-quote", b'1,a"b,x\n', [I32, I32], {"select_cols": [0, 2]}),
    ("select-error-index", b"a,1,x\n", [I32, I32], {"select_cols": [1, 2]}),
    ("exclude", b"a,1,x,9\nb,2,y,8\n", [S, I32], {"exclude_cols": [1, 2]}),
    ("exclude-too-many", b"a,1,x,9,10\nb,2,y,8\n", [S, I32], {"exclude_cols": [1, 2]}),
    ("exclude-too-few", b"a,1,x\n", [S, I32], {"exclude_cols": [1, 2]}),
    ("pipe", b"a|1\n", [S, I32], {"field_delim": "|"}),
    ("tab", b'a\t1\n"b\t"\t2\n', [S, I32], {"field_delim": "\t"}),
    ("more-then-quote", b'1,2,a"b\n', [I32, I32], {}),
    ("bad-then-few", b"a,x\n", [S, I32, S], {}),
    ("bad-then-more", b"a,x,z,y\n", [S, I32, S], {}),
    ("required-then-bad", b",x,\n", [S, I32, S], {}),
    ("eof-after-delimiter", b'a,\nb,""', [S, (S, b"z")], {}),
]


def tf_outcome(tf: Any, dataset: Any) -> tuple[list[Any], str | None]:
    """The elements, and the message of the error that ended the pass (if one did)."""
    out: list[Any] = []
    it = iter(dataset)
    while True:
        try:
            element = next(it)
        except StopIteration:
            return out, None
        except tf.errors.OpError as error:
            return out, error.message.split(" [Op:")[0].split("}} ")[-1]
        out.append(tuple(x.numpy() for x in element))


def fl_outcome(dataset: fl.Dataset) -> tuple[list[Any], str | None]:
    out: list[Any] = []
    with dataset.iterator() as it:
        while True:
            try:
                element = next(it)
            except StopIteration:
                return out, None
            except (ValueError, OSError) as error:
                return out, str(error)
            out.append(element)


def same_outcome(got: tuple[list[Any], str | None], want: tuple[list[Any], str | None]) -> None:
    assert_elements_equal(got[0], want[0])
    if want[1] is None:
        assert got[1] is None, got[1]
    else:
        assert got[1] is not None and want[1] in got[1], f"{got[1]!r} lacks {want[1]!r}"


@pytest.mark.parametrize(
    ("data", "columns", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_matches_tensorflow(
    tmp_path: Path, data: bytes, columns: list[Any], kwargs: dict[str, Any]
) -> None:
    """Same elements, dtypes and errors, and the same after ``ignore_errors()``; a 3-byte
    read buffer puts every record and field across reads."""
    tf = pytest.importorskip("tensorflow")
    path = write(tmp_path, "f.csv", data)
    theirs = tf.data.experimental.CsvDataset(path, tf_defaults(tf, columns), **kwargs)
    for ignore in (False, True):
        want = tf_outcome(tf, theirs.ignore_errors() if ignore else theirs)
        for block in (None, 3):
            ours = fl.io.CsvDataset(path, fl_defaults(columns), buffer_size=block, **kwargs)
            same_outcome(fl_outcome(ours.ignore_errors() if ignore else ours), want)


def test_python_defaults_take_tf_dtypes(tmp_path: Path) -> None:
    """A default value's type is its column's, converted as tf.constant converts it."""
    path = write(tmp_path, "f.csv", b",,,,,,\n1,2,3,4,5,6,7\n")
    defaults = [[0], 0.5, [b"s"], "t", np.int64(9), [np.float64(1)], [2**40]]
    ds = fl.io.CsvDataset(path, defaults)
    dtypes = [np.int32, np.float32, object, object, np.int64, np.float64, np.int64]
    assert ds.element_spec == tuple(fl.TensorSpec((), np.dtype(d)) for d in dtypes)
    assert_elements_equal(
        list(ds),
        [
            (np.int32(0), np.float32(0.5), b"s", b"t", np.int64(9), np.float64(1), np.int64(2**40)),
            (np.int32(1), np.float32(2), b"3", b"4", np.int64(5), np.float64(6), np.int64(7)),
        ],
    )


@pytest.mark.parametrize(
    "required", [np.float32, np.dtype("int64"), str, bytes, [], np.array([], np.int32)]
)
def test_required_forms(tmp_path: Path, required: Any) -> None:
    path = write(tmp_path, "f.csv", b"1\n\n")
    with fl.io.CsvDataset(path, [required]).iterator() as it:
        assert len(take(it, 1)) == 1
        with pytest.raises(ValueError, match="Field 0 is required but missing in record!"):
            next(it)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"record_defaults": [np.bool_]}, TypeError),
        ({"record_defaults": [[1, 2]]}, ValueError),
        ({"record_defaults": []}, ValueError),
        ({"record_defaults": [str], "field_delim": ",,"}, ValueError),
        ({"record_defaults": [str], "field_delim": '"'}, ValueError),
        ({"record_defaults": [str], "select_cols": [1, 0]}, ValueError),
        ({"record_defaults": [str], "select_cols": [0, 1]}, ValueError),
        ({"record_defaults": [str], "select_cols": [0], "exclude_cols": [1]}, ValueError),
        ({"record_defaults": [str], "exclude_cols": [5]}, ValueError),
        ({"record_defaults": [str], "compression_type": "BZIP2"}, ValueError),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        fl.io.CsvDataset("never-read.csv", **kwargs)


def random_field(rng: random.Random, kind: str) -> str:
    roll = rng.random()
    if roll < 0.1 and kind != "required":
        return ""
    if kind == "int":
        return str(rng.randint(-(2**31), 2**31 - 1))
    if kind in ("float", "required"):
        return repr(rng.uniform(-1e6, 1e6)) if roll < 0.9 else rng.choice(["nan", "-inf", "1e-3"])
    return "".join(rng.choice('ab,"\n\r x') for _ in range(rng.randint(0, 6)))


def random_csv(rng: random.Random, rows: int, header: bool) -> bytes:
    """Rows of (int, float, string, required float), quoted where needed and at random,
    ending with \\n or \\r\\n at random."""
    lines = ["i,f,s,r\n"] if header else []
    for _ in range(rows):
        fields = [random_field(rng, k) for k in ("int", "float", "str", "required")]
        quoted = [
            '"' + f.replace('"', '""') + '"'
            if any(c in f for c in ',"\n\r') or rng.random() < 0.2
            else f
            for f in fields
        ]
        lines.append(",".join(quoted) + rng.choice(["\n", "\r\n"]))
    return "".join(lines).encode()


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda b: b,
    "GZIP": gzip.compress,
    "ZLIB": zlib.compress,
}
RANDOM_COLUMNS = [(I32, -1), (F32, 0.5), (S, b"?"), F64]


@pytest.fixture
def random_files(tmp_path: Path) -> Callable[[str, bool], list[str]]:
    def make(compression: str, header: bool) -> list[str]:
        rng = random.Random(7)
        return [
            write(tmp_path, f"r{i}.csv", COMPRESS[compression](random_csv(rng, 60, header)))
            for i in range(3)
        ]

    return make


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("header", [False, True])
def test_random_files_match_tensorflow(
    random_files: Callable[[str, bool], list[str]], compression: str, header: bool
) -> None:
    tf = pytest.importorskip("tensorflow")
    paths = random_files(compression, header)
    kwargs = {"compression_type": compression, "header": header}
    want = tf_outcome(
        tf, tf.data.experimental.CsvDataset(paths, tf_defaults(tf, RANDOM_COLUMNS), **kwargs)
    )
    assert want[1] is None and len(want[0]) == 180
    for block in (None, 5):
        ours = fl.io.CsvDataset(paths, fl_defaults(RANDOM_COLUMNS), buffer_size=block, **kwargs)
        same_outcome(fl_outcome(ours), want)
        # Whole chunks of records (batch takes them), converted a column at a time: the same.
        assert_elements_equal(list(ours.batch(1000).unbatch()), want[0])


@pytest.mark.parametrize("compression", list(COMPRESS))
def test_state_roundtrip(random_files: Callable[[str, bool], list[str]], compression: str) -> None:
    paths = random_files(compression, True)
    ds = fl.io.CsvDataset(paths, fl_defaults(RANDOM_COLUMNS), compression, 64, header=True)
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 59, 60, 61, 100, 179))


def test_state_is_a_byte_offset_and_resuming_seeks(tmp_path: Path) -> None:
    path = write(tmp_path, "f.csv", b"h\n1\n22\n333\n")
    ds = fl.io.CsvDataset(path, [np.int32], header=True)
    assert saved_state(ds, 0)["root"] == {"file": 0, "offset": 0}
    assert saved_state(ds, 2)["root"] == {"file": 0, "offset": 7}
    assert saved_state(ds, 3)["root"] in ({"file": 0, "offset": 11}, {"file": 1, "offset": 0})
    with ds.iterator(saved_state(ds, 2)) as it:
        assert list(it) == [(333,)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("offset", 5),  # inside a line
        ("offset", 1000),  # past the end
        ("offset", -1),
        ("offset", "7"),
        ("file", 3),
        ("file", None),
    ],
)
def test_crafted_states_are_rejected(tmp_path: Path, field: str, value: Any) -> None:
    paths = [write(tmp_path, n, b"h\n1\n22\n333\n") for n in ("a.csv", "b.csv")]
    for compression in ("", "GZIP"):
        if compression:
            paths = [write(tmp_path, n + ".gz", gzip.compress(Path(n).read_bytes())) for n in paths]
        ds = fl.io.CsvDataset(paths, [np.int32], compression, header=True)
        state = saved_state(ds, 2)
        state["root"][field] = value
        assert_state_rejected(ds, state, field)
    ds = fl.io.CsvDataset(paths, [np.int32], "GZIP", header=True)
    state = saved_state(ds, 2)
    state["root"].update(file=2, offset=7)  # past the last file, yet an offset
    assert_state_rejected(ds, state, "offset")


def test_bad_record_names_file_and_offset_and_reading_goes_on(tmp_path: Path) -> None:
    path = write(tmp_path, "f.csv", b"1,a\n2,b\nx,c\n4,d\n")
    ds = fl.io.CsvDataset(path, [np.int32, str])
    with ds.iterator() as it:
        assert [next(it)[0], next(it)[0]] == [1, 2]
        with pytest.raises(ValueError) as caught:
            next(it)
        assert "Field 0 in record is not a valid int32: x" in str(caught.value)
        assert f"{path}, the record at byte 8" in str(caught.value)
        assert json.loads(json.dumps(it.get_state()))["root"]["offset"] == 12
        assert list(it) == [(4, b"d")]
    assert [r[0] for r in ds.ignore_errors()] == [1, 2, 4]


def test_missing_file_is_named_and_skipped_by_ignore_errors(tmp_path: Path) -> None:
    present = write(tmp_path, "b.csv", b"1\n")
    missing = str(tmp_path / "absent.csv")
    with pytest.raises(FileNotFoundError, match=r"absent\.csv"):
        list(fl.io.CsvDataset([missing, present], [np.int32]))
    assert list(fl.io.CsvDataset([missing, present], [np.int32]).ignore_errors()) == [(1,)]


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB"])
def test_truncated_compressed_file_is_data_loss(tmp_path: Path, compression: str) -> None:
    data = b"".join(b"%d,row\n" % i for i in range(5000))
    damaged = COMPRESS[compression](data)[:-200]
    path = write(tmp_path, "f.csv.z", damaged)
    after = write(tmp_path, "g.csv.z", COMPRESS[compression](b"-1,next\n"))
    got = []
    ds = fl.io.CsvDataset([path, after], [np.int64, str], compression)
    with ds.iterator() as it:
        with pytest.raises(DataLossError, match=path):
            for record in it:
                got.append(int(record[0]))
        assert list(it) == [(-1, b"next")]  # then the next file, as tf.data
    assert got == list(range(len(got))) and 0 < len(got) < 5000
    # A state taken just before the damage resumes into it, not past it.
    with ds.iterator(saved_state(ds, len(got))) as it, pytest.raises(DataLossError):
        next(it)


def test_empty_file_with_header(tmp_path: Path) -> None:
    empty = write(tmp_path, "a.csv", b"")
    full = write(tmp_path, "b.csv", b"h\n5\n")
    with pytest.raises(ValueError, match="Can't read header"):
        list(fl.io.CsvDataset([empty, full], [np.int32], header=True))
    assert list(fl.io.CsvDataset([empty, full], [np.int32], header=True).ignore_errors()) == [(5,)]


def test_cardinality_and_spec() -> None:
    ds = fl.io.CsvDataset(["a.csv"], [np.int64, [0.0], str], select_cols=[0, 2, 5])
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY
    assert ds.element_spec == (
        fl.TensorSpec((), np.dtype(np.int64)),
        fl.TensorSpec((), np.dtype(np.float32)),
        fl.TensorSpec((), np.dtype(object)),
    )


# -- URLs ------------------------------------------------------------------------------------

URL_DATA = b"".join(b'%d,"v\n%d"\n' % (i, i) for i in range(300))
URL_WANT = [(np.int32(i), b"v\n%d" % i) for i in range(300)]


def check_url(url: str) -> None:
    ds = fl.io.CsvDataset(url, [np.int32, str], buffer_size=512)
    assert_elements_equal(list(ds), URL_WANT)
    assert_state_roundtrip(ds, cut_points=(0, 1, 150))


def test_memory_url() -> None:
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://csv-test/f.csv", "wb") as f:
        f.write(URL_DATA)
    try:
        check_url("memory://csv-test/f.csv")
    finally:
        fsspec.filesystem("memory").rm("/csv-test", recursive=True)


def test_http_url(http_server: HttpServer) -> None:
    (http_server.root / "f.csv").write_bytes(URL_DATA)
    check_url(http_server.url + "f.csv")


def test_s3_url(s3_server: S3Server) -> None:
    s3_server.put("dir/f.csv", URL_DATA)
    check_url(s3_server.bucket_url + "dir/f.csv")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("header", [False, True])
def test_not_compressed_at_all_is_data_loss_then_next_file(tmp_path: Path, header: bool) -> None:
    garbage = write(tmp_path, "a.csv.gz", b"this is not gzip\n1\n")
    good = write(tmp_path, "b.csv.gz", gzip.compress(b"h\n7\n" if header else b"7\n"))
    ds = fl.io.CsvDataset([garbage, good], [np.int32], "GZIP", header=header)
    with pytest.raises(DataLossError, match=r"a\.csv\.gz"):
        list(ds)
    assert list(ds.ignore_errors()) == [(7,)]


def test_experimental_names_are_the_readers() -> None:
    assert fl.experimental.CsvDataset is fl.io.CsvDataset
    assert fl.experimental.make_csv_dataset is fl.io.make_csv_dataset
