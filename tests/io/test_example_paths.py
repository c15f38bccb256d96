"""parse_example's two paths (Example by Example, and a batch at once in numpy) and its
inputs: on the same random Examples they give the same arrays, equal to TensorFlow's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from feedline.errors import DataLossError
from feedline.io import example as example_module
from feedline.io.example import FixedLenFeature, VarLenFeature, encode_example, parse_example
from tests.helpers import assert_element_equal
from tests.io.test_example import entry, field, random_case, sparse_rows, tf_module, tf_spec

pytestmark = pytest.mark.timeout(120)


def parsed_both_ways(
    monkeypatch: pytest.MonkeyPatch, batch: Any, features: dict[str, Any]
) -> dict[str, Any]:
    """The batch parsed by each path (the threshold moved to force it): asserted equal."""
    monkeypatch.setattr(example_module, "_BATCH_PATH", 10**9)
    by_example = parse_example(batch, features)
    monkeypatch.setattr(example_module, "_BATCH_PATH", 1)
    at_once = parse_example(batch, features)
    assert list(by_example) == list(at_once) == list(features)
    for name in features:
        assert_element_equal(
            by_example[name]
            if isinstance(by_example[name], np.ndarray)
            else tuple(by_example[name]),
            at_once[name] if isinstance(at_once[name], np.ndarray) else tuple(at_once[name]),
            name,
        )
    return at_once


def test_both_paths_equal_tensorflow_at_every_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    tf = tf_module()
    rng = np.random.default_rng(11)
    for trial in range(40):
        batch = int(rng.integers(1, 80))
        examples, features = random_case(rng, tf, batch)
        spec = {k: tf_spec(tf, f) for k, f in features.items()}
        want = tf.io.parse_example(tf.constant(examples, dtype=tf.string), spec)
        got = parsed_both_ways(monkeypatch, examples, features)
        for name, feature in features.items():
            where = f"trial {trial}, {name}"
            if isinstance(feature, VarLenFeature):
                for r, row in enumerate(sparse_rows(want[name], batch)):
                    assert_element_equal(got[name][r], row, f"{where}, row {r}")
            else:
                assert_element_equal(got[name], want[name].numpy(), where)


def test_a_batch_as_the_batch_op_gives_it_or_as_other_bytes_likes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An object array of bytes (what ``batch`` makes of records), a list with
    ``bytearray``, ``np.bytes_`` and ``memoryview`` items, and a tuple parse alike."""
    examples = [encode_example({"i": i, "f": [i / 2, 1.0], "s": f"#{i}"}) for i in range(70)]
    features = {
        "i": FixedLenFeature([], "int64"),
        "f": FixedLenFeature([2], "float32"),
        "s": VarLenFeature("string"),
    }
    want = parsed_both_ways(monkeypatch, examples, features)
    as_array = np.empty(len(examples), dtype=object)
    as_array[:] = examples
    mixed: list[Any] = list(examples)
    mixed[1], mixed[2], mixed[3] = bytearray(mixed[1]), np.bytes_(mixed[2]), memoryview(mixed[3])
    for batch in (as_array, mixed, tuple(examples)):
        got = parsed_both_ways(monkeypatch, batch, features)
        for name in features:
            assert_element_equal(
                got[name] if name != "s" else tuple(got[name]),
                want[name] if name != "s" else tuple(want[name]),
                name,
            )
    assert want["i"].tolist() == list(range(70))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"i": [1, 2], "f": [1.0, 2.0]}, "Number of int64 values != expected"),
        ({"i": 3, "f": [1.0]}, "Number of float values != expected"),
        ({"i": 3, "f": np.zeros(0, np.float32)}, "Number of float values != expected"),
        ({"i": [], "f": [1.0, 2.0]}, "Number of int64 values != expected"),
    ],
)
def test_a_wrong_count_in_a_large_batch_is_named_as_tensorflow_names_it(
    bad: dict[str, Any], message: str
) -> None:
    """The fixed-size fast paths leave any other count to the Example-by-Example walk."""
    tf = tf_module()
    features = {"i": FixedLenFeature([], "int64"), "f": FixedLenFeature([2], "float32")}
    batch = [encode_example({"i": -(2**63) + k, "f": [k / 2, -k / 2]}) for k in range(80)]
    batch.append(encode_example(bad))
    spec = {k: tf_spec(tf, f) for k, f in features.items()}
    with pytest.raises(Exception, match=message.split(" != ")[0]):
        tf.io.parse_example(tf.constant(batch, dtype=tf.string), spec)
    with pytest.raises(ValueError, match=message):
        parse_example(batch, features)
    got = parse_example(batch[:80], features)
    assert got["i"].tolist() == [-(2**63) + k for k in range(80)]
    assert got["f"][:, 1].tolist() == [-k / 2 for k in range(80)]


@pytest.mark.parametrize("rows", [2, 80])
def test_a_truncated_varint_is_data_loss_not_a_number_of_the_next_example(rows: int) -> None:
    """A packed int64 run cut inside a varint must not run on into the next Example's run
    (it did: [[], [129]] out of b"\\x81" and b"\\x01"), on either path; TensorFlow refuses it."""
    tf = tf_module()
    cut = field(0x0A, entry(b"v", field(0x1A, field(0x0A, b"\x81"))))
    two_runs = field(0x0A, entry(b"v", field(0x1A, field(0x0A, b"\x81") + field(0x0A, b"\x01"))))
    for bad in (cut, two_runs):
        batch = [bad] + [encode_example({"v": [1]})] * (rows - 1)
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.parse_example(batch, {"v": tf.io.VarLenFeature(tf.int64)})
        with pytest.raises(DataLossError, match=r"could not parse Example 0.*truncated varint"):
            parse_example(batch, {"v": VarLenFeature("int64")})
