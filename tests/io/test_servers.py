"""The object-store fixtures work through the readers' own way of opening files."""

from __future__ import annotations

import pytest

from feedline.io import fs
from tests.io.conftest import HttpServer, S3Server

pytestmark = pytest.mark.timeout(60)

DATA = bytes(range(256)) * 40


def test_http_server_serves_files_with_ranges(http_server: HttpServer) -> None:
    (http_server.root / "sub").mkdir()
    (http_server.root / "sub" / "blob.bin").write_bytes(DATA)
    url = http_server.url + "sub/blob.bin"
    assert fs.exists(url)
    assert fs.file_size(url) == len(DATA)
    with fs.open_binary(url) as f:
        f.seek(1000)  # a range request: the reader resumes mid-file this way
        assert f.read(300) == DATA[1000:1300]
        f.seek(0)
        assert f.read() == DATA


def test_http_server_missing_file(http_server: HttpServer) -> None:
    url = http_server.url + "absent.bin"
    assert not fs.exists(url)
    with pytest.raises(FileNotFoundError, match=r"absent\.bin"):
        fs.open_binary(url)


def test_s3_server_put_and_read(s3_server: S3Server) -> None:
    s3_server.put("dir/blob.bin", DATA)
    url = s3_server.bucket_url + "dir/blob.bin"
    assert fs.exists(url)
    assert fs.file_size(url) == len(DATA)
    assert fs.glob([s3_server.bucket_url + "dir/*.bin"]) == [url]
    with fs.open_binary(url) as f:
        f.seek(2000)
        assert f.read(10) == DATA[2000:2010]
    with pytest.raises(FileNotFoundError, match=r"absent\.bin"):
        fs.open_binary(s3_server.bucket_url + "absent.bin")


def test_s3_server_starts_empty(s3_server: S3Server) -> None:
    # A second server in the same process: nothing of the previous test's bucket survives.
    assert fs.glob([s3_server.bucket_url + "*"]) == []
