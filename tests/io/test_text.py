"""Dataset.list_files and TextLineDataset, checked against tf.data's outputs."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_state_rejected, assert_state_roundtrip, saved_state

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
STRING = fl.TensorSpec((), np.dtype(object))


def write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def strings(ds: fl.Dataset) -> list[bytes]:
    out = list(ds)
    assert all(isinstance(x, bytes) for x in out)
    return out


# -- list_files -----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ["b.txt", "a.txt", "c.txt", "d.log", "sub/e.txt"]:
        write(tmp_path, name, b"x\n")
    return tmp_path


def under(root: Path, *names: str) -> list[bytes]:
    return [os.fsencode(root / n) for n in names]


@pytest.mark.parametrize(
    "patterns, want",
    [
        pytest.param(["*.txt"], ["a.txt", "b.txt", "c.txt"], id="glob"),
        pytest.param(["?.log", "b*"], ["b.txt", "d.log"], id="patterns-sorted-together"),
        pytest.param(["*/*.txt"], ["sub/e.txt"], id="subdirectory"),
        pytest.param(["nothing*", "a.txt"], ["a.txt"], id="one-pattern-matches"),
        pytest.param(
            ["*.txt", "a*"],
            ["a.txt", "a.txt", "b.txt", "c.txt"],
            id="duplicates",
        ),
        pytest.param(
            ["**/*.txt"],
            ["sub/e.txt"],
            id="double-star",
        ),
    ],
)
def test_list_files_unshuffled_is_sorted(tree: Path, patterns: list[str], want: list[str]) -> None:
    ds = D.list_files([str(tree / p) for p in patterns], shuffle=False)
    assert ds.element_spec == STRING
    assert strings(ds) == under(tree, *want)


def test_list_files_star_matches_dot_files(tree: Path) -> None:
    write(tree, ".h.txt", b"")
    got = strings(D.list_files(str(tree / "*.txt"), shuffle=False))
    assert got == under(tree, ".h.txt", "a.txt", "b.txt", "c.txt")


def test_list_files_takes_a_single_pattern_string(tree: Path) -> None:
    assert strings(D.list_files(str(tree / "*.log"), shuffle=False)) == under(tree, "d.log")


def test_list_files_shuffles_by_default(tmp_path: Path) -> None:
    names = [f"f{i:02d}" for i in range(30)]
    for n in names:
        write(tmp_path, n, b"")
    everything = under(tmp_path, *names)
    pattern = str(tmp_path / "f*")
    first = strings(D.list_files(pattern))
    assert sorted(first) == everything
    assert first != everything
    seeded = D.list_files(pattern, seed=3)
    assert strings(seeded) == strings(D.list_files(pattern, seed=3))
    assert strings(seeded) != strings(D.list_files(pattern, seed=4))
    # Like tf.data, which shuffles with reshuffle_each_iteration, each pass is a new order.
    assert strings(seeded) != strings(seeded)


def test_list_files_no_match_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no files matched"):
        D.list_files([str(tmp_path / "*.nope"), str(tmp_path / "x*")])


def test_list_files_matches_when_built(tree: Path) -> None:
    ds = D.list_files(str(tree / "*.txt"), shuffle=False)
    write(tree, "a2.txt", b"")
    (tree / "b.txt").unlink()
    assert strings(ds) == under(tree, "a.txt", "b.txt", "c.txt")


# -- TextLineDataset ------------------------------------------------------------------------

# Outputs confirmed with tf.data 2.21: only '\n' ends a line, and every '\r' is dropped.
LINE_CASES = [
    (b"one\ntwo\n", [b"one", b"two"]),
    (b"one\ntwo", [b"one", b"two"]),
    (b"one\r\ntwo\r\n", [b"one", b"two"]),
    (b"one\ntwo\r\nthree\rx\nlast\r", [b"one", b"two", b"threex", b"last"]),
    (b"\n\nx", [b"", b"", b"x"]),
    (b"\n", [b""]),
    (b"", []),
    ("\u00e9t\u00e9\n".encode(), ["\u00e9t\u00e9".encode()]),
]


@pytest.mark.parametrize("data, want", LINE_CASES)
def test_lines(tmp_path: Path, data: bytes, want: list[bytes]) -> None:
    ds = fl.TextLineDataset(write(tmp_path, "f.txt", data))
    assert ds.element_spec == STRING
    assert strings(ds) == want


def three_files(tmp_path: Path) -> list[str]:
    return [
        write(tmp_path, "a.txt", b"one\ntwo\r\nthree\rx\nlast\r"),
        write(tmp_path, "c.txt", b"\n\nx"),
        write(tmp_path, "e.log", b"e1\ne2\n"),
    ]


SEQUENTIAL = [b"one", b"two", b"threex", b"last", b"", b"", b"x", b"e1", b"e2"]
# tf.data 2.21, TextLineDataset(three files, num_parallel_reads=2).
TWO_AT_A_TIME = [b"one", b"", b"two", b"", b"threex", b"x", b"last", b"e1", b"e2"]


def test_several_files_in_order_with_empty_ones(tmp_path: Path) -> None:
    a, c, e = three_files(tmp_path)
    empty = write(tmp_path, "empty.txt", b"")
    ds = fl.TextLineDataset([empty, a, empty, c, e, empty])
    assert strings(ds) == SEQUENTIAL
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY


@pytest.mark.parametrize(
    "as_name",
    [str, os.fsencode, Path, np.str_],
    ids=["str", "bytes", "path", "numpy-str"],
)
def test_path_types(tmp_path: Path, as_name: Callable[[str], object]) -> None:
    a, c, e = three_files(tmp_path)
    assert strings(fl.TextLineDataset([as_name(a), as_name(c), as_name(e)])) == SEQUENTIAL
    assert strings(fl.TextLineDataset(as_name(c))) == [b"", b"", b"x"]


def zlib_compress(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize(
    "compression, compress",
    [("GZIP", gzip.compress), ("ZLIB", zlib_compress), ("", bytes)],
)
def test_compressed_files(tmp_path: Path, compression: str, compress: Callable) -> None:
    paths = [
        write(tmp_path, f"{i}.z", compress(data))
        for i, data in enumerate([b"one\ntwo\r\nthree", b"", b"\nlast\n"])
    ]
    ds = fl.TextLineDataset(paths, compression_type=compression)
    assert strings(ds) == [b"one", b"two", b"three", b"", b"last"]
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3, 4))


def test_bad_compression_type_fails_at_build_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression_type"):
        fl.TextLineDataset(write(tmp_path, "a", b""), compression_type="BZIP2")


def test_a_dataset_of_filenames(tmp_path: Path) -> None:
    three_files(tmp_path)
    names = D.list_files(str(tmp_path / "*"), shuffle=False)
    ds = fl.TextLineDataset(names)
    assert ds.element_spec == STRING
    assert strings(ds) == SEQUENTIAL
    assert_state_roundtrip(ds)


def test_element_spec_of_only_empty_files_is_known(tmp_path: Path) -> None:
    names = D.from_tensor_slices([write(tmp_path, f"{i}", b"") for i in range(2)])
    ds = fl.TextLineDataset(names, num_parallel_reads=2)
    assert ds.element_spec == STRING
    assert strings(ds) == []


@pytest.mark.parametrize("as_dataset", [False, True], ids=["list", "dataset"])
def test_num_parallel_reads_interleaves_lines(tmp_path: Path, as_dataset: bool) -> None:
    paths = three_files(tmp_path)
    names = D.from_tensor_slices(paths) if as_dataset else paths
    ds = fl.TextLineDataset(names, num_parallel_reads=2)
    assert strings(ds) == TWO_AT_A_TIME
    assert strings(fl.TextLineDataset(names, num_parallel_reads=1)) == SEQUENTIAL
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3, 5, 6))


def test_num_parallel_reads_autotune_reads_one_file_per_core(tmp_path: Path) -> None:
    # tf.data's AUTOTUNE cycle length is the number of cores, whatever form filenames take.
    paths = three_files(tmp_path)
    want = strings(
        D.from_tensor_slices(paths).interleave(
            fl.TextLineDataset, cycle_length=os.cpu_count() or 1, block_length=1
        )
    )
    assert strings(fl.TextLineDataset(paths, num_parallel_reads=fl.AUTOTUNE)) == want
    names = D.from_tensor_slices(paths)
    assert strings(fl.TextLineDataset(names, num_parallel_reads=fl.AUTOTUNE)) == want


@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (-3, ValueError), (True, TypeError), (2.0, TypeError)]
)
def test_bad_num_parallel_reads_fails_at_build_time(
    tmp_path: Path, value: object, error: type
) -> None:
    paths = three_files(tmp_path)
    with pytest.raises(error, match="num_parallel_reads"):
        fl.TextLineDataset(paths, num_parallel_reads=value)  # type: ignore[arg-type]


def test_missing_file_fails_when_read(tmp_path: Path) -> None:
    ds = fl.TextLineDataset([write(tmp_path, "a", b"x\n"), str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError):
        list(ds)


def test_state_roundtrip_uncompressed(tmp_path: Path) -> None:
    a, c, e = three_files(tmp_path)
    empty = write(tmp_path, "empty.txt", b"")
    ds = fl.TextLineDataset([empty, a, empty, c, e, empty])
    assert_state_roundtrip(ds, cut_points=range(len(SEQUENTIAL) + 1))
    assert_state_roundtrip(ds.repeat(2).shuffle(5, seed=1), cut_points=(0, 4, 11))


# -- crafted states -----------------------------------------------------------------------------


def _two_files(tmp_path: Path, compression: str = "") -> fl.Dataset:
    data = [b"one\ntwo\nthree\n", b"four\nfive"]
    if compression == "GZIP":
        data = [gzip.compress(d) for d in data]
    paths = [write(tmp_path, f"{i}.txt", d) for i, d in enumerate(data)]
    return fl.TextLineDataset(paths, compression_type=compression or None)


@pytest.mark.parametrize(
    "file, line, offset, field",
    [
        (2, 1, 4, "line"),  # past the last file, yet inside a file
        (3, 0, 0, "file"),
        (0, 1, 3, "offset"),  # inside the first line: read as a line "\ntwo"... before
        (0, 1, 2, "offset"),
        (0, 2, 30, "offset"),  # past the file's end
        (0, 0, 4, "offset"),  # bytes read without a line
        (0, 5, 4, "offset"),  # more lines than bytes
        (0, -1, 4, "line"),
        (0, 1, "4", "offset"),
    ],
)
def test_state_with_a_bad_position_is_rejected(
    tmp_path: Path, file: int, line: int, offset: int, field: str
) -> None:
    ds = _two_files(tmp_path)
    state = saved_state(ds, 1)
    assert state["root"] == {"file": 0, "line": 1, "offset": 4}
    state["root"].update(file=file, line=line, offset=offset)
    assert_state_rejected(ds, state, field)


def test_state_at_a_file_end_without_a_line_ending_resumes(tmp_path: Path) -> None:
    ds = _two_files(tmp_path)
    state = saved_state(ds, 5)
    assert state["root"] == {"file": 1, "line": 2, "offset": 9}
    assert list(ds.iterator(state)) == []


@pytest.mark.parametrize(
    "line, offset, field",
    [
        (4, 14, "line"),  # past the file's end: read the next file's lines before
        (2, 9, "offset"),  # not where two lines end
        (2, 3, "offset"),
    ],
)
def test_compressed_state_with_a_bad_position_is_rejected(
    tmp_path: Path, line: int, offset: int, field: str
) -> None:
    ds = _two_files(tmp_path, "GZIP")
    state = saved_state(ds, 2)
    assert state["root"] == {"file": 0, "line": 2, "offset": 8}
    state["root"].update(line=line, offset=offset)
    assert_state_rejected(ds, state, field)
