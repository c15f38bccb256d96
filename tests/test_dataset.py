"""The Dataset object: immutable, validated at build time, introspectable, closable."""

from __future__ import annotations

import pickle
import re
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_element_equal, assert_elements_equal, take

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
Build = Callable[[fl.Dataset], fl.Dataset]


def ints(ds: Any) -> list[int]:
    return [int(x) for x in ds]


def base() -> fl.Dataset:
    return D.range(10)


# -- immutability -----------------------------------------------------------------------------

TRANSFORMATIONS: dict[str, Build] = {
    "map": lambda ds: ds.map(lambda x: x + 1),
    "map-parallel": lambda ds: ds.map(lambda x: x + 1, num_parallel_calls=fl.AUTOTUNE),
    "filter": lambda ds: ds.filter(lambda x: x > 3),
    "flat_map": lambda ds: ds.flat_map(lambda x: D.range(x)),
    "interleave": lambda ds: ds.interleave(lambda x: D.range(x), cycle_length=2),
    "batch": lambda ds: ds.batch(3),
    "padded_batch": lambda ds: ds.map(lambda x: np.ones(x % 3)).padded_batch(3),
    "unbatch": lambda ds: ds.batch(2).unbatch(),
    "rebatch": lambda ds: ds.batch(4).rebatch(3),
    "shuffle": lambda ds: ds.shuffle(4, seed=1),
    "repeat": lambda ds: ds.repeat(2),
    "take": lambda ds: ds.take(3),
    "skip": lambda ds: ds.skip(3),
    "take_while": lambda ds: ds.take_while(lambda x: x < 5),
    "shard": lambda ds: ds.shard(3, 1),
    "enumerate": lambda ds: ds.enumerate(),
    "concatenate": lambda ds: ds.concatenate(D.range(3)),
    "zip": lambda ds: D.zip(ds, ds),
    "cache": lambda ds: ds.cache(),
    "prefetch": lambda ds: ds.prefetch(2),
    "ignore_errors": lambda ds: ds.ignore_errors(),
    "with_options": lambda ds: ds.with_options(fl.Options(deterministic=False)),
    "apply": lambda ds: ds.apply(lambda d: d.skip(1)),
}


@pytest.mark.parametrize("transform", TRANSFORMATIONS.values(), ids=TRANSFORMATIONS.keys())
def test_every_method_returns_a_new_dataset_and_leaves_the_old_one(transform: Build) -> None:
    ds = base()
    before = (repr(ds), ds.element_spec, ds.cardinality(), ds.options())
    new = transform(ds)
    assert isinstance(new, fl.Dataset)
    assert new is not ds
    list(new)
    assert (repr(ds), ds.element_spec, ds.cardinality(), ds.options()) == before
    assert ints(ds) == list(range(10))


def test_two_iterators_are_independent_passes() -> None:
    ds = base().map(lambda x: x * 2).shuffle(10, seed=3, reshuffle_each_iteration=False).batch(3)
    want = list(ds)
    a, b = iter(ds), iter(ds)
    got_a, got_b = take(a, 2), take(b, 1)
    got_a += list(a)
    got_b += list(b)
    assert_elements_equal(got_a, want)
    assert_elements_equal(got_b, want)


def test_rebinding_an_argument_variable_changes_nothing() -> None:
    size = 3
    ds = base().batch(size)
    size = 5
    assert [len(b) for b in ds] == [3, 3, 3, 1]
    assert size == 5


def test_rebinding_a_variable_a_map_function_closes_over_changes_nothing() -> None:
    scale = 2
    ds = base().map(lambda x: x * scale)
    scale = 3
    assert ints(ds) == [2 * i for i in range(10)]
    assert scale == 3


def test_mutating_a_list_or_dict_after_building_changes_nothing() -> None:
    values = [1, 2, 3]
    columns = {"a": [1, 2], "b": ["x", "y"]}
    ds = D.from_tensor_slices(values)
    table = D.from_tensor_slices(columns)
    values.append(4)
    values[0] = 100
    columns["a"][0] = 100
    columns["c"] = [0, 0]
    assert ints(ds) == [1, 2, 3]
    assert_elements_equal(
        list(table), [{"a": np.int32(1), "b": b"x"}, {"a": np.int32(2), "b": b"y"}]
    )


SOURCES: dict[str, Callable[[np.ndarray], fl.Dataset]] = {
    "from_tensor_slices": D.from_tensor_slices,
    "from_tensor_slices-tuple": lambda a: D.from_tensor_slices((a, a)),
    "from_tensors": D.from_tensors,
}


