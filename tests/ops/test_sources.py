"""Sources: range, from_tensor_slices, from_tensors, from_generator.

Expected values follow tf.data (checked against TensorFlow 2.21 where the docs are silent).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.structure import flatten
from tests.helpers import (
    assert_element_equal,
    assert_elements_equal,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
)

D = fl.Dataset
Spec = fl.TensorSpec
I32, I64, F32, F64, STR, BOOL = (
    np.dtype(t) for t in (np.int32, np.int64, np.float32, np.float64, object, np.bool_)
)
Point = collections.namedtuple("Point", "x y")


def strings(*values: str) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode() for v in values]
    return out


# -- range ------------------------------------------------------------------------------------

RANGES: list[tuple[tuple[int, ...], list[int]]] = [
    ((5,), [0, 1, 2, 3, 4]),
    ((2, 5), [2, 3, 4]),
    ((0, 10, 3), [0, 3, 6, 9]),
    ((5, 0, -2), [5, 3, 1]),
    ((-1, -4, -1), [-1, -2, -3]),
    ((0,), []),
    ((5, 0), []),
    ((0, 5, -1), []),
]


@pytest.mark.parametrize("args, want", RANGES, ids=[str(a) for a, _ in RANGES])
def test_range_elements_cardinality_and_state(args: tuple[int, ...], want: list[int]) -> None:
    ds = D.range(*args)
    assert_elements_equal(list(ds), [np.int64(v) for v in want])
    assert ds.cardinality() == len(want)
    assert ds.element_spec == Spec((), I64)
    assert_state_roundtrip(ds)


@pytest.mark.parametrize("output_type, dtype", [(np.float32, F32), (np.int32, I32), ("int64", I64)])
def test_range_output_type(output_type: Any, dtype: np.dtype) -> None:
    ds = D.range(4, 0, -1, output_type=output_type)
    assert ds.element_spec == Spec((), dtype)
    assert_elements_equal(list(ds), [dtype.type(v) for v in (4, 3, 2, 1)])


def test_range_read_in_chunks_matches_one_at_a_time() -> None:
    # batch pulls chunks through next_chunk, a different path from next().
    assert_elements_equal(
        list(D.range(10, -3, -4, output_type=np.float32).batch(3)),
        [np.array([10, 6, 2], np.float32), np.array([-2], np.float32)],
    )


# -- from_tensor_slices -----------------------------------------------------------------------

SLICES: dict[str, tuple[Any, list[Any], Any]] = {
    "numpy-2d-keeps-dtype": (
        np.arange(6, dtype=np.float64).reshape(3, 2),
        [np.array([0.0, 1.0]), np.array([2.0, 3.0]), np.array([4.0, 5.0])],
        Spec((2,), F64),
    ),
    "python-ints-int32": ([1, 2], [np.int32(1), np.int32(2)], Spec((), I32)),
    "python-big-int-int64": ([1, 2**40], [np.int64(1), np.int64(2**40)], Spec((), I64)),
    "python-floats-float32": ([0.5, 1.5], [np.float32(0.5), np.float32(1.5)], Spec((), F32)),
    "python-bools": ([True, False], [np.True_, np.False_], Spec((), BOOL)),
    "nested-lists": ([[1, 2], [3, 4]], [np.array([1, 2], I32), np.array([3, 4], I32)], None),
    # tf.data converts a list of number tuples to one tensor: its rows are the elements.
    "list-of-tuples": ([(1, 2), (3, 4)], [np.array([1, 2], I32), np.array([3, 4], I32)], None),
    "str-to-bytes": (["a", "bc"], [b"a", b"bc"], Spec((), STR)),
    "numpy-unicode-to-bytes": (np.array(["a", "bc"]), [b"a", b"bc"], Spec((), STR)),
    "numpy-bytes-to-bytes": (np.array([b"a", b"bc"]), [b"a", b"bc"], Spec((), STR)),
    "tuple": (
        ([1, 2], ["x", "y"]),
        [(np.int32(1), b"x"), (np.int32(2), b"y")],
        (Spec((), I32), Spec((), STR)),
    ),
    "dict": (
        {"label": [0, 1], "pixels": np.ones((2, 2, 2), np.uint8)},
        [
            {"label": np.int32(0), "pixels": np.ones((2, 2), np.uint8)},
            {"label": np.int32(1), "pixels": np.ones((2, 2), np.uint8)},
        ],
        {"label": Spec((), I32), "pixels": Spec((2, 2), np.dtype(np.uint8))},
    ),
    "namedtuple-in-dict": (
        {"p": Point([1.0, 2.0], np.array([3, 4], np.int64))},
        [{"p": Point(np.float32(1), np.int64(3))}, {"p": Point(np.float32(2), np.int64(4))}],
        {"p": Point(Spec((), F32), Spec((), I64))},
    ),
}


@pytest.mark.parametrize("tensors, want, spec", SLICES.values(), ids=SLICES.keys())
def test_from_tensor_slices(tensors: Any, want: list[Any], spec: Any) -> None:
    ds = D.from_tensor_slices(tensors)
    assert_elements_equal(list(ds), want)
    assert ds.cardinality() == len(want)
    if spec is not None:
        assert ds.element_spec == spec
    assert_state_roundtrip(ds)


def test_from_tensor_slices_of_an_empty_list_is_float32_and_empty() -> None:
    ds = D.from_tensor_slices([])
    assert ds.cardinality() == 0
    assert list(ds) == []
    assert ds.element_spec == Spec((), F32)


def test_from_tensor_slices_keeps_dict_key_order() -> None:
    ds = D.from_tensor_slices({"z": [1], "a": ["x"]})
    assert list(next(iter(ds))) == ["z", "a"]
    assert list(ds.element_spec) == ["z", "a"]


def test_from_tensor_slices_nested_state_roundtrip_mid_pass() -> None:
    n = 23
    ds = D.from_tensor_slices(
        (
            {"id": np.arange(n), "name": [f"row{i}" for i in range(n)]},
            Point(np.ones((n, 3), np.float32), [float(i) for i in range(n)]),
        )
    )
    assert_state_roundtrip(ds, cut_points=(0, 1, 5, 11, 22))


SLICE_ERRORS: dict[str, tuple[Any, type, str]] = {
    "mismatched-lengths": (([1, 2], [3]), ValueError, r"same first dimension.*\(2,\), \(1,\)"),
    "mismatched-in-dict": (
        {"a": np.zeros(3), "b": np.zeros(4)},
        ValueError,
        "same first dimension",
    ),
    "scalar": (5, ValueError, "first dimension"),
    "tuple-of-scalars": ((1, 2), ValueError, "first dimension"),
    "ragged": ([[1, 2], [3]], ValueError, "sequence"),
    "list-of-dicts": ([{"a": 1}, {"a": 2}], TypeError, "tuple/dict of lists"),
    "list-of-records": ([(1, "cat"), (2, "dog")], TypeError, "tuple/dict of lists"),
}


@pytest.mark.parametrize("tensors, error, message", SLICE_ERRORS.values(), ids=SLICE_ERRORS.keys())
def test_from_tensor_slices_errors_at_build_time(tensors: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        D.from_tensor_slices(tensors)


# -- from_tensors -----------------------------------------------------------------------------

TENSORS: dict[str, tuple[Any, Any, Any]] = {
    "python-list": ([1, 2], np.array([1, 2], I32), Spec((2,), I32)),
    "str": ("abc", b"abc", Spec((), STR)),
    "python-scalars": (
        (1, "a", 2.5, True),
        (np.int32(1), b"a", np.float32(2.5), np.True_),
        (Spec((), I32), Spec((), STR), Spec((), F32), Spec((), BOOL)),
    ),
    "numpy-unicode": ((np.array(["ab", "c"]), np.str_("d")), (strings("ab", "c"), b"d"), None),
    "dict-of-array": (
        {"k": np.zeros((2, 3), np.float32)},
        {"k": np.zeros((2, 3), np.float32)},
        {"k": Spec((2, 3), F32)},
    ),
}


@pytest.mark.parametrize("value, want, spec", TENSORS.values(), ids=TENSORS.keys())
def test_from_tensors_is_one_element(value: Any, want: Any, spec: Any) -> None:
    ds = D.from_tensors(value)
    assert ds.cardinality() == 1
    assert_elements_equal(list(ds), [want])
    if spec is not None:
        assert ds.element_spec == spec
    assert_state_roundtrip(ds, cut_points=(0, 1))


def test_from_tensors_repeated_gives_the_same_element_each_pass() -> None:
    ds = D.from_tensors((np.arange(3), "s")).repeat(3)
    assert_elements_equal(list(ds), [(np.arange(3), b"s")] * 3)
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3))


# -- from_generator ---------------------------------------------------------------------------


def counting(n: int) -> Callable[[], Iterator[int]]:
    def gen() -> Iterator[int]:
        yield from range(n)

    return gen


def test_from_generator_without_signature_normalises_like_map() -> None:
    def gen() -> Iterator[Any]:
        yield 1, "a", [0.5, 1.5]
        yield 2, "b", [2.5, 3.5]

    ds = D.from_generator(gen)
    assert ds.cardinality() == fl.UNKNOWN_CARDINALITY
    want = [
        (np.int32(1), b"a", np.array([0.5, 1.5], F32)),
        (np.int32(2), b"b", np.array([2.5, 3.5], F32)),
    ]
    assert_elements_equal(list(ds), want)
    assert ds.element_spec == (Spec((), I32), Spec((), STR), Spec((2,), F32))
    assert_state_roundtrip(ds)


def test_from_generator_passes_args_as_numpy_values() -> None:
    # tf.data converts args to tensors and hands them over as numpy values: an int arrives as
    # int32 and a str as bytes, so ported code calling .decode() on a path keeps working.
    received: list[tuple[Any, ...]] = []

    def gen(n: Any, name: Any, values: Any) -> Iterator[Any]:
        received.append((n, name, values))
        for i in range(int(n)):
            yield name + b"-" + str(i).encode()

    ds = D.from_generator(
        gen, args=(2, "path", [1.0, 2.0]), output_signature=fl.TensorSpec((), "string")
    )
    assert list(ds) == [b"path-0", b"path-1"]
    n, name, values = received[0]
    assert_element_equal((n, name, values), (np.int32(2), b"path", np.array([1, 2], F32)))


def test_from_generator_calls_the_generator_afresh_for_every_pass() -> None:
    calls = []

    def gen() -> Iterator[int]:
        calls.append(len(calls))
        yield from range(len(calls) * 10, len(calls) * 10 + 2)

    ds = D.from_generator(gen)
    assert [int(x) for x in ds.repeat(2)] == [10, 11, 20, 21]
    assert [int(x) for x in ds] == [30, 31]
    assert len(calls) == 3


def test_from_generator_is_not_called_until_the_first_element_is_requested() -> None:
    calls = []

    def gen() -> Iterator[int]:
        calls.append(1)
        yield 1

    it = D.from_generator(gen, output_signature=Spec((), I32)).iterator()
    assert calls == []
    assert next(it) == 1
    it.close()


def test_closing_the_iterator_closes_the_generator() -> None:
    finished = []

    def gen() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            finished.append(True)

    with D.from_generator(gen).iterator() as it:
        assert [int(next(it)) for _ in range(3)] == [0, 1, 2]
    assert finished == [True]


SIGNATURE_CASTS: dict[str, tuple[list[Any], Any, list[Any]]] = {
    "int-to-float32": ([1, 2], Spec((), F32), [np.float32(1), np.float32(2)]),
    "float-truncated-to-int32": ([1.5, -2.7], Spec((), I32), [np.int32(1), np.int32(-2)]),
    "float64-keeps-precision": ([0.1], Spec((), F64), [np.float64(0.1)]),
    "str-to-bytes-scalar": (["a", b"b"], Spec((), STR), [b"a", b"b"]),
    "str-list-to-bytes-array": (
        [["a", "b"], []],
        Spec((None,), STR),
        [strings("a", "b"), strings()],
    ),
    "none-dims-take-any-size": (
        [np.zeros((2, 3)), np.zeros((1, 3))],
        Spec((None, 3), F32),
        [np.zeros((2, 3), F32), np.zeros((1, 3), F32)],
    ),
    # Where the signature has a leaf, tf.data converts whatever is there to one tensor.
    "tuple-for-a-vector": ([(1, 2)], Spec((2,), I32), [np.array([1, 2], I32)]),
    "dict": (
        [{"a": 1, "b": "x"}],
        {"a": Spec((), I64), "b": Spec((), STR)},
        [{"a": np.int64(1), "b": b"x"}],
    ),
    "namedtuple": (
        [Point(1, [2, 3])],
        Point(Spec((), F32), Spec((None,), I64)),
        [Point(np.float32(1), np.array([2, 3], I64))],
    ),
}


@pytest.mark.parametrize(
    "values, signature, want", SIGNATURE_CASTS.values(), ids=SIGNATURE_CASTS.keys()
)
def test_from_generator_casts_to_the_output_signature(
    values: list[Any], signature: Any, want: list[Any]
) -> None:
    ds = D.from_generator(lambda: iter(values), output_signature=signature)
    assert ds.element_spec == signature
    got = list(ds)
    assert_elements_equal(got, want)
    # assert_elements_equal takes a 0-d object array for equal to bytes; tf.data gives bytes.
    assert [type(x) for x in flatten(tuple(got))] == [type(x) for x in flatten(tuple(want))]
    assert_state_roundtrip(ds)


def test_from_generator_output_types_and_shapes() -> None:
    ds = D.from_generator(
        lambda: iter([(1, [1, 2]), (2, [3])]),
        output_types=(np.int32, np.int64),
        output_shapes=([], [None]),
    )
    assert ds.element_spec == (Spec((), I32), Spec((None,), I64))
    assert_elements_equal(
        list(ds),
        [(np.int32(1), np.array([1, 2], I64)), (np.int32(2), np.array([3], I64))],
    )


def test_from_generator_output_shapes_as_tuples() -> None:
    ds = D.from_generator(
        lambda: iter([(1, [1, 2])]),
        output_types=(np.int32, np.int64),
        output_shapes=((), (None,)),
    )
    assert ds.element_spec == (Spec((), I32), Spec((None,), I64))


def test_from_generator_output_types_alone_accept_any_shape() -> None:
    ds = D.from_generator(lambda: iter([[1, 2], [3]]), output_types=np.int32)
    assert_elements_equal(list(ds), [np.array([1, 2], I32), np.array([3], I32)])


def test_from_generator_rejects_a_signature_and_output_types_together() -> None:
    with pytest.raises(TypeError, match="not both"):
        D.from_generator(counting(1), output_types=np.int32, output_signature=Spec((), I32))


SIGNATURE_ERRORS: dict[str, tuple[list[Any], Any, int, str]] = {
    "shape": ([[1, 2], [1, 2, 3]], Spec((2,), I32), 1, r"shape \(3,\) where .*\(2,\)"),
    "rank": ([[1, 2], 7], Spec((2,), I32), 1, r"shape \(\) where"),
    "structure": ([(1, 2), 3], (Spec((), I32), Spec((), I32)), 1, "declared structure"),
    "list-for-tuple": ([[1, "a"]], (Spec((), I32), Spec((), STR)), 0, "declared structure"),
    "dict-keys": ([{"a": 1, "b": 2}], {"a": Spec((), I64)}, 0, "declared structure"),
    "str-for-int": ([1, "abc"], Spec((), I32), 1, "'abc', which is not"),
    "int-for-str": ([1], Spec((), STR), 0, "expected strings"),
    "none-for-int": ([None], Spec((), I32), 0, "None, which is not"),
}


@pytest.mark.parametrize(
    "values, signature, position, message",
    SIGNATURE_ERRORS.values(),
    ids=SIGNATURE_ERRORS.keys(),
)
def test_from_generator_value_not_matching_the_signature_is_a_stage_error(
    values: list[Any], signature: Any, position: int, message: str
) -> None:
    def mismatched() -> Iterator[Any]:
        yield from values

    it = D.from_generator(mismatched, output_signature=signature).iterator()
    delivered = [next(it) for _ in range(position)]
    with pytest.raises(fl.StageError, match=message) as info:
        next(it)
    assert len(delivered) == position
    assert info.value.stage == "from_generator(mismatched)"
    assert info.value.position == position
    it.close()


def test_from_generator_skips_values_not_matching_the_signature_under_ignore_errors() -> None:
    ds = D.from_generator(
        lambda: iter([1, "x", 3, [4, 4], 5]), output_signature=Spec((), I32)
    ).ignore_errors()
    assert [int(x) for x in ds] == [1, 3, 5]
    # The failed values were consumed: resuming after them must not replay them.
    assert_state_roundtrip(ds, cut_points=(0, 1, 2, 3))


def test_generator_exception_is_named_and_delivered_after_earlier_elements() -> None:
    def flaky() -> Iterator[int]:
        yield 1
        yield 2
        raise KeyError("boom")

    it = D.from_generator(flaky).iterator()
    assert [int(next(it)), int(next(it))] == [1, 2]
    with pytest.raises(fl.StageError, match=r"from_generator\(flaky\).*element 2.*boom") as info:
        next(it)
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.position == 2
    # A Python generator that raised is finished, as in tf.data.
    with pytest.raises(StopIteration):
        next(it)


def test_generator_raising_stop_iteration_inside_is_an_error_not_an_end() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise StopIteration  # PEP 479 turns this into RuntimeError

    it = D.from_generator(broken).iterator()
    assert int(next(it)) == 1
    with pytest.raises(fl.StageError) as info:
        next(it)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_generator_function_failing_when_called_is_a_stage_error() -> None:
    def not_a_generator() -> Iterator[int]:
        raise OSError("cannot open")

    with pytest.raises(fl.StageError, match="cannot open") as info:
        list(D.from_generator(not_a_generator, output_signature=Spec((), I32)))
    assert info.value.position == 0
    assert isinstance(info.value.__cause__, OSError)


def test_from_generator_error_under_ignore_errors_ends_the_generator() -> None:
    def flaky() -> Iterator[int]:
        yield 1
        raise ValueError
        yield 2  # unreachable: a generator that raised is finished

    ds = D.from_generator(flaky, output_signature=Spec((), I32)).ignore_errors().repeat(2)
    assert [int(x) for x in ds] == [1, 1]


@pytest.mark.parametrize("repeat", [None, 3], ids=["once", "repeat-3"])
def test_from_generator_state_roundtrip(repeat: int | None) -> None:
    ds = D.from_generator(
        lambda n: (np.full(int(n) % 3, n) for n in range(int(n))),
        args=(8,),
        output_signature=Spec((None,), I64),
    )
    if repeat is not None:
        ds = ds.repeat(repeat)
    assert_state_roundtrip(ds, cut_points=(0, 1, 7, 8, 9, 16))


# -- crafted states -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", [-5, -1, 11, 2**40, "3", 2.0, True, None, [1]])
def test_range_state_with_a_bad_index_is_rejected(index: Any) -> None:
    # The reported case: index -5 yielded values before the start.
    ds = D.range(10)
    state = saved_state(ds, 3)
    state["root"]["index"] = index
    assert_state_rejected(ds, state, "index")


def test_range_state_at_its_end_resumes_an_ended_pass() -> None:
    ds = D.range(0, 10, 3)
    state = saved_state(ds)
    state["root"]["index"] = 4  # 4 values: 0, 3, 6, 9
    assert list(ds.iterator(state)) == []
    state["root"]["index"] = 5
    assert_state_rejected(ds, state, "index")


def test_range_state_without_its_field_is_rejected() -> None:
    ds = D.range(10)
    state = saved_state(ds, 2)
    del state["root"]["index"]
    assert_state_rejected(ds, state, "index")
    state["root"] = [3]
    assert_state_rejected(ds, state, "root")


@pytest.mark.parametrize("index", [-1, 5, "0"])
def test_slices_state_with_a_bad_index_is_rejected(index: Any) -> None:
    ds = D.from_tensor_slices({"a": np.arange(4), "b": strings("w", "x", "y", "z")})
    state = saved_state(ds, 1)
    state["root"]["index"] = index
    assert_state_rejected(ds, state, "index")


@pytest.mark.parametrize("done", [1, "yes", None])
def test_from_tensors_state_done_must_be_a_bool(done: Any) -> None:
    ds = D.from_tensors((1, b"x"))
    state = saved_state(ds)
    state["root"]["done"] = done
    assert_state_rejected(ds, state, "done")
    del state["root"]["done"]
    assert_state_rejected(ds, state, "done")


def test_generator_state_past_its_end_is_rejected_when_resumed() -> None:
    # Silently an empty rest of the pass before: the state is another generator's.
    ds = D.from_generator(lambda: iter(range(5)), output_signature=Spec((), I64))
    state = saved_state(ds, 2)
    state["root"]["produced"] = 6
    assert_state_rejected(ds, state, "produced")
    state["root"]["produced"] = 5  # all of it: the end of the pass
    assert list(ds.iterator(state)) == []
    state["root"]["produced"] = -1
    assert_state_rejected(ds, state, "produced")
