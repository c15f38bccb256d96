"""TarShardDataset and TarShardWriter: WebDataset's conventions, checked with tarfile (and with
webdataset itself where it is installed)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

import feedline as fl
from tests.helpers import assert_state_rejected, assert_state_roundtrip, saved_state
from tests.io.conftest import HttpServer, S3Server

pytestmark = pytest.mark.timeout(60)


def samples(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"__key__": f"s/{i:05d}", "jpg": bytes([i % 256]) * (i * 37 % 900), "cls": i}
        for i in range(start, start + n)
    ]


def as_read(sample: dict[str, Any]) -> dict[str, bytes]:
    """What a reader gives back for a written sample."""
    return {
        k: v.encode() if isinstance(v, str) else str(v).encode() if isinstance(v, int) else v
        for k, v in sample.items()
    }


def write_shard(path: Path, items: list[dict[str, Any]]) -> str:
    with fl.io.TarShardWriter(str(path)) as writer:
        for sample in items:
            writer.write(sample)
    return str(path)


def hand_made(path: Path, members: list[tuple[str, bytes | None]]) -> str:
    """A tar with these members in this order (None: a directory)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return str(path)


def keys(ds: fl.Dataset) -> list[bytes]:
    return [s["__key__"] for s in ds]


# -- the WebDataset convention ------------------------------------------------------------------


def test_written_samples_read_back(tmp_path: Path) -> None:
    items = samples(20)
    path = write_shard(tmp_path / "a.tar", items)
    assert list(fl.io.TarShardDataset(path)) == [as_read(s) for s in items]
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names[:2] == ["s/00000.jpg", "s/00000.cls"]
        assert tar.extractfile("s/00003.cls").read() == b"3"  # type: ignore[union-attr]


