"""Fault injection on the files feedline reads: cache files and saved datasets written by
feedline, then damaged at random (bit flips, cuts, insertions, deletions, repeats, lines lost
or swapped) or crafted (records and lines edited with their checksums made right again,
pickles, huge lengths), and iterator states damaged at random.

The guarantee: a damaged file yields exactly the original elements, or the first of them and
then a DataLossError; a crafted file yields elements of the dataset's spec, or the first of
them and then a DataLossError; a damaged state is an InvalidStateError, or resumes exactly at
the element it names. Never another exception, never a hang, never code run from a file.
"""

from __future__ import annotations

import gzip
import json
import pickle
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_elements_equal, take
from tests.ops.test_cache import RECORD, MakesMarker, records_of, rich, with_payloads
from tests.reliability.figures import record

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
SEED = 20260616

PIPELINES: dict[str, Callable[[], fl.Dataset]] = {
    "numbers": lambda: D.range(5),
    "rich": lambda: D.range(6).map(rich),
    "batches": lambda: D.from_tensor_slices(
        {"x": np.arange(16, dtype=np.float32).reshape(8, 2), "s": [b"ab", b"c"] * 4}
    ).batch(3),
}


# -- random damage ----------------------------------------------------------------------------


def damage(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """``data`` damaged one random way, and how (to reproduce a failure)."""
    size = len(data)
    pos = rng.randrange(size)
    kind = rng.choice(["bit", "bytes", "cut", "insert", "delete", "overwrite", "repeat", "append"])
    if kind == "bit":
        bit = rng.randrange(8)
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :], f"bit {bit} of {pos}"
    if kind == "bytes":
        out = bytearray(data)
        spots = rng.sample(range(size), min(size, rng.randint(2, 6)))
        for spot in spots:
            out[spot] = rng.randrange(256)
        return bytes(out), f"bytes at {sorted(spots)}"
    if kind == "cut":
        return data[:pos], f"cut to {pos}"
    junk = rng.randbytes(rng.randint(1, 16))
    if kind == "insert":
        return data[:pos] + junk + data[pos:], f"{len(junk)} bytes inserted at {pos}"
    if kind == "overwrite":
        return data[:pos] + junk + data[pos + len(junk) :], f"{len(junk)} bytes written at {pos}"
    if kind == "append":
        return data + junk, f"{len(junk)} bytes appended"
    end = min(size, pos + rng.randint(1, 64))
    if kind == "delete":
        return data[:pos] + data[end:], f"bytes {pos}:{end} deleted"
    at = rng.randrange(size)
    return data[:at] + data[pos:end] + data[at:], f"bytes {pos}:{end} repeated at {at}"


def read_all(ds: fl.Dataset, state: dict[str, Any] | None, how: str) -> tuple[list[Any], bool]:
    """What a pass (resumed from ``state``) yields, and whether it ended without DataLossError;
    any other exception fails the test, naming the damage. A state that does not fit the
    damaged file may be refused too: the reader cannot tell which of the two changed."""
    got: list[Any] = []
    expected: tuple[type[Exception], ...] = (fl.DataLossError,)
    if state is not None:
        expected += (fl.InvalidStateError,)
    try:
        with ds.iterator(state) as it:
            got.extend(it)
    except expected:
        return got, False
    except Exception as e:
        raise AssertionError(f"{how}: {type(e).__name__}: {e}") from e
    return got, True


def assert_original(got: list[Any], complete: bool, want: list[Any], how: str) -> None:
    try:
        if complete:
            assert len(got) == len(want), f"{len(got)} elements without an error, not {len(want)}"
        assert_elements_equal(got, want[: len(got)])
    except AssertionError as e:
        raise AssertionError(f"{how}: {e}") from e


def off_spec(element: Any, spec: Any) -> str | None:
    """Where ``element`` is not of ``spec`` (nesting, leaf types, dtypes, ranks), or None;
    written apart from feedline's own check, which is under test."""
    if isinstance(spec, dict):
        if not isinstance(element, dict) or element.keys() != spec.keys():
            return f"{element!r:.60} for a dict of {sorted(spec)}"
        return next((p for k in spec if (p := off_spec(element[k], spec[k]))), None)
    if isinstance(spec, tuple):
        if type(element) is not type(spec) or len(element) != len(spec):
            return f"{element!r:.60} for a {type(spec).__name__} of {len(spec)}"
        return next((p for e, s in zip(element, spec) if (p := off_spec(e, s))), None)
    if spec.dtype == object and isinstance(element, bytes):
        rank = 0
    elif spec.dtype == object:
        if not isinstance(element, np.ndarray) or not all(
            isinstance(v, bytes) for v in element.flat
        ):
            return f"{element!r:.60} for strings"
        rank = element.ndim
    elif isinstance(element, np.ndarray | np.generic) and element.dtype == spec.dtype:
        rank = element.ndim
    else:
        return f"{element!r:.60} for {spec}"
    return None if spec.shape is None or rank == len(spec.shape) else f"rank {rank}, {spec}"


