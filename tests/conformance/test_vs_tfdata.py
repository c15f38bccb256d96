"""feedline against real tf.data, element by element, on pipelines written once for both.

Each case is a function of the module (``tf.data`` or ``feedline``) so the very same code builds
both pipelines. Map functions use only arithmetic and indexing, which work on tf tensors and on
numpy values alike. Cases that expose a known discrepancy are ``xfail(strict=True)``: when it is
fixed, the strict xfail turns into a failure so the mark gets removed.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import feedline  # noqa: E402
from tests.helpers import assert_element_equal  # noqa: E402

Builder = Callable[[Any], Any]


def _xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


def _ragged(m: Any) -> Any:
    """Rank-1 elements of lengths 3, 3, 1 without tensor-only ops: [0 1 2] [3 4 5] [6]."""
    return m.Dataset.range(7).batch(3)


def _inner(m: Any) -> Callable[[Any], Any]:
    """``x`` -> a dataset of ``x`` elements tagged with ``x`` (uneven inner lengths)."""
    return lambda x: m.Dataset.range(x).map(lambda y: y + 10 * x)


# (id, builder, marks). A builder receives ``tf.data`` or ``feedline``.
CASES: list[tuple[str, Builder, list[pytest.MarkDecorator]]] = [
    # -- sources and dtype conversion of Python values -------------------------------------
    ("range_stop", lambda m: m.Dataset.range(5), []),
    ("range_start_stop_step", lambda m: m.Dataset.range(2, 20, 3), []),
    ("range_negative_step", lambda m: m.Dataset.range(10, 0, -3), []),
    ("range_empty", lambda m: m.Dataset.range(5, 2), []),
    ("slices_py_ints", lambda m: m.Dataset.from_tensor_slices([1, -2, 3]), []),
    ("slices_py_big_ints", lambda m: m.Dataset.from_tensor_slices([1, 2**40]), []),
    ("slices_py_floats", lambda m: m.Dataset.from_tensor_slices([1.5, -2.25]), []),
    ("slices_py_mixed_numbers", lambda m: m.Dataset.from_tensor_slices([1, 2.5]), []),
    ("slices_py_bools", lambda m: m.Dataset.from_tensor_slices([True, False, True]), []),
    ("slices_py_strings", lambda m: m.Dataset.from_tensor_slices(["a", "bc", "é"]), []),
    ("slices_py_2d", lambda m: m.Dataset.from_tensor_slices([[1, 2], [3, 4], [5, 6]]), []),
    (
        "slices_numpy_dtypes_kept",
        lambda m: m.Dataset.from_tensor_slices(
            (np.arange(3, dtype=np.float64), np.arange(3, dtype=np.uint8))
        ),
        [],
    ),
    (
        "slices_nested_dict_tuple",
        lambda m: m.Dataset.from_tensor_slices(
            {"x": ([1, 2], [0.5, 1.5]), "label": ["p", "q"], "ok": [True, False]}
        ),
        [],
    ),
    ("from_tensors_scalar_int", lambda m: m.Dataset.from_tensors(7), []),
    ("from_tensors_nested", lambda m: m.Dataset.from_tensors({"s": "hi", "v": [1.0, 2.0]}), []),
    (
        "from_tensors_tuple_of_lists",
        lambda m: m.Dataset.from_tensors(([1, 2, 3], ["a", "b"])),
        [],
    ),
    # -- map ---------------------------------------------------------------------------------
    ("map_tuple_out", lambda m: m.Dataset.range(4).map(lambda x: (x, x * 2, x > 1)), []),
    (
        "map_dict_out_python_constants",
        lambda m: m.Dataset.range(3).map(lambda x: {"x": x + 1, "i": 3, "f": 0.5, "s": "z"}),
        [],
    ),
    ("map_python_int", lambda m: m.Dataset.range(3).map(lambda x: 5), []),
    ("map_python_float", lambda m: m.Dataset.range(3).map(lambda x: 2.5), []),
    ("map_python_string", lambda m: m.Dataset.range(2).map(lambda x: "s"), []),
    ("map_list_becomes_tuple", lambda m: m.Dataset.range(3).map(lambda x: [x, x * 3]), []),
    (
        "map_tuple_args_arithmetic",
        lambda m: m.Dataset.from_tensor_slices(([1, 2, 3], [0.5, 1.0, 1.5])).map(
            lambda a, b: (a * 2 + 1, b * 2.0, a // 2, a % 2, -a, a / 2)
        ),
        [],
    ),
    (
        "map_dict_arg",
        lambda m: m.Dataset.from_tensor_slices({"a": [1, 2], "b": [3, 4]}).map(
            lambda d: d["a"] * d["b"]
        ),
        [],
    ),
    # -- filter, take_while, take/skip, shard ------------------------------------------------
    ("filter", lambda m: m.Dataset.range(12).filter(lambda x: x % 3 == 0), []),
    (
        "filter_tuple_args",
        lambda m: m.Dataset.range(6).map(lambda x: (x, x * x)).filter(lambda a, b: b > 4),
        [],
    ),
    ("take_while", lambda m: m.Dataset.range(10).take_while(lambda x: x < 4), []),
    ("skip_take", lambda m: m.Dataset.range(10).skip(3).take(4), []),
    ("take_all", lambda m: m.Dataset.range(4).take(-1), []),
    ("skip_all", lambda m: m.Dataset.range(4).skip(-1), []),
    ("skip_past_end", lambda m: m.Dataset.range(4).skip(9), []),
    ("take_zero", lambda m: m.Dataset.range(4).take(0), []),
    ("shard_uneven", lambda m: m.Dataset.range(10).shard(3, 1), []),
    ("shard_last", lambda m: m.Dataset.range(10).shard(4, 3), []),
    # -- batching ----------------------------------------------------------------------------
    ("batch_remainder", lambda m: m.Dataset.range(10).batch(3), []),
    ("batch_drop_remainder", lambda m: m.Dataset.range(10).batch(3, drop_remainder=True), []),
    (
        "batch_divisible_spec",
        lambda m: m.Dataset.range(9).batch(3),
        [],
    ),
    (
        "batch_nested_strings",
        lambda m: m.Dataset.from_tensor_slices({"s": ["a", "b", "c"], "n": [[1], [2], [3]]}).batch(
            2
        ),
        [],
    ),
    ("padded_batch_default", lambda m: _ragged(m).padded_batch(2), []),
    (
        "padded_batch_shapes_values",
        lambda m: _ragged(m).padded_batch(2, padded_shapes=[5], padding_values=np.int64(-1)),
        [],
    ),
    (
        "padded_batch_nested_drop",
        lambda m: (
            m.Dataset.zip((_ragged(m), m.Dataset.from_tensor_slices(["a", "b", "c"])))
            .map(lambda v, s: {"v": v, "s": s})
            .padded_batch(2, padded_shapes={"v": [None], "s": []}, drop_remainder=True)
        ),
        [],
    ),
    (
        "padded_batch_strings",
        lambda m: m.Dataset.from_tensor_slices(["a", "b", "c"]).batch(2).padded_batch(2),
        [],
    ),
    ("unbatch", lambda m: _ragged(m).unbatch(), []),
    (
        "unbatch_dict",
        lambda m: (
            m.Dataset.from_tensor_slices({"a": [1, 2, 3, 4], "b": ["w", "x", "y", "z"]})
            .batch(3)
            .unbatch()
        ),
        [],
    ),
    ("rebatch", lambda m: m.Dataset.range(10).batch(4).rebatch(3), []),
    ("rebatch_sizes_list", lambda m: m.Dataset.range(11).batch(4).rebatch([2, 3]), []),
    ("rebatch_drop", lambda m: m.Dataset.range(10).batch(4).rebatch(3, drop_remainder=True), []),
    # -- interleave / flat_map ---------------------------------------------------------------
    ("flat_map_uneven", lambda m: m.Dataset.range(5).flat_map(_inner(m)), []),
    (
        "interleave_c2_b1",
        lambda m: m.Dataset.range(1, 6).interleave(_inner(m), cycle_length=2),
        [],
    ),
    (
        "interleave_c3_b2",
        lambda m: m.Dataset.range(0, 7).interleave(_inner(m), cycle_length=3, block_length=2),
        [],
    ),
    (
        "interleave_cycle_longer_than_input",
        lambda m: m.Dataset.range(1, 4).interleave(_inner(m), cycle_length=5, block_length=3),
        [],
    ),
    (
        "interleave_from_tensors_repeat",
        lambda m: m.Dataset.from_tensor_slices([3, 1, 2]).interleave(
            lambda x: m.Dataset.from_tensors(x).repeat(x), cycle_length=2, block_length=1
        ),
        [],
    ),
    # -- repeat, enumerate, zip, concatenate --------------------------------------------------
    ("repeat_batch_spanning_epochs", lambda m: m.Dataset.range(5).repeat(3).batch(4), []),
    ("repeat_forever_take", lambda m: m.Dataset.range(3).repeat().take(7).batch(5), []),
    ("repeat_zero", lambda m: m.Dataset.range(3).repeat(0), []),
    ("enumerate_start", lambda m: m.Dataset.from_tensor_slices(["a", "b"]).enumerate(5), []),
    (
        "zip_uneven_tuple",
        lambda m: m.Dataset.zip((m.Dataset.range(5), m.Dataset.from_tensor_slices([1.0, 2.0]))),
        [],
    ),
    (
        "zip_nested_dict",
        lambda m: m.Dataset.zip(
            {"a": m.Dataset.range(3), "b": (m.Dataset.range(4), m.Dataset.range(2).repeat())}
        ),
        [],
    ),
    (
        "concatenate",
        lambda m: m.Dataset.range(3).concatenate(m.Dataset.range(10, 12)),
        [],
    ),
    (
        "concatenate_merges_batch_dims",
        lambda m: (
            m.Dataset.range(5)
            .batch(2)
            .concatenate(m.Dataset.range(4).batch(4, drop_remainder=True))
        ),
        [],
    ),
    # -- cardinality through longer chains ----------------------------------------------------
    ("filter_then_batch", lambda m: m.Dataset.range(9).filter(lambda x: x > 2).batch(2), []),
    (
        "infinite_through_chain",
        lambda m: m.Dataset.range(4).repeat().map(lambda x: x * 2).batch(3).skip(2).take(3),
        [],
    ),
    (
        "map_batch_enumerate_shard",
        lambda m: m.Dataset.range(20).map(lambda x: (x, x * 0.5)).batch(3).enumerate().shard(2, 0),
        [],
    ),
]


def _cases() -> list[Any]:
    return [pytest.param(build, id=name, marks=marks) for name, build, marks in CASES]


def _spec_summary(spec: Any) -> Any:
    """An element spec as plain nests of ``(shape tuple, dtype name)``, for either library."""
    if isinstance(spec, dict):
        return {k: _spec_summary(v) for k, v in spec.items()}
    if isinstance(spec, tuple):
        return tuple(_spec_summary(s) for s in spec)
    shape = spec.shape
    dims = tuple(shape.as_list()) if hasattr(shape, "as_list") else tuple(shape)
    dtype = spec.dtype
    if isinstance(dtype, np.dtype):
        name = "string" if dtype == np.dtype(object) else dtype.name
    else:
        name = dtype.name
    return (dims, name)


def _assert_same_leaf_types(got: Any, want: Any, where: str = "element") -> None:
    """``assert_element_equal`` compares dtypes; this also tells a 0-d array from a scalar."""
    if isinstance(want, dict):
        for k in want:
            _assert_same_leaf_types(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, tuple):
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_leaf_types(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"


def _elements(module: ModuleType, build: Builder) -> list[Any]:
    return list(build(module).as_numpy_iterator())


@pytest.mark.parametrize("build", _cases())
def test_elements_match(build: Builder) -> None:
    want = _elements(tf.data, build)
    got = _elements(feedline, build)
    assert len(got) == len(want), f"{len(got)} elements, tf.data gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_element_equal(g, w, f"element {i}")
        _assert_same_leaf_types(g, w, f"element {i}")


@pytest.mark.parametrize("build", _cases())
def test_cardinality_matches(build: Builder) -> None:
    assert build(feedline).cardinality() == int(build(tf.data).cardinality())


@pytest.mark.parametrize("build", _cases())
def test_element_spec_matches(build: Builder) -> None:
    want = _spec_summary(build(tf.data).element_spec)
    got = _spec_summary(build(feedline).element_spec)
    assert got == want