def test_the_same_samples_make_the_same_bytes(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a.tar", samples(5))
    b = write_shard(tmp_path / "b.tar", samples(5))
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_keys_and_extensions_follow_webdataset(tmp_path: Path) -> None:
    path = hand_made(
        tmp_path / "a.tar",
        [
            ("__meta__", b"skipped: metadata"),
            ("dir", None),
            ("dir/a.seg.PNG", b"1"),  # key up to the first dot, extension lower-cased
            ("dir/a.txt", b"2"),
            ("README", b"skipped: no extension"),
            ("dir/x.y/c.seg.png", b"3"),  # dots in directories belong to the key
            ("dir/x.y/c.txt", b"4"),
        ],
    )
    assert list(fl.io.TarShardDataset(path)) == [
        {"__key__": b"dir/a", "seg.png": b"1", "txt": b"2"},
        {"__key__": b"dir/x.y/c", "seg.png": b"3", "txt": b"4"},
    ]


def test_reads_what_webdataset_reads(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    path = hand_made(
        tmp_path / "a.tar",
        [("dir/a.seg.PNG", b"1"), ("dir/a.txt", b"2"), ("README", b"x"), ("dir/b.txt", b"3")],
    )
    theirs = [(s["__key__"].encode(), s["txt"]) for s in wds.WebDataset(path, shardshuffle=False)]
    ours = [(s["__key__"], s["txt"]) for s in fl.io.TarShardDataset(path, extensions=["txt"])]
    assert ours == theirs == [(b"dir/a", b"2"), (b"dir/b", b"3")]
    # ...and webdataset reads what the writer wrote.
    written = write_shard(tmp_path / "b.tar", samples(4))
    got = [(s["__key__"], s["jpg"], s["cls"]) for s in wds.WebDataset(written, shardshuffle=False)]
    want = [as_read(s) for s in samples(4)]
    assert got == [(s["__key__"].decode(), s["jpg"], s["cls"]) for s in want]


def test_extensions_from_the_first_sample_and_a_sample_with_others(tmp_path: Path) -> None:
    path = hand_made(
        tmp_path / "a.tar",
        [("a.jpg", b"1"), ("a.cls", b"0"), ("b.jpg", b"2"), ("c.jpg", b"3"), ("c.cls", b"1")],
    )
    ds = fl.io.TarShardDataset(path)
    assert sorted(ds.element_spec) == ["__key__", "cls", "jpg"]
    with ds.iterator() as it:
        assert next(it)["__key__"] == b"a"
        with pytest.raises(
            ValueError, match=r"sample 'b' at byte 2048 has the extensions \['jpg'\]"
        ):
            next(it)
        assert next(it)["__key__"] == b"c"  # the sample after it is read on
    # Declared: every sample has them, the others are dropped.
    assert list(fl.io.TarShardDataset(path, extensions=["JPG"])) == [
        {"__key__": k, "jpg": v} for k, v in [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]
    ]
    with pytest.raises(ValueError, match="sample 'b'"):
        list(fl.io.TarShardDataset(path, extensions=["jpg", "cls"]))


def test_a_repeated_extension_in_a_sample_is_an_error(tmp_path: Path) -> None:
    path = hand_made(tmp_path / "a.tar", [("a.jpg", b"1"), ("a.jpg", b"2"), ("b.jpg", b"3")])
    with fl.io.TarShardDataset(path).iterator() as it:
        with pytest.raises(ValueError, match=r"more than one member with extension \['jpg'\]"):
            next(it)
        assert next(it)["__key__"] == b"b"


def test_shards_in_order_a_dataset_of_paths_and_compressed_shards(tmp_path: Path) -> None:
    first = write_shard(tmp_path / "a.tar", samples(3))
    empty = hand_made(tmp_path / "b.tar", [])
    raw = Path(write_shard(tmp_path / "c.tar", samples(4, 3))).read_bytes()
    zipped = tmp_path / "c.tar.gz"
    zipped.write_bytes(gzip.compress(raw))
    Path(tmp_path / "c.tar").unlink()
    want = [as_read(s) for s in samples(7)]
    assert list(fl.io.TarShardDataset([first, empty, str(zipped)])) == want
    files = fl.Dataset.list_files(str(tmp_path / "*"), shuffle=False)
    assert list(fl.io.TarShardDataset(files)) == want
    assert_state_roundtrip(fl.io.TarShardDataset(files), cut_points=(0, 2, 3, 5))


# -- damage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut, offset, before",
    [
        # The sample being read when the damage is found is dropped: it may have had more.
        pytest.param(2048, 2048, [b"a"], id="no-end-marker"),
        pytest.param(560, 0, [], id="inside-data"),
        pytest.param(700, 1024, [], id="inside-padding"),
        pytest.param(1200, 1024, [], id="inside-a-header"),
        pytest.param(1024, 1024, [], id="at-a-member-boundary"),
    ],
)
def test_a_truncated_shard_is_data_loss_naming_file_and_byte(
    tmp_path: Path, cut: int, offset: int, before: list[bytes]
) -> None:
    members = [("a.txt", b"x" * 100), ("b.txt", b"y" * 100)]
    path = hand_made(tmp_path / "a.tar", members)
    Path(path).write_bytes(Path(path).read_bytes()[:cut])
    got = []
    with pytest.raises(fl.io.DataLossError, match=rf"a\.tar: .*at byte {offset}\b"):
        for sample in fl.io.TarShardDataset(path, extensions=["txt"]):
            got.append(sample["__key__"])
    assert got == before


def test_a_damaged_header_is_data_loss(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "a.tar", samples(6))
    raw = bytearray(Path(path).read_bytes())
    state = saved_state(fl.io.TarShardDataset(path), 3)["root"]
    raw[state["offset"] + 10] ^= 0xFF  # in the name of sample 3's first member
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(fl.io.DataLossError, match=rf"at byte {state['offset']}"):
        keys(fl.io.TarShardDataset(path))
    # ignore_errors goes on with the next shard.
    other = write_shard(tmp_path / "b.tar", samples(2, 10))
    got = keys(fl.io.TarShardDataset([path, other]).ignore_errors())
    # Sample 2 is dropped with the damage: the damaged header might have been one of its own.
    assert got == [b"s/00000", b"s/00001", b"s/00010", b"s/00011"]


def test_a_missing_shard_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        fl.io.TarShardDataset(str(tmp_path / "nope.tar"))
    first = write_shard(tmp_path / "a.tar", samples(2))
    ds = fl.io.TarShardDataset([first, str(tmp_path / "nope.tar"), first])
    with pytest.raises(FileNotFoundError, match="nope"):
        keys(ds)
    assert keys(ds.ignore_errors()) == keys(fl.io.TarShardDataset([first, first]))


# -- state and splitting ----------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    raw = Path(write_shard(tmp_path / "c.tar", samples(5, 20))).read_bytes()
    (tmp_path / "c.tar.gz").write_bytes(gzip.compress(raw))
    return [
        write_shard(tmp_path / "a.tar", samples(6)),
        hand_made(tmp_path / "b.tar", []),
        str(tmp_path / "c.tar.gz"),
        write_shard(tmp_path / "d.tar", samples(1, 40)),
    ]


def test_state_roundtrip_across_shards(shards: list[str]) -> None:
    ds = fl.io.TarShardDataset(shards)
    assert_state_roundtrip(ds, cut_points=range(13))
    assert_state_roundtrip(ds.batch(5), cut_points=range(4))


def test_a_resume_seeks_to_its_sample(shards: list[str]) -> None:
    ds = fl.io.TarShardDataset(shards)
    state = saved_state(ds, 4)
    assert state["root"]["shard"] == 0 and state["root"]["key"] == "s/00004"
    raw = bytearray(Path(shards[0]).read_bytes())
    raw[:512] = b"\xff" * 512  # the first header, never read again by the resumed pass
    Path(shards[0]).write_bytes(bytes(raw))
    with ds.iterator(state) as it:
        assert [s["__key__"] for s in it][:3] == [b"s/00004", b"s/00005", b"s/00020"]


@pytest.mark.parametrize(
    "field, value, refused",
    [
        ("shard", 5, "shard"),
        ("shard", -1, "shard"),
        ("offset", 100, "offset"),
        ("offset", 512, "offset"),  # a member of the first sample, not a sample's start
        ("offset", 512 * 10**6, "offset"),
        ("key", "s/00009", "offset"),
        ("key", None, "key"),
        ("key", 3, "key"),
    ],
)
def test_crafted_states_are_refused(
    shards: list[str], field: str, value: Any, refused: str
) -> None:
    ds = fl.io.TarShardDataset(shards)
    state = saved_state(ds, 2)
    state["root"][field] = value
    assert_state_rejected(ds, state, refused)
    del state["root"][field]
    assert_state_rejected(ds, state, field)


def test_shard_keyword_splits_by_file(shards: list[str]) -> None:
    ds = fl.io.TarShardDataset(shards)
    parts = [keys(fl.io.TarShardDataset(shards, shard=(2, i))) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(keys(ds))
    assert parts[1] == [b"s/00040"]  # shards 1 (empty) and 3
    with pytest.raises(ValueError, match=r"there are 4 shards: use \.shard\(n, i\)"):
        fl.io.TarShardDataset(shards, shard=(5, 0))
    assert keys(ds.shard(3, 2)) == keys(ds)[2::3]


# -- the writer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample, error",
    [
        ({"jpg": b""}, "needs a '__key__'"),
        ({"__key__": "a.b", "jpg": b""}, "without a dot"),
        ({"__key__": "", "jpg": b""}, "without a dot"),
        ({"__key__": "a"}, "no member"),
        ({"__key__": "a", "JPG": b""}, "lower case"),
        ({"__key__": "a", "_x": b""}, "not starting"),
        ({"__key__": "a", "x/y": b""}, "no '/'"),
        ({"__key__": "a", "npy": 1.5}, "bytes, str or int"),
    ],
)
def test_the_writer_refuses_what_would_not_read_back(
    tmp_path: Path, sample: dict[str, Any], error: str
) -> None:
    with (
        fl.io.TarShardWriter(tmp_path / "a.tar") as writer,
        pytest.raises((ValueError, TypeError), match=error),
    ):
        writer.write(sample)


def test_the_writer_refuses_a_repeated_key_and_writes_after_close(tmp_path: Path) -> None:
    writer = fl.io.TarShardWriter(tmp_path / "a.tar")
    writer.write({"__key__": b"k", "txt": "1"})
    with pytest.raises(ValueError, match="merge"):
        writer.write({"__key__": "k", "txt": "2"})
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write({"__key__": "j", "txt": "2"})
    assert list(fl.io.TarShardDataset(str(tmp_path / "a.tar"))) == [{"__key__": b"k", "txt": b"1"}]


# -- URLs ---------------------------------------------------------------------------------------


def shard_bytes(tmp_path: Path) -> bytes:
    return Path(write_shard(tmp_path / "local.tar", samples(8))).read_bytes()


def check_url(url: str) -> None:
    ds = fl.io.TarShardDataset(url)
    assert list(ds) == [as_read(s) for s in samples(8)]
    assert_state_roundtrip(ds, cut_points=(0, 3, 7))


def test_memory_url_written_and_read(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    url = "memory://feedline-test/a.tar"
    try:
        write_shard(url, samples(8))  # type: ignore[arg-type]
        check_url(url)
    finally:
        fsspec.filesystem("memory").rm("/feedline-test", recursive=True)


def test_http_url(tmp_path: Path, http_server: HttpServer) -> None:
    (http_server.root / "a.tar").write_bytes(shard_bytes(tmp_path))
    check_url(http_server.url + "a.tar")


def test_s3_url(tmp_path: Path, s3_server: S3Server) -> None:
    s3_server.put("a.tar", shard_bytes(tmp_path))
    check_url(s3_server.bucket_url + "a.tar")
