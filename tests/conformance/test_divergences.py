"""The divergences from tf.data of issue 20, each checked against real tf.data.

Each test builds the same pipeline in both libraries and compares what they give: elements,
element specs, cardinalities, or the error each raises and when (at build, or at which
element). They were found on random pipelines; every one failed before its fix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import feedline  # noqa: E402
from feedline.ops.interleave import REFERENCE_CORES  # noqa: E402
from tests.conformance.test_vs_tfdata import _spec_summary  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_element_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
)

Builder = Callable[[Any], Any]


def assert_same_elements(build: Builder) -> None:
    want = list(build(tf.data).as_numpy_iterator())
    got = list(build(feedline).as_numpy_iterator())
    assert len(got) == len(want), f"{len(got)} elements, tf.data gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_element_equal(g, w, f"element {i}")


def assert_same_spec(build: Builder) -> None:
    assert _spec_summary(build(feedline).element_spec) == _spec_summary(build(tf.data).element_spec)


def assert_both_refuse_at_build(build: Builder, error: type[Exception]) -> None:
    with pytest.raises(error):
        build(tf.data)
    with pytest.raises(error):
        build(feedline)


# -- 1. interleave's default cycle length -----------------------------------------------------


@contextlib.contextmanager
def reference_machine() -> Iterator[None]:
    """This thread on ``REFERENCE_CORES`` cores, where tf.data reads its core count."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < REFERENCE_CORES:
        pytest.skip(f"needs {REFERENCE_CORES} cores to stand for the reference machine")
    os.sched_setaffinity(0, cores[:REFERENCE_CORES])
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


@pytest.mark.parametrize("calls", [None, 1, 2, "AUTOTUNE"])
@pytest.mark.parametrize("inputs", [3, 6])
def test_interleave_without_cycle_length_orders_as_tf_data(calls: Any, inputs: int) -> None:
    def build(m: Any) -> Any:
        parallel = m.AUTOTUNE if calls == "AUTOTUNE" else calls
        return m.Dataset.range(inputs).interleave(
            lambda x: m.Dataset.range(10 * x, 10 * x + 3), num_parallel_calls=parallel
        )

    with reference_machine():
        assert_same_elements(build)


# -- 2. padded_batch's padding values ----------------------------------------------------------


def _vectors(m: Any) -> Any:
    return m.Dataset.range(1, 4).batch(2)  # [1 2] [3]: int64 rows of two lengths


@pytest.mark.parametrize(
    "build",
    [
        lambda m: _vectors(m).padded_batch(2, padding_values=np.float32(0.5)),
        lambda m: _vectors(m).padded_batch(2, padding_values=np.int32(7)),
        lambda m: _vectors(m).padded_batch(2, padding_values=np.float64(1)),
        lambda m: m.Dataset.from_tensor_slices([["a"], ["b"]]).padded_batch(2, padding_values=0.5),
        lambda m: m.Dataset.from_tensor_slices(np.ones((2, 1), np.uint8)).padded_batch(
            2, padding_values=np.int64(1)
        ),
    ],
    ids=[
        "float32-for-int64",
        "int32-for-int64",
        "float64-for-int64",
        "float-for-string",
        "int64-for-uint8",
    ],
)
def test_padding_values_of_another_dtype_are_refused_at_build(build: Builder) -> None:
    assert_both_refuse_at_build(build, TypeError)


@pytest.mark.parametrize(
    "build",
    [
        lambda m: _vectors(m).padded_batch(2, padding_values=np.int64(-1)),
        lambda m: m.Dataset.from_tensor_slices([["a"], ["bc"]]).padded_batch(2, padding_values="z"),
        lambda m: m.Dataset.from_tensor_slices(np.ones((2, 1), np.int32)).padded_batch(
            2, padding_values=7
        ),
        lambda m: m.Dataset.from_tensor_slices(np.ones((2, 1), np.float32)).padded_batch(
            2, padding_values=7.5
        ),
    ],
    ids=["int64", "string", "python-int-for-int32", "python-float-for-float32"],
)
def test_padding_values_of_the_component_dtype_pad(build: Builder) -> None:
    assert_same_elements(build)


# -- 3. a map returning None -------------------------------------------------------------------