def assert_of_spec(got: list[Any], spec: Any, how: str) -> None:
    for i, element in enumerate(got):
        problem = off_spec(element, spec)
        assert problem is None, f"{how}: element {i} is not of the spec: {problem}"


def state_at(ds: fl.Dataset, cut: int) -> dict[str, Any]:
    with ds.iterator() as it:
        take(it, cut)
        state: dict[str, Any] = json.loads(json.dumps(it.get_state()))
    return state


# -- cache files ------------------------------------------------------------------------------

CACHE_DAMAGES = 300  # per pipeline
CACHE_CRAFTS = 120  # per pipeline


# Where a file's records are: (offset, payload length) of each.
Layout = Callable[[bytes], list[tuple[int, int]]]


def saved_records(data: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of each record of a saved dataset's data file: framed records
    as a cache file's, from its first byte to its last."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos + RECORD.size <= len(data):
        _, length, _ = RECORD.unpack_from(data, pos)
        out.append((pos, length))
        pos += RECORD.size + length
    return out


def span(rng: random.Random, data: bytes, layout: Layout) -> tuple[bytes, str]:
    """A record's length made to span the next record too (its checksum no longer right): a
    reader that hops over records without reading them lands on a real record."""
    records = layout(data)
    index = rng.randrange(len(records) - 1)
    (pos, length), (_, following) = records[index], records[index + 1]
    head = struct.pack("<QQ", index, length + RECORD.size + following)
    return data[:pos] + head + data[pos + 16 :], f"record {index} spans the next"


def craft(rng: random.Random, data: bytes, marker: Path, layout: Layout) -> tuple[bytes, str]:
    """A file whose records were edited, their checksums made right again."""
    records = layout(data)
    index = rng.randrange(len(records))
    pos, length = records[index]
    payload = data[pos + RECORD.size : pos + RECORD.size + length]
    kind = rng.choice(["edit", "edit", "edit", "swap", "pickle", "numbers"])
    if kind == "swap" and len(records) > 1:
        other = rng.randrange(len(records))
        o_pos, o_length = records[other]
        other_payload = data[o_pos + RECORD.size : o_pos + RECORD.size + o_length]
        swapped = {index: other_payload, other: payload}
        return with_payloads(data, swapped, layout), f"records {index} and {other} swapped"
    if kind == "pickle":
        pickled = pickle.dumps(MakesMarker(marker))
        return with_payloads(data, {index: pickled}, layout), "a pickle"
    if kind == "numbers":  # a length or count field made huge
        spot = rng.randrange(0, max(1, length - 8))
        value = rng.choice([2**64 - 1, 2**63, 2**32, 2**40 + 3])
        edited = payload[:spot] + struct.pack("<Q", value) + payload[spot + 8 :]
        return with_payloads(data, {index: edited}, layout), f"record {index}: {value} at {spot}"
    edited, how = damage(rng, payload) if payload else (b"\x00", "filled")
    return with_payloads(data, {index: edited}, layout), f"record {index} payload: {how}"


def test_damaged_and_crafted_cache_files(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    marker = tmp_path / "marker"
    files = mutations = compared = 0
    for name, make in PIPELINES.items():
        path = tmp_path / f"{name}.cache"
        want = list(make())
        list(make().cache(path))
        files += 1
        original = path.read_bytes()
        reader = make().cache(path)  # one dataset for all reads: its spec is found once
        spec = reader.element_spec
        states: list[dict[str, Any] | None] = [None]
        states += [state_at(reader, cut) for cut in (1, len(want) // 2, len(want))]
        for trial in range(CACHE_DAMAGES):
            if trial % 10 == 0:
                data, how = span(rng, original, records_of)
            else:
                data, how = damage(rng, original)
            path.write_bytes(data)
            state = rng.choice(states)
            start = 0 if state is None else state["root"]["index"]
            got, complete = read_all(reader, state, f"{name}: {how}")
            assert_original(got, complete, want[start:], f"{name}: {how}")
            mutations += 1
            compared += len(got)
        for _ in range(CACHE_CRAFTS):
            data, how = craft(rng, original, marker, records_of)
            path.write_bytes(data)
            got, _ = read_all(reader, None, f"{name}: {how}")
            assert_of_spec(got, spec, f"{name}: {how}")
            mutations += 1
            compared += len(got)
        path.write_bytes(original)
        assert_original(*read_all(reader, None, "intact"), want, f"{name}: intact")
    assert not marker.exists(), "reading a cache file ran code from it"
    record("files", files=files, mutations=mutations, elements_compared=compared)


# -- saved datasets ---------------------------------------------------------------------------

SAVE_DAMAGES = 150  # per pipeline and compression
SAVE_CRAFTS = 80


def load_all(
    path: Path, spec: Any, state: dict[str, Any] | None, how: str
) -> tuple[list[Any], bool]:
    """``read_all`` of ``Dataset.load(path)``, which may find damage as it opens, too. Given
    the spec it was saved with, as its namedtuple class is this module's."""
    try:
        ds = D.load(path, element_spec=spec)
    except fl.DataLossError:
        return [], False
    except Exception as e:
        raise AssertionError(f"{how}: {type(e).__name__}: {e}") from e
    return read_all(ds, state, how)


def packed(raw: bytes, compression: Any) -> bytes:
    return gzip.compress(raw, mtime=0) if compression else raw


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_damaged_and_crafted_saved_datasets(tmp_path: Path, compression: Any) -> None:
    rng = random.Random(SEED + (compression is not None))
    marker = tmp_path / "marker"
    files = mutations = compared = 0
    for name, make in PIPELINES.items():
        path = tmp_path / name
        want = list(make())
        make().save(path, compression=compression)
        files += 2
        meta = path / "element_spec.json"
        data = path / ("elements.bin" + (".gz" if compression else ""))
        originals = {meta: meta.read_bytes(), data: data.read_bytes()}
        raw = gzip.decompress(originals[data]) if compression else originals[data]
        spec = make().element_spec
        states: list[dict[str, Any] | None] = [None]
        states += [state_at(D.load(path), cut) for cut in (1, len(want) - 1)]
        for trial in range(SAVE_DAMAGES + SAVE_CRAFTS):
            target = meta if trial % 4 == 0 else data
            crafted = trial >= SAVE_DAMAGES
            if crafted:
                edited, how = craft(rng, raw, marker, saved_records)
                target, damaged = data, packed(edited, compression)
            elif target is data and rng.random() < 0.3:
                # Damage inside the records (a GZIP file's own checks would catch it first).
                edited, how = span(rng, raw, saved_records) if len(want) > 1 else damage(rng, raw)
                damaged = packed(edited, compression)
            else:
                damaged, how = damage(rng, originals[target])
            how = f"{name} {target.name}: {how}"
            target.write_bytes(damaged)
            state = None if crafted else rng.choice(states)
            got, complete = load_all(path, spec, state, how)
            if crafted:
                assert_of_spec(got, spec, how)
            else:
                start = 0 if state is None else state["root"]["index"]
                assert_original(got, complete, want[start:], how)
            target.write_bytes(originals[target])
            mutations += 1
            compared += len(got)
        assert_original(*load_all(path, spec, None, "intact"), want, f"{name}: intact")
    assert not marker.exists(), "loading a saved dataset ran code from it"
    record("files", files=files, mutations=mutations, elements_compared=compared)


# -- iterator states --------------------------------------------------------------------------

STATE_DAMAGES = 150  # per kind of state


def damage_state(rng: random.Random, root: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The root state with one of its own fields removed or given a random value (the states
    of inputs are theirs to check: a nested one is only replaced whole)."""
    field = rng.choice(sorted(root))
    out = dict(root)
    if rng.random() < 0.15:
        del out[field]
        return out, f"{field} removed"
    value = root[field]
    choices: list[Any] = [None, "x", [], {}, True, 3.5, -1, 0, 1, 2, 10**9, [value]]
    if isinstance(value, int):
        choices += [value - 1, value + 1, value * 2]
    if field == "mode":
        choices += ["read", "write", "pass"]
    out[field] = rng.choice(choices)
    return out, f"{field} = {out[field]!r}"


def resume(ds: fl.Dataset, state: dict[str, Any], want: list[Any], how: str) -> int:
    """Restore ``state``: an InvalidStateError, or exactly the elements after its index."""
    got: list[Any] = []
    try:
        with ds.iterator(state) as it:
            got.extend(it)
    except fl.InvalidStateError:
        return 0
    except Exception as e:
        raise AssertionError(f"{how}: {type(e).__name__}: {e}") from e
    index = state["root"]["index"]
    assert_original(got, True, want[index:], f"{how} (resumed at {index})")
    return len(got)


def test_damaged_states(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    want = list(D.range(7))
    D.range(7).save(tmp_path / "plain")
    D.range(7).save(tmp_path / "gzip", compression="GZIP")
    list(D.range(7).cache(tmp_path / "cache"))

    def memory_read() -> fl.Dataset:
        ds = D.range(7).cache()
        list(ds)
        return ds

    kinds: dict[str, Callable[[], fl.Dataset]] = {
        "cache writing": lambda: D.range(7).cache(),
        "cache reading": memory_read,
        "file cache reading": lambda: D.range(7).cache(tmp_path / "cache"),
        "load": lambda: D.load(tmp_path / "plain"),
        "load GZIP": lambda: D.load(tmp_path / "gzip"),
    }
    states = compared = 0
    for kind, make in kinds.items():
        ds = make()
        originals = [state_at(ds, cut) for cut in (0, 1, 4, 7)]
        for _ in range(STATE_DAMAGES):
            state = rng.choice(originals)
            root, how = damage_state(rng, state["root"])
            compared += resume(make(), {**state, "root": root}, want, f"{kind}: {how}")
            states += 1
    assert not list(tmp_path.glob("cache.tmp*"))
    record("files", states=states, elements_compared=compared)
