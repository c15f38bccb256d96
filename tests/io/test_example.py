"""tf.train.Example parsing and encoding, compared with TensorFlow's on random Examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.io import example as example_module
from feedline.io.example import (
    FixedLenFeature,
    VarLenFeature,
    encode_example,
    parse_example,
    parse_single_example,
)
from feedline.io.tfrecord import TFRecordWriter
from tests.helpers import assert_element_equal

pytestmark = pytest.mark.timeout(120)

KINDS = ["int64", "float32", "string"]
NUMPY = {"int64": np.int64, "float32": np.float32, "string": object}


def tf_module() -> Any:
    return pytest.importorskip("tensorflow")


def random_values(rng: np.random.Generator, kind: str, n: int) -> list[Any]:
    if kind == "int64":
        if rng.random() < 0.3:  # ten-byte varints: negatives and the extremes
            return [int(v) for v in rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)]
        return [int(v) for v in rng.integers(0, 300, n)]
    if kind == "float32":
        return [float(v) for v in rng.standard_normal(n).astype(np.float32)]
    return [rng.bytes(int(rng.integers(0, 40))) for _ in range(n)]


def tf_example(tf: Any, values: dict[str, tuple[str, list[Any]]]) -> bytes:
    def feature(kind: str, v: list[Any]) -> Any:
        if kind == "int64":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=v))
        if kind == "float32":
            return tf.train.Feature(float_list=tf.train.FloatList(value=v))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))

    features = {k: feature(kind, v) for k, (kind, v) in values.items()}
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return bytes(example.SerializeToString())


def tf_spec(tf: Any, feature: Any) -> Any:
    dtype = {"int64": tf.int64, "float32": tf.float32, "string": tf.string}[feature.dtype]
    if isinstance(feature, VarLenFeature):
        return tf.io.VarLenFeature(dtype)
    return tf.io.FixedLenFeature(feature.shape, dtype, feature.default_value)


def as_numpy(value: Any) -> Any:
    """TensorFlow's output as feedline gives it: a SparseTensor of one example's row as a
    1-D array, tensors as ``.numpy()``."""
    if hasattr(value, "indices"):
        return value.values.numpy()
    return value.numpy()


def sparse_rows(value: Any, rows: int) -> list[np.ndarray]:
    values = value.values.numpy()
    row_of = value.indices.numpy()[:, 0]
    return [values[row_of == r] for r in range(rows)]


def random_case(
    rng: np.random.Generator, tf: Any, batch: int
) -> tuple[list[bytes], dict[str, Any]]:
    """Examples with five features of random kinds, each fixed-length or not, sometimes
    missing (then with a default where fixed)."""
    features: dict[str, Any] = {}
    plans = []
    for i in range(5):
        kind = KINDS[int(rng.integers(0, 3))]
        if rng.random() < 0.5:
            features[f"v{i}"] = VarLenFeature(kind)
            plans.append((f"v{i}", kind, None, 0.7))
            continue
        shape = [[], [3], [2, 2]][int(rng.integers(0, 3))]
        size = int(np.prod(shape))
        default = None
        if rng.random() < 0.5:
            default = np.array(random_values(rng, kind, size), dtype=NUMPY[kind]).reshape(shape)
            default = default.tolist() if shape else default[()]
        features[f"f{i}"] = FixedLenFeature(shape, kind, default)
        plans.append((f"f{i}", kind, size, 0.6 if default is not None else 1.0))
    examples = []
    for _ in range(batch):
        values = {}
        for name, kind, size, present in plans:
            if rng.random() < present:
                n = size if size is not None else int(rng.integers(0, 5))
                values[name] = (kind, random_values(rng, kind, n))
        examples.append(tf_example(tf, values))
    return examples, features


def test_parse_example_equals_tensorflows_on_random_examples() -> None:
    tf = tf_module()
    rng = np.random.default_rng(0)
    for trial in range(60):
        # Small batches are parsed Example by Example, larger ones all at once.
        batch = int(rng.integers(0, 6) if trial % 2 else rng.integers(64, 100))
        examples, features = random_case(rng, tf, batch)
        spec = {k: tf_spec(tf, f) for k, f in features.items()}
        want = tf.io.parse_example(tf.constant(examples, dtype=tf.string), spec)
        got = parse_example(examples, features)
        assert list(got) == list(features)
        for name, feature in features.items():
            where = f"trial {trial}, {name}"
            if isinstance(feature, VarLenFeature):
                assert len(got[name]) == batch
                for r, row in enumerate(sparse_rows(want[name], batch)):
                    assert_element_equal(got[name][r], row, f"{where}, row {r}")
            else:
                assert_element_equal(got[name], want[name].numpy(), where)


def test_parse_single_example_equals_tensorflows_on_random_examples() -> None:
    tf = tf_module()
    rng = np.random.default_rng(1)
    for trial in range(60):
        (example,), features = random_case(rng, tf, 1)
        spec = {k: tf_spec(tf, f) for k, f in features.items()}
        want = tf.io.parse_single_example(example, spec)
        got = parse_single_example(example, features)
        for name in features:
            assert_element_equal(got[name], as_numpy(want[name]), f"trial {trial}, {name}")


def test_scalars_come_out_as_tensorflows_numpy_gives_them() -> None:
    serialized = encode_example({"i": 3, "f": 0.5, "s": "text"})
    got = parse_single_example(
        serialized,
        {
            "i": FixedLenFeature([], np.int64),
            "f": FixedLenFeature((), np.float32),
            "s": FixedLenFeature([], np.bytes_),
        },
    )
    assert type(got["i"]) is np.int64 and got["i"] == 3
    assert type(got["f"]) is np.float32 and got["f"] == 0.5
    assert got["s"] == b"text"


def test_encode_example_reads_in_tensorflow_as_its_own() -> None:
    tf = tf_module()
    values = {
        "int": 7,
        "bool": True,
        "ints": [1, -2, 2**63 - 1],
        "array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "float": 1.5,
        "floats": np.array([0.25, np.inf], dtype=np.float64),
        "bytes": b"\x00\xff",
        "strings": ["a", b"b"],
        "empty_floats": np.zeros(0, dtype=np.float32),
        "empty": [],
    }
    mine = tf.train.Example.FromString(encode_example(values))
    want = tf.train.Example(
        features=tf.train.Features(
            feature={
                "int": tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
                "bool": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
                "ints": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, -2, 2**63 - 1])),
                "array": tf.train.Feature(int64_list=tf.train.Int64List(value=range(6))),
                "float": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5])),
                "floats": tf.train.Feature(float_list=tf.train.FloatList(value=[0.25, np.inf])),
                "bytes": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x00\xff"])),
                "strings": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a", b"b"])),
                "empty_floats": tf.train.Feature(float_list=tf.train.FloatList(value=[])),
                "empty": tf.train.Feature(int64_list=tf.train.Int64List(value=[])),
            }
        )
    )
    assert mine == want
    with pytest.raises(TypeError, match="mixed"):
        encode_example({"mixed": [1, b"x"]})


def test_encode_then_parse_round_trips() -> None:
    rng = np.random.default_rng(2)
    for _ in range(30):
        values = {
            "i": rng.integers(-(2**40), 2**40, int(rng.integers(0, 6))),
            "f": rng.standard_normal(4).astype(np.float32),
            "s": [rng.bytes(int(rng.integers(0, 9))) for _ in range(3)],
        }
        got = parse_single_example(
            encode_example(values),
            {
                "i": VarLenFeature("int64"),
                "f": FixedLenFeature([2, 2], "float32"),
                "s": FixedLenFeature([3], "string"),
            },
        )
        assert_element_equal(got["i"], values["i"].astype(np.int64))
        assert_element_equal(got["f"], values["f"].reshape(2, 2))
        assert_element_equal(got["s"], np.array(values["s"], dtype=object))


# -- errors, as TensorFlow's ----------------------------------------------------------------


@pytest.mark.parametrize(
    "values, feature, message",
    [
        ({}, FixedLenFeature([], "int64"), "Feature: x .* is required but could not be found"),
        ({"x": [1.0]}, FixedLenFeature([], "int64"), "Data types don't match.*float.*int64"),
        ({"x": [1, 2]}, FixedLenFeature([3], "int64"), "Values size: 2 but output shape: \\[3\\]"),
        ({"x": [b"a"]}, VarLenFeature("float32"), "Data types don't match"),
    ],
)
def test_schema_mismatches_fail_as_in_tensorflow(
    values: dict[str, Any], feature: Any, message: str
) -> None:
    tf = tf_module()
    serialized = encode_example(values)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.parse_single_example(serialized, {"x": tf_spec(tf, feature)})
    with pytest.raises(ValueError, match=message):
        parse_single_example(serialized, {"x": feature})


def test_bad_features_and_dtypes() -> None:
    with pytest.raises(TypeError, match="dtype"):
        parse_example([], {"x": FixedLenFeature([], np.int32)})
    with pytest.raises(TypeError, match="FixedLenFeature or VarLenFeature"):
        parse_example([], {"x": "int64"})
    with pytest.raises(ValueError, match="fully defined"):
        parse_example([], {"x": FixedLenFeature([-1], "int64")})
    with pytest.raises(ValueError):  # a default of the wrong size, as tf's reshape refuses
        parse_example([], {"x": FixedLenFeature([2], "int64", default_value=[1, 2, 3])})


@pytest.mark.parametrize("damage", [b"\x0a\x05\x0a\x03", b"\x0a\xff", b"\x0b", b"\x0a\x02\x0a\x05"])
def test_bytes_that_are_not_an_example_are_data_loss(damage: bytes) -> None:
    with pytest.raises(fl.DataLossError, match="could not parse Example 1"):
        parse_example([encode_example({"x": 1}), damage], {"x": VarLenFeature("int64")})


def test_a_large_batch_of_empty_examples() -> None:
    batch = [encode_example({})] * 70 + [b""] * 3
    got = parse_example(batch, {"a": FixedLenFeature([], "int64", 5), "b": VarLenFeature("int64")})
    assert got["a"].tolist() == [5] * 73
    assert [len(v) for v in got["b"]] == [0] * 73
    got = parse_example(batch[:70], {"b": VarLenFeature("string")})
    assert [v.dtype for v in got["b"]] == [np.dtype(object)] * 70


def test_empty_batch() -> None:
    got = parse_example([], {"a": FixedLenFeature([2], "float32"), "b": VarLenFeature("string")})
    assert got["a"].shape == (0, 2) and got["a"].dtype == np.float32
    assert got["b"] == []


# -- other layouts of the same Example ------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + varint(len(payload)) + payload


def entry(key: bytes, feature: bytes, value_first: bool = False) -> bytes:
    parts = [field(0x0A, key), field(0x12, feature)]
    return field(0x0A, b"".join(parts[::-1] if value_first else parts))


UNPACKED_INTS = field(0x1A, b"\x08\x05\x08\x96\x01")  # int64_list, value by value
UNPACKED_FLOATS = field(0x12, b"\x0d" + np.float32(2.5).tobytes() + b"\x0d\x00\x00\x80\x3f")
UNKNOWN = b"\x28\x07"  # field 5, a varint: skipped


def test_layouts_other_than_protobufs_own_parse_as_in_tensorflow() -> None:
    tf = tf_module()
    features_a = entry(b"u", UNPACKED_INTS) + entry(b"f", UNPACKED_FLOATS, value_first=True)
    features_b = entry(b"s", field(0x0A, field(0x0A, b"x") + field(0x0A, b"")))
    features_b += entry(b"u", field(0x1A, field(0x0A, b"\x2a")))  # a later entry wins
    example = field(0x0A, features_a) + UNKNOWN + field(0x0A, features_b)
    features = {
        "u": VarLenFeature("int64"),
        "f": FixedLenFeature([2], "float32"),
        "s": VarLenFeature("string"),
    }
    want = tf.io.parse_single_example(example, {k: tf_spec(tf, f) for k, f in features.items()})
    got = parse_single_example(example, features)
    for name in features:
        assert_element_equal(got[name], as_numpy(want[name]), name)


def test_layouts_tensorflows_fast_parser_reads_otherwise_parse_as_protobuf_does() -> None:
    """Where TensorFlow's fast parser departs from protobuf's rules (it keeps only the first
    of two packed runs, refuses a Feature with two lists set and unknown fields in
    Features), feedline follows protobuf's, the format's definition."""
    tf = tf_module()
    two_runs = field(0x1A, field(0x0A, b"\x01\x02") + field(0x0A, b"\x03"))
    two_lists = field(0x12, field(0x0A, np.float32(9).tobytes())) + field(
        0x1A, field(0x0A, b"\x04")
    )  # a oneof: the last one set wins
    example = field(0x0A, entry(b"r", two_runs) + UNKNOWN + entry(b"o", two_lists))
    proto = tf.train.Example.FromString(example).features.feature
    got = parse_single_example(
        example, {"r": FixedLenFeature([3], "int64"), "o": VarLenFeature("int64")}
    )
    assert got["r"].tolist() == list(proto["r"].int64_list.value) == [1, 2, 3]
    assert got["o"].tolist() == list(proto["o"].int64_list.value) == [4]


def test_parse_in_a_pipeline_over_tfrecords(tmp_path: Path) -> None:
    path = str(tmp_path / "examples.tfrecord")
    with TFRecordWriter(path) as w:
        for i in range(10):
            w.write(encode_example({"i": i, "f": [float(i)] * 2, "s": f"#{i}"}))
    features = {
        "i": FixedLenFeature([], "int64"),
        "f": FixedLenFeature([2], "float32"),
        "s": FixedLenFeature([1], "string"),
    }
    records = fl.TFRecordDataset(path)
    batches = list(records.batch(5).map(lambda b: parse_example(b, features)))
    assert [len(b["i"]) for b in batches] == [5, 5]
    assert np.concatenate([b["i"] for b in batches]).tolist() == list(range(10))
    assert batches[1]["f"][-2:].tolist() == [[8.0, 8.0], [9.0, 9.0]]
    assert batches[0]["s"].tolist() == [[b"#0"], [b"#1"], [b"#2"], [b"#3"], [b"#4"]]
    singles = list(records.map(lambda r: parse_single_example(r, features)).batch(4))
    for name in features:
        assert_element_equal(
            np.concatenate([b[name] for b in singles]),
            np.concatenate([b[name] for b in batches]),
            name,
        )


def test_a_batch_with_one_irregular_example_parses_as_its_examples_one_by_one() -> None:
    regular = [encode_example({"u": [i, i + 1], "s": f"{i}"}) for i in range(80)]
    irregular = field(
        0x0A, entry(b"u", UNPACKED_INTS) + entry(b"s", field(0x0A, field(0x0A, b"x")))
    )
    features = {"u": VarLenFeature("int64"), "s": FixedLenFeature([], "string", b"-")}
    batch = [*regular[:10], irregular, *regular[10:], encode_example({})]
    assert len(batch) >= example_module._BATCH_PATH
    got = parse_example(batch, features)
    for r, example in enumerate(batch):
        one = parse_single_example(example, features)
        assert_element_equal(got["u"][r], one["u"], f"row {r}")
        assert got["s"][r] == one["s"]
    assert got["u"][10].tolist() == [5, 150] and got["s"][-1] == b"-"


@pytest.mark.parametrize(
    "values, message",
    [({"x": [1.0]}, "Data types don't match"), ({"y": 1}, "is required but could not be found")],
)
def test_errors_in_a_large_batch_are_named_as_in_a_small_one(
    values: dict[str, Any], message: str
) -> None:
    batch = [encode_example({"x": i}) for i in range(80)] + [encode_example(values)]
    with pytest.raises(ValueError, match=message):
        parse_example(batch, {"x": FixedLenFeature([], "int64")})
