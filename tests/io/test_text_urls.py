"""Text lines and list_files over object stores and HTTP: the same names as local paths,
against real servers on 127.0.0.1 (tests/io/conftest.py)."""

from __future__ import annotations

import gzip
import zlib

import pytest

import feedline as fl
from tests.helpers import assert_state_roundtrip
from tests.io.conftest import HttpServer, S3Server

pytestmark = pytest.mark.timeout(60)

LINES = [b"first", b"", b"third line", b"fourth"]
TEXT = b"\n".join(LINES) + b"\n"


def test_list_files_matches_urls_and_text_lines_reads_them(s3_server: S3Server) -> None:
    for name in ("train-1.txt", "train-0.txt", "eval.txt"):
        s3_server.put(name, TEXT)
    pattern = s3_server.bucket_url + "train-*.txt"
    names = fl.Dataset.list_files(pattern, shuffle=False)
    want = [s3_server.bucket_url + f"train-{k}.txt" for k in (0, 1)]
    assert [n.decode() for n in names] == want
    ds = fl.TextLineDataset(names, num_parallel_reads=2)
    assert list(ds) == [line for line in LINES for _ in range(2)]
    assert_state_roundtrip(fl.TextLineDataset(want), cut_points=(1, 3, 5))


@pytest.mark.parametrize(
    ("compression", "compress"), [("", bytes), ("GZIP", gzip.compress), ("ZLIB", zlib.compress)]
)
def test_text_lines_over_http(http_server: HttpServer, compression: str, compress: object) -> None:
    assert callable(compress)
    (http_server.root / "lines.txt").write_bytes(compress(TEXT))
    ds = fl.TextLineDataset(http_server.url + "lines.txt", compression_type=compression)
    assert list(ds) == LINES
    assert_state_roundtrip(ds, cut_points=(1, 2))


def test_a_missing_url_is_named(http_server: HttpServer) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
        list(fl.TextLineDataset(http_server.url + "absent.txt"))