@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_mutating_a_numpy_array_after_building_changes_nothing(source) -> None:
    array = np.arange(6, dtype=np.float32).reshape(3, 2)
    ds = source(array)
    want = list(source(array.copy()))
    array[:] = -1
    assert_elements_equal(list(ds), want)


@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_elements_are_read_only_so_a_consumer_cannot_change_the_dataset(source) -> None:
    # Decision: like tf.data's as_numpy_iterator, array elements are read-only.
    ds = source(np.arange(6, dtype=np.float32).reshape(3, 2))
    want = list(ds)
    for element in ds:
        for leaf in element if isinstance(element, tuple) else (element,):
            assert not leaf.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                leaf[0] = 99
    assert_elements_equal(list(ds), want)


def test_a_read_only_array_is_not_copied() -> None:
    # A read-only memory map (np.load(mmap_mode="r")) must stay mapped, not be read into RAM.
    array = np.arange(6).reshape(3, 2).copy()
    array.flags.writeable = False
    first = next(iter(D.from_tensor_slices(array)))
    assert np.shares_memory(first, array)


def test_a_read_only_view_of_a_writable_array_is_copied() -> None:
    array = np.arange(4)
    view = array[:]
    view.flags.writeable = False
    ds = D.from_tensor_slices(view)
    array[0] = 50
    assert ints(ds) == [0, 1, 2, 3]


def test_mutating_options_after_attaching_them_changes_nothing() -> None:
    options = fl.Options(deterministic=False)
    options.autotune.cpu_budget = 2
    ds = base().with_options(options)
    options.deterministic = True
    options.autotune.cpu_budget = 8
    got = ds.options()
    assert (got.deterministic, got.autotune.cpu_budget) == (False, 2)
    got.deterministic = True
    assert ds.options().deterministic is False


# -- arguments are checked where the dataset is built ----------------------------------------

BAD_ARGUMENTS: list[tuple[str, Build, type, str]] = [
    ("batch-zero", lambda ds: ds.batch(0), ValueError, "batch_size must be >= 1, got 0"),
    ("batch-negative", lambda ds: ds.batch(-4), ValueError, "batch_size must be >= 1"),
    ("batch-bool", lambda ds: ds.batch(True), TypeError, "batch_size must be an int, got bool"),
    ("batch-float", lambda ds: ds.batch(2.0), TypeError, "batch_size must be an int"),
    ("padded_batch-zero", lambda ds: ds.padded_batch(0), ValueError, "batch_size"),
    ("rebatch-zero", lambda ds: ds.rebatch(0), ValueError, "batch_size"),
    ("shuffle-zero", lambda ds: ds.shuffle(0), ValueError, "buffer_size must be >= 1, got 0"),
    ("shuffle-bool", lambda ds: ds.shuffle(True), TypeError, "buffer_size must be an int"),
    ("prefetch-negative", lambda ds: ds.prefetch(-5), ValueError, "buffer_size"),
    ("map-not-callable", lambda ds: ds.map(3), TypeError, "map_func must be callable, got int"),
    ("filter-not-callable", lambda ds: ds.filter(None), TypeError, "predicate must be callable"),
    ("reduce-not-callable", lambda ds: ds.reduce(0, "+"), TypeError, "reduce_func must be"),
    ("map-parallel-zero", lambda ds: ds.map(abs, num_parallel_calls=0), ValueError, "num_para"),
    ("map-parallel-bool", lambda ds: ds.map(abs, num_parallel_calls=True), TypeError, "num_para"),
    ("shard-index-too-big", lambda ds: ds.shard(2, 2), ValueError, r"index must be < num_sh"),
    ("shard-index-negative", lambda ds: ds.shard(2, -1), ValueError, "index must be >= 0"),
    ("shard-zero-shards", lambda ds: ds.shard(0, 0), ValueError, "num_shards must be >= 1"),
    ("take-bool", lambda ds: ds.take(True), TypeError, "count must be an int, got bool"),
    ("enumerate-float", lambda ds: ds.enumerate(1.0), TypeError, "start must be an int"),
    ("apply-non-dataset", lambda ds: ds.apply(lambda d: 5), TypeError, "must return a Dataset"),
    ("with_options-dict", lambda ds: ds.with_options({}), TypeError, "takes an Options"),
    ("range-float", lambda ds: D.range(2.5), TypeError, "range arguments must be ints"),
    ("range-bool", lambda ds: D.range(True), TypeError, "range arguments must be ints"),
    ("range-step-zero", lambda ds: D.range(0, 5, 0), ValueError, "step must not be zero"),
]