def test_a_map_returning_none_is_refused() -> None:
    with pytest.raises(Exception, match="output_shapes"):  # tf.data: at build
        tf.data.Dataset.range(3).map(lambda x: None)
    ds = feedline.Dataset.range(3).map(lambda x: None)  # feedline: when its spec is traced
    with pytest.raises(TypeError, match="returned None"):
        ds.element_spec  # noqa: B018
    with pytest.raises(TypeError, match="returned None"):
        list(ds)


# -- 4. specs of value-dependent shapes -----------------------------------------------------


def _value_sized(m: Any) -> Callable[[Any], Any]:
    """x -> a vector of x % 3 + 1 copies of x: its length depends on the value."""
    if m is tf.data:
        return lambda x: tf.fill([tf.cast(x % 3, tf.int32) + 1], x)
    return lambda x: np.full(int(x % 3) + 1, x)


def _value_sized_pipeline(take: int | None) -> Builder:
    def build(m: Any) -> Any:
        ds = m.Dataset.from_tensor_slices(np.array([3, 6, 4, 5]))
        return (ds if take is None else ds.take(take)).map(_value_sized(m))

    return build


@pytest.mark.parametrize("take", [None, 0, 2], ids=["all", "empty", "first-two-agree"])
def test_a_spec_claims_no_size_the_values_decide(take: int | None) -> None:
    build = _value_sized_pipeline(take)
    assert_same_spec(build)
    assert_same_elements(build)
    unbatched = lambda m: build(m).unbatch()  # noqa: E731 - its cardinality follows the spec
    assert unbatched(feedline).cardinality() == int(unbatched(tf.data).cardinality())
    assert_same_elements(unbatched)


# -- 5. rebatch's static batch size ----------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda m: m.Dataset.from_tensor_slices(np.zeros((3, 2, 2))).rebatch(1),
        lambda m: m.Dataset.from_tensor_slices(np.zeros((3, 2, 2))).rebatch([1, 1]),
        lambda m: m.Dataset.from_tensor_slices(np.zeros((3, 2, 2))).rebatch([2, 1]),
        lambda m: m.Dataset.range(8).batch(4, drop_remainder=True).rebatch(2),
        lambda m: m.Dataset.range(8).batch(4, drop_remainder=True).rebatch(3),
        lambda m: m.Dataset.range(8).batch(4, drop_remainder=True).rebatch(3, drop_remainder=True),
        lambda m: m.Dataset.range(8).batch(4, drop_remainder=True).rebatch([3, 1]),
        lambda m: m.Dataset.range(5).batch(2).rebatch(1),
    ],
    ids=[
        "divides",
        "list-of-one-size",
        "list-of-sizes",
        "halves",
        "leaves-a-rest",
        "drops-it",
        "two-sizes",
        "unknown-input",
    ],
)
def test_rebatch_spec_matches(build: Builder) -> None:
    assert_same_spec(build)


# -- 6. group_by_window's key ----------------------------------------------------------------


def _int32_key(m: Any) -> Callable[[Any], Any]:
    if m is tf.data:
        return lambda x: tf.cast(x % 2, tf.int32)
    return lambda x: (x % 2).astype(np.int32)


@pytest.mark.parametrize("take", [None, 0], ids=["input", "empty-input"])
def test_a_key_that_is_not_int64_is_refused_at_build(take: int | None) -> None:
    def build(m: Any) -> Any:
        ds = m.Dataset.range(4) if take is None else m.Dataset.range(4).take(take)
        return ds.group_by_window(_int32_key(m), lambda k, d: d.batch(2), window_size=2)

    assert_both_refuse_at_build(build, ValueError)


def test_an_int64_key_groups_as_tf_data() -> None:
    assert_same_elements(
        lambda m: m.Dataset.range(9).group_by_window(
            lambda x: x % 3, lambda k, d: d.batch(2), window_size=2
        )
    )


# -- 7. checks at build that an empty input does not hide ----------------------------------


def _state_to_int64(m: Any) -> Callable[[Any, Any], Any]:
    if m is tf.data:
        return lambda s, x: (tf.cast(s, tf.int64) + x, x)
    return lambda s, x: (s.astype(np.int64) + x, x)


