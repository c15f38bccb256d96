"""The API a porter from tf.data reaches for, against real tf.data (TensorFlow 2.21): the
``experimental`` names, TF's option spellings, ``FixedLengthRecordDataset``, ``ragged_batch``,
``rejection_resample`` and ``snapshot``.

Cases written once for both libraries go through the same three checks as
``test_vs_tfdata.py`` (elements with their types, cardinality, element spec). Ragged batches
and random resampling, whose values tf.data gives in other forms or other draws, have their
own comparisons below: rows for rows, and class shares.
"""

from __future__ import annotations

import collections
import gzip
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import feedline  # noqa: E402
from feedline.ops.ragged import RaggedBatch  # noqa: E402
from tests.conformance.test_vs_tfdata import (  # noqa: E402
    CARDINALITY,
    ELEMENTS,
    SPEC,
    Case,
    _spec_summary,
    assert_cardinality_matches,
    assert_element_spec_matches,
    assert_elements_match,
)
from tests.helpers import assert_element_equal  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _experimental(m: Any) -> Any:
    return tf.data.experimental if m is tf.data else feedline.experimental


def _as_int32(m: Any) -> Callable[[Any], Any]:
    """A length function: tf.data wants int32 lengths."""
    return (lambda x: tf.cast(x, tf.int32)) if m is tf.data else (lambda x: np.int32(x))


# -- files for FixedLengthRecordDataset, written once for the module ----------------------------

_FILES = tempfile.TemporaryDirectory(prefix="feedline-conformance-fixed-")
_ROOT = Path(_FILES.name)
_WRITE = {"": lambda b: b, "GZIP": gzip.compress, "ZLIB": zlib.compress}


def _fixed_files(compression: str = "") -> list[str]:
    """Three files of 5-byte records (7, 0 and 4 of them) between a 3-byte header and a
    2-byte footer."""
    names = []
    for i, count in enumerate((7, 0, 4)):
        body = bytes((31 * i + j) % 256 for j in range(5 * count))
        path = _ROOT / f"f{i}.{compression or 'raw'}"
        if not path.exists():
            path.write_bytes(_WRITE[compression](b"HDR" + body + b"FT"))
        names.append(str(path))
    return names


def _fixed(m: Any, compression: str = "", **kwargs: Any) -> Any:
    return m.FixedLengthRecordDataset(
        _fixed_files(compression),
        5,
        header_bytes=3,
        footer_bytes=2,
        compression_type=compression or None,
        **kwargs,
    )


def _fixed_from_dataset(m: Any) -> Any:
    names = m.Dataset.from_tensor_slices(_fixed_files())
    return m.FixedLengthRecordDataset(names, 5, header_bytes=3, footer_bytes=2)


# -- options in TF's spellings -------------------------------------------------------------------


def _options(m: Any, **settings: Any) -> Any:
    """``m``'s Options with ``settings`` (a path such as "threading.private_threadpool_size",
    spelt with "__" for the dots) set."""
    options = m.Options()
    for path, value in settings.items():
        *groups, last = path.split("__")
        target = options
        for group in groups:
            target = getattr(target, group)
        setattr(target, last, value)
    return options


def _with_options(m: Any, **settings: Any) -> Any:
    ds = m.Dataset.range(12).map(lambda x: x * 3, num_parallel_calls=2)
    return ds.with_options(_options(m, **settings))


def _snapshot_dir() -> str:
    return tempfile.mkdtemp(dir=_ROOT, prefix="snapshot-")


def _snapshot_twice(m: Any, build: Callable[[Any, str], Any]) -> Any:
    """The second pass of a snapshot (read from its files), after a first that wrote it."""
    ds = build(m, _snapshot_dir())
    for _ in ds:
        pass
    return ds