@pytest.mark.parametrize(
    "build, error, message",
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
def test_bad_arguments_fail_at_build_time(build: Build, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        build(base())


def test_arguments_tf_data_accepts_are_accepted() -> None:
    """Ported code must not break: tf.data takes prefetch(0) as no read-ahead and any negative
    count as "all" (repeat: forever)."""
    assert ints(base().prefetch(0)) == ints(base())
    assert ints(base().take(-2)) == ints(base())
    assert ints(base().skip(-2)) == []
    assert base().repeat(-2).cardinality() == fl.INFINITE_CARDINALITY


# -- introspection ----------------------------------------------------------------------------


def test_cardinality_constants() -> None:
    assert (fl.INFINITE_CARDINALITY, fl.UNKNOWN_CARDINALITY) == (-1, -2)


@pytest.mark.parametrize(
    "build, cardinality, length_error",
    [
        (lambda ds: ds, 10, None),
        (lambda ds: ds.batch(3), 4, None),
        (lambda ds: ds.batch(3, drop_remainder=True), 3, None),
        (lambda ds: ds.take(0), 0, None),
        (lambda ds: ds.repeat(), fl.INFINITE_CARDINALITY, "infinite"),
        (lambda ds: ds.repeat().take(25), 25, None),
        (lambda ds: ds.filter(lambda x: x > 2), fl.UNKNOWN_CARDINALITY, "unknown"),
        (lambda ds: ds.filter(lambda x: True).repeat(), fl.INFINITE_CARDINALITY, "infinite"),
    ],
    ids=["range", "batch", "drop_remainder", "empty", "repeat", "take", "filter", "unk-repeat"],
)
def test_cardinality_and_len(build: Build, cardinality: int, length_error: str | None) -> None:
    ds = build(base())
    assert ds.cardinality() == cardinality
    if length_error is None:
        assert len(ds) == cardinality
    else:
        with pytest.raises(TypeError, match=length_error):
            len(ds)


Spec = fl.TensorSpec
F32, I32, I64, STR = (np.dtype(t) for t in (np.float32, np.int32, np.int64, object))


@pytest.mark.parametrize(
    "ds, spec",
    [
        (base(), Spec((), I64)),
        (D.from_tensor_slices([1, 2]), Spec((), I32)),
        (D.from_tensor_slices([1.0, 2.0]), Spec((), F32)),
        (D.from_tensor_slices(["a"]), Spec((), STR)),
        (
            D.from_tensor_slices((np.zeros((4, 2, 3), np.float32), {"y": ["a"] * 4})),
            (Spec((2, 3), F32), {"y": Spec((), STR)}),
        ),
        (base().batch(4), Spec((None,), I64)),
        (base().batch(5, drop_remainder=True), Spec((5,), I64)),
        (D.from_tensors({"k": np.zeros(3, np.float32)}), {"k": Spec((3,), F32)}),
        (base().enumerate(), (Spec((), I64), Spec((), I64))),
    ],
    ids=["range", "int", "float", "string", "nested", "batch", "drop", "tensors", "enumerate"],
)
def test_element_spec(ds: fl.Dataset, spec: Any) -> None:
    assert ds.element_spec == spec


def test_padded_batch_of_scalars() -> None:
    assert_elements_equal(
        list(D.range(5).padded_batch(2)),
        [np.array([0, 1]), np.array([2, 3]), np.array([4])],
    )


def test_repr_names_the_ops_in_order() -> None:
    def double(x: Any) -> Any:
        return x * 2

    text = repr(base().map(double).batch(2).prefetch(1))
    assert re.fullmatch(r"<Dataset range\(.*\) -> map\(double\) -> batch\(2\) -> prefetch.*>", text)


# -- running ----------------------------------------------------------------------------------


def test_reduce() -> None:
    assert_element_equal(base().reduce(np.int64(0), lambda s, x: s + x), np.int64(45))
    count, total = base().reduce((np.int64(0), np.int64(0)), lambda s, x: (s[0] + 1, s[1] + x))
    assert (int(count), int(total)) == (10, 45)
    # The initial state is normalised like any value (a Python int is int32).
    assert_element_equal(base().take(0).reduce(0, lambda s, x: s + x), np.int32(0))


def test_apply() -> None:
    def evens(ds: fl.Dataset) -> fl.Dataset:
        return ds.filter(lambda x: x % 2 == 0)

    assert ints(base().apply(evens)) == [0, 2, 4, 6, 8]


def test_with_options_merges_fields_set_later_over_earlier_ones() -> None:
    first = fl.Options(deterministic=False, autotune=fl.AutotuneOptions(cpu_budget=2))
    second = fl.Options(autotune=fl.AutotuneOptions(ram_budget=1 << 20))
    ds = base().with_options(first).with_options(second)
    got = ds.options()
    assert got.deterministic is False
    assert (got.autotune.cpu_budget, got.autotune.ram_budget) == (2, 1 << 20)
    got = ds.with_options(fl.Options(deterministic=True)).options()
    assert got.deterministic is True
    assert got.autotune.cpu_budget == 2
    # Transformations keep the options; combining datasets merges theirs.
    assert base().with_options(first).map(abs).batch(2).options().deterministic is False
    other = base().with_options(second)
    for combined in (D.zip(base().with_options(first), other), first_concat(first, second)):
        got = combined.options()
        assert (got.autotune.cpu_budget, got.autotune.ram_budget) == (2, 1 << 20)


def first_concat(first: fl.Options, second: fl.Options) -> fl.Dataset:
    return base().with_options(first).concatenate(base().with_options(second))


def test_as_numpy_iterator_yields_numpy_values() -> None:
    ds = D.from_tensor_slices({"n": [1, 2], "s": ["a", "b"], "v": np.ones((2, 2))})
    got = list(ds.as_numpy_iterator())
    assert_elements_equal(got, list(ds))
    assert_element_equal(got[0], {"n": np.int32(1), "s": b"a", "v": np.ones(2, dtype=np.float64)})


def closing_generator(log: list[str]) -> Callable[[], Iterator[int]]:
    def gen() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            log.append("closed")

    return gen


@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
def test_close_and_context_manager_stop_the_pass(prefetch: bool) -> None:
    log: list[str] = []
    ds = D.from_generator(closing_generator(log), output_signature=fl.TensorSpec((), I64))
    if prefetch:
        ds = ds.prefetch(4)
    with ds.iterator() as it:
        assert ints(take(it, 3)) == [0, 1, 2]
    assert log == ["closed"]
    assert list(it) == []
    with pytest.raises(StopIteration):
        next(it)
    it.close()
    it = ds.iterator()
    next(it)
    it.close()
    assert log == ["closed", "closed"]
    assert list(it) == []


def test_breaking_out_of_a_for_loop_and_closing() -> None:
    log: list[str] = []
    ds = D.from_generator(closing_generator(log), output_signature=fl.TensorSpec((), I64))
    it = iter(ds)
    for x in it:
        if x == 5:
            break
    it.close()
    assert log == ["closed"]


def decode_record(x: Any) -> Any:
    if x == 3:
        raise KeyError("bad record")
    return x


def failing_generator() -> Iterator[int]:
    yield from range(3)
    decode_record(3)


ERROR_SITES: dict[str, Callable[[], fl.Dataset]] = {
    "map": lambda: base().map(decode_record),
    "map-parallel": lambda: base().map(decode_record, num_parallel_calls=2),
    "filter": lambda: base().filter(lambda x: decode_record(x) >= 0),
    "flat_map": lambda: base().flat_map(lambda x: D.range(decode_record(x))),
    "from_generator": lambda: D.from_generator(
        failing_generator, output_signature=fl.TensorSpec((), I64)
    ),
}


@pytest.mark.parametrize("make", ERROR_SITES.values(), ids=ERROR_SITES.keys())
def test_user_error_keeps_its_traceback(make: Callable[[], fl.Dataset]) -> None:
    with pytest.raises(fl.StageError, match="KeyError: 'bad record'") as info:
        list(make())
    error = info.value
    assert error.position == 3
    assert isinstance(error.__cause__, KeyError)
    frames = [f.name for f in traceback.extract_tb(error.__cause__.__traceback__)]
    assert "decode_record" in frames, frames


def test_a_dataset_pickles_with_cloudpickle_and_gives_the_same_elements() -> None:
    # What a worker process receives inside a function it runs (interleave's map_func).
    cloudpickle = pytest.importorskip("cloudpickle")
    ds = (
        fl.Dataset.range(20)
        .shuffle(5, seed=1)
        .random_map(lambda x, rng: x + rng.integers(9), seed=2)
    )
    ds = ds.cache().batch(3)
    copy = pickle.loads(cloudpickle.dumps(ds))
    assert_elements_equal(list(copy), list(ds))


def test_interleave_refuses_more_calls_than_cycle_slots() -> None:
    # tf.data: "num_parallel_calls must be -1 or <= cycle_length" (when iterated).
    with pytest.raises(ValueError, match="at most cycle_length"):
        fl.Dataset.range(4).interleave(fl.Dataset.range, cycle_length=1, num_parallel_calls=2)
    fl.Dataset.range(4).interleave(fl.Dataset.range, cycle_length=2, num_parallel_calls=fl.AUTOTUNE)


def test_tracing_a_spec_on_zeros_raises_no_warning() -> None:
    # The spec is also traced on a synthetic zero, where 1 / x warns: not the user's data.
    import warnings

    ds = fl.Dataset.range(1, 4).map(lambda x: 1 / x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.element_spec.dtype == np.float64