@pytest.mark.parametrize(
    "build, error",
    [
        (
            lambda m: m.Dataset.from_tensors((np.zeros(3), np.zeros(2))).take(0).unbatch(),
            ValueError,
        ),
        (lambda m: m.Dataset.from_tensors((np.zeros(3), np.zeros(2))).unbatch(), ValueError),
        (lambda m: m.Dataset.range(3).take(0).unbatch(), ValueError),
        (lambda m: m.Dataset.range(3).take(0).scan(np.int32(0), _state_to_int64(m)), TypeError),
        (lambda m: m.Dataset.range(3).scan(np.int32(0), _state_to_int64(m)), TypeError),
    ],
    ids=[
        "unbatch-sizes-empty",
        "unbatch-sizes",
        "unbatch-scalars-empty",
        "scan-dtype-empty",
        "scan-dtype",
    ],
)
def test_what_the_spec_shows_is_checked_at_build(build: Builder, error: type[Exception]) -> None:
    assert_both_refuse_at_build(build, error)


# -- spec checks: outputs that do not fit the traced spec ------------------------------------


def _float32_then_float64(v: Any) -> Any:
    return np.float32(v) if v < 3 else np.float64(v)


def test_a_map_changing_dtype_fails_at_that_element() -> None:
    ds = tf.data.Dataset.range(6).map(
        lambda x: tf.numpy_function(_float32_then_float64, [x], tf.float32)
    )
    want: list[Any] = []
    got: list[Any] = []
    with pytest.raises(tf.errors.InvalidArgumentError):
        want.extend(ds.as_numpy_iterator())
    with pytest.raises(feedline.StageError, match=r"at element 3.*float64.*float32") as info:
        got.extend(feedline.Dataset.range(6).map(_float32_then_float64))
    assert info.value.stage == "map(_float32_then_float64)"
    assert [float(v) for v in got] == [float(v) for v in want] == [0.0, 1.0, 2.0]
    assert _spec_summary(ds.element_spec)[1] == "float32"  # tf.data: a shape it cannot know


# -- 8. (a cache's state resumed in a fresh build: feedline only, tests/ops/test_cache.py) --


# -- save: tf.data.Dataset.save directories load --------------------------------------------


def _saved_by_tf(path: Path, compression: str | None) -> Any:
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "image": np.arange(24, dtype=np.float32).reshape(4, 2, 3),
            "label": np.array([1, 0, 3, 2]),
            "name": [b"a", b"bc", b"", b"def"],
        }
    ).map(lambda d: (d, tf.range(d["label"]), d["name"] == b"a"))
    ds.save(str(path), compression=compression)
    return ds


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_a_tf_data_save_loads(tmp_path: Path, compression: str | None) -> None:
    _saved_by_tf(tmp_path, compression)

    def build(m: Any) -> Any:
        return m.Dataset.load(str(tmp_path), compression=compression)

    assert_same_elements(build)
    # tf.data's dict keys come in the order of a protobuf map, which varies: compared sorted.
    got, want = (_spec_summary(build(m).element_spec) for m in (feedline, tf.data))
    assert (sorted(got[0]), got[1:]) == (sorted(want[0]), want[1:])
    assert build(feedline).cardinality() == int(build(tf.data).cardinality())
    assert_state_roundtrip(feedline.Dataset.load(str(tmp_path)).repeat(2), cut_points=(0, 1, 5))


def test_a_tf_data_save_is_data_never_a_wrong_element(tmp_path: Path) -> None:
    _saved_by_tf(tmp_path, None)
    ds = feedline.Dataset.load(str(tmp_path))
    state = saved_state(ds, 2)
    assert_state_rejected(ds, {**state, "root": {**state["root"], "offset": 3}}, "offset")
    assert_state_rejected(ds, {**state, "root": {**state["root"], "file": 9}}, "file")
    metadata = tmp_path / "snapshot.metadata"
    whole = metadata.read_bytes()
    assert whole.endswith(b"\xc0\x3e\x01")  # finalized: field 1000, true
    metadata.write_bytes(whole[:-1] + b"\x00")
    with pytest.raises(feedline.DataLossError, match="not finalized"):
        feedline.Dataset.load(str(tmp_path))
    metadata.write_bytes(whole[:-5])
    with pytest.raises(feedline.DataLossError, match=r"snapshot\.metadata"):
        feedline.Dataset.load(str(tmp_path))
    metadata.write_bytes(whole)
    [shard] = list(tmp_path.glob("*/*.shard/*.snapshot"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(feedline.DataLossError, match="CRC"):
        list(feedline.Dataset.load(str(tmp_path)))