CASES: list[Case] = [
    # -- tf.data.experimental's transformations, through apply ---------------------------------
    Case(
        "exp_group_by_window",
        lambda m: m.Dataset.range(10).apply(
            _experimental(m).group_by_window(lambda x: x % 2, lambda k, w: w.batch(3), 3)
        ),
    ),
    Case(
        "exp_bucket_by_sequence_length",
        lambda m: m.Dataset.range(1, 9).apply(
            _experimental(m).bucket_by_sequence_length(
                _as_int32(m), [3, 6], [2, 2, 2], no_padding=True
            )
        ),
    ),
    Case(
        "exp_unique",
        lambda m: m.Dataset.from_tensor_slices([3, 1, 3, 2, 1]).apply(_experimental(m).unique()),
    ),
    Case(
        "exp_scan",
        lambda m: m.Dataset.range(6).apply(
            _experimental(m).scan(np.int64(0), lambda s, x: (s + x, s * 2))
        ),
    ),
    Case(
        "exp_enumerate", lambda m: m.Dataset.range(4).apply(_experimental(m).enumerate_dataset(7))
    ),
    Case(
        "exp_take_while",
        lambda m: m.Dataset.range(9).apply(_experimental(m).take_while(lambda x: x < 5)),
    ),
    Case("exp_unbatch", lambda m: m.Dataset.range(7).batch(3).apply(_experimental(m).unbatch())),
    Case(
        "exp_ignore_errors",
        lambda m: m.Dataset.range(5).apply(_experimental(m).ignore_errors()),
    ),
    Case(
        "exp_parallel_interleave",
        lambda m: m.Dataset.range(1, 4).apply(
            _experimental(m).parallel_interleave(
                lambda x: m.Dataset.range(x).map(lambda y: y + 10 * x), 2
            )
        ),
    ),
    Case(
        "exp_map_and_batch",
        lambda m: m.Dataset.range(10).apply(_experimental(m).map_and_batch(lambda x: x * 2, 4)),
    ),
    Case(
        "exp_shuffle_and_repeat",
        lambda m: m.Dataset.range(5).apply(_experimental(m).shuffle_and_repeat(3, 2, seed=1)),
        aspects=(CARDINALITY, SPEC),
    ),
    Case(
        "exp_sample_from_datasets",
        lambda m: _experimental(m).sample_from_datasets(
            [m.Dataset.range(3), m.Dataset.range(10, 12)], weights=[1.0, 0.0]
        ),
    ),
    Case(
        "exp_choose_from_datasets",
        lambda m: _experimental(m).choose_from_datasets(
            [m.Dataset.range(3), m.Dataset.range(10, 13)],
            m.Dataset.from_tensor_slices(np.array([0, 1, 1, 0], np.int64)),
        ),
    ),
    Case(
        "exp_counter",
        lambda m: _experimental(m).Counter(start=5, step=-2).take(4),
    ),
    Case(
        "exp_assert_cardinality",
        lambda m: (
            m.Dataset.range(6)
            .filter(lambda x: x % 2 == 0)
            .apply(_experimental(m).assert_cardinality(3))
        ),
    ),
    Case(
        "exp_assert_cardinality_wrong",
        lambda m: m.Dataset.range(6).apply(_experimental(m).assert_cardinality(9)),
        aspects=(CARDINALITY, SPEC),
    ),
    Case(
        "exp_dense_to_ragged_batch_dense_elements",
        lambda m: m.Dataset.range(5).apply(_experimental(m).dense_to_ragged_batch(2)),
    ),
    # -- FixedLengthRecordDataset ------------------------------------------------------------
    Case("fixed_length_files", lambda m: _fixed(m)),
    Case("fixed_length_gzip", lambda m: _fixed(m, "GZIP")),
    Case("fixed_length_zlib", lambda m: _fixed(m, "ZLIB")),
    Case("fixed_length_parallel_reads", lambda m: _fixed(m, num_parallel_reads=2)),
    Case("fixed_length_parallel_reads_3", lambda m: _fixed(m, "GZIP", num_parallel_reads=3)),
    Case("fixed_length_from_dataset", _fixed_from_dataset),
    Case(
        "fixed_length_map_decode",
        lambda m: _fixed(m).take(3).map(lambda r: r),
    ),
    # -- options in TF's spellings: accepted, and the elements unchanged ------------------------
    Case(
        "opt_experimental_deterministic",
        lambda m: _with_options(m, experimental_deterministic=True),
    ),
    Case("opt_deterministic", lambda m: _with_options(m, deterministic=True)),
    Case(
        "opt_private_threadpool_size",
        lambda m: _with_options(m, threading__private_threadpool_size=2),
    ),
    Case(
        "opt_max_intra_op_parallelism",
        lambda m: _with_options(m, threading__max_intra_op_parallelism=1),
    ),
    Case(
        "opt_experimental_threading",
        lambda m: _with_options(m, experimental_threading__private_threadpool_size=3),
    ),
    Case(
        "opt_autotune_budgets",
        lambda m: _with_options(
            m, autotune__enabled=True, autotune__cpu_budget=2, autotune__ram_budget=2**28
        ),
    ),
    Case(
        "opt_map_fusion_off",
        lambda m: _with_options(
            m,
            experimental_optimization__map_fusion=True,
            experimental_optimization__apply_default_optimizations=False,
        ),
    ),
    Case(
        "opt_auto_shard_policy",
        lambda m: _with_options(
            m,
            experimental_distribute__auto_shard_policy=_experimental(m).AutoShardPolicy.DATA,
        ),
    ),
    Case(
        "opt_symbolic_checkpoint",
        lambda m: _with_options(m, experimental_symbolic_checkpoint=True),
    ),
    # -- snapshot: first pass (writing) and second pass (reading), each in its own format -------
    Case(
        "snapshot_first_pass",
        lambda m: m.Dataset.range(8).map(lambda x: (x, x * 2)).snapshot(_snapshot_dir()),
    ),
    Case(
        "snapshot_read_back",
        lambda m: _snapshot_twice(
            m, lambda m, d: m.Dataset.range(8).map(lambda x: {"a": x, "b": x > 3}).snapshot(d)
        ),
    ),
    Case(
        "snapshot_gzip_read_back",
        lambda m: _snapshot_twice(
            m, lambda m, d: m.Dataset.range(5).batch(2).snapshot(d, compression="GZIP")
        ),
    ),
    Case(
        "snapshot_reader_func_one_shard",
        lambda m: _snapshot_twice(
            m,
            lambda m, d: m.Dataset.range(6).snapshot(
                d,
                shard_func=lambda x: np.int64(0) if m is not tf.data else tf.constant(0, tf.int64),
                reader_func=lambda shards: shards.flat_map(lambda s: s),
            ),
        ),
    ),
    # -- rejection_resample where nothing is drawn: tf.data's elements exactly ----------------
    Case(
        "rejection_resample_target_met",
        lambda m: m.Dataset.range(10).rejection_resample(
            lambda x: x % 2, [0.5, 0.5], initial_dist=[0.5, 0.5]
        ),
    ),
    Case(
        "rejection_resample_random",
        lambda m: m.Dataset.range(10).rejection_resample(lambda x: x % 2, [0.8, 0.2], seed=1),
        aspects=(CARDINALITY, SPEC),
    ),
]


def _params(aspect: str) -> list[Any]:
    return [pytest.param(c.build, id=c.name) for c in CASES if aspect in c.aspects]


@pytest.mark.parametrize("build", _params(ELEMENTS))
def test_elements_match(build: Callable[[Any], Any]) -> None:
    assert_elements_match(build)


@pytest.mark.parametrize("build", _params(CARDINALITY))
def test_cardinality_matches(build: Callable[[Any], Any]) -> None:
    assert_cardinality_matches(build)


@pytest.mark.parametrize("build", _params(SPEC))
def test_element_spec_matches(build: Callable[[Any], Any]) -> None:
    assert_element_spec_matches(build)


def test_experimental_functions_of_a_dataset() -> None:
    for m in (tf.data, feedline):
        exp = _experimental(m)
        ds = m.Dataset.range(4).filter(lambda x: x < 9)
        assert int(exp.cardinality(ds)) == exp.UNKNOWN_CARDINALITY
        assert int(exp.get_single_element(m.Dataset.range(3, 4))) == 3
    assert [m.name for m in feedline.experimental.AutoShardPolicy] == [
        m.name for m in tf.data.experimental.AutoShardPolicy
    ]
    assert [m.value for m in feedline.experimental.AutoShardPolicy] == [
        m.value for m in tf.data.experimental.AutoShardPolicy
    ]


# -- ragged_batch: feedline's RaggedBatch against tf.RaggedTensor -----------------------------


def _varying(m: Any) -> Any:
    """Elements of lengths 0, 1, 2, 0, 1, 2, 0 with two columns each: x at [i, 0], -x at [i, 1]."""
    if m is tf.data:
        return m.Dataset.range(7).map(
            lambda x: tf.stack([tf.fill([x % 3], x), -tf.fill([x % 3], x)], axis=1)
        )
    return m.Dataset.range(7).map(lambda x: np.stack([np.full(x % 3, x), -np.full(x % 3, x)], 1))


RAGGED: dict[str, Callable[[Any], Any]] = {
    "vectors": lambda m: m.Dataset.range(8).batch(3).ragged_batch(2),
    "drop_remainder": lambda m: m.Dataset.range(8).batch(3).ragged_batch(2, drop_remainder=True),
    "matrix_rows": lambda m: _varying(m).ragged_batch(3),
    "int32_row_splits": lambda m: (
        m.Dataset.range(8)
        .batch(3)
        .ragged_batch(2, row_splits_dtype=tf.int32 if m is tf.data else np.int32)
    ),
    "experimental_spelling": lambda m: _varying(m).apply(_experimental(m).dense_to_ragged_batch(4)),
    "with_a_dense_part": lambda m: m.Dataset.zip((_varying(m), m.Dataset.range(7))).ragged_batch(3),
}


def _rows(batch: Any) -> list[list[Any]]:
    if isinstance(batch, RaggedBatch):
        return [row.tolist() for row in batch.rows()]
    return [np.asarray(row).tolist() for row in batch]


@pytest.mark.parametrize("name", sorted(RAGGED))
def test_ragged_batch_matches_tf_row_for_row(name: str) -> None:
    build = RAGGED[name]
    want = list(build(tf.data).as_numpy_iterator())
    got = list(build(feedline))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        parts = (g, w) if not isinstance(w, tuple) else None
        pairs = [parts] if parts else list(zip(g, w))
        for part_g, part_w in pairs:
            if isinstance(part_g, RaggedBatch):
                assert _rows(part_g) == _rows(part_w)
                assert part_g.values.dtype == np.asarray(part_w[0]).dtype if len(part_w) else True
            else:
                assert_element_equal(part_g, part_w)
    assert build(feedline).cardinality() == int(build(tf.data).cardinality())
    tf_spec, fl_spec = build(tf.data).element_spec, build(feedline).element_spec
    for t, f in zip(tf.nest.flatten(tf_spec, expand_composites=False), _top(fl_spec)):
        if isinstance(t, tf.RaggedTensorSpec):
            assert tuple(t.shape.as_list()[1:]) == f.values.shape
            assert t.shape.as_list()[0] == f.row_lengths.shape[0]
            assert t.dtype.name == f.values.dtype.name
            assert t.row_splits_dtype.name == f.row_lengths.dtype.name
        else:
            assert _spec_summary(t) == _spec_summary(f)


def _top(spec: Any) -> list[Any]:
    """The parts of an element spec, a RaggedBatch being one part (as a RaggedTensorSpec)."""
    if isinstance(spec, RaggedBatch) or not isinstance(spec, tuple):
        return [spec]
    return [part for s in spec for part in _top(s)]


# -- rejection_resample's draws: the same class shares as tf.data --------------------------------


@pytest.mark.parametrize("initial_dist", [None, [0.9, 0.1]])
def test_rejection_resample_reaches_the_shares_tf_data_reaches(initial_dist: Any) -> None:
    def shares(m: Any) -> dict[int, float]:
        ds = (
            m.Dataset.range(3000)
            .map(lambda x: (x, x % 10 == 0))
            .rejection_resample(
                lambda x, rare: tf.cast(rare, tf.int64) if m is tf.data else np.int64(rare),
                [0.5, 0.5],
                initial_dist=initial_dist,
                seed=4,
            )
        )
        counts = collections.Counter(int(label) for label, _ in ds.as_numpy_iterator())
        return {k: v / sum(counts.values()) for k, v in counts.items()}

    want, got = shares(tf.data), shares(feedline)
    assert abs(want[1] - 0.5) < 0.08 and abs(got[1] - 0.5) < 0.08, (want, got)
