"""shuffle: seeded, reproducible, bounded by its buffer, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import (
    assert_root_field_rejected,
    assert_state_rejected,
    assert_state_roundtrip,
    saved_state,
    take,
)

pytestmark = pytest.mark.timeout(60)

N = 50


def values(ds: fl.Dataset) -> list[int]:
    return [int(x) for x in ds]


def orders_of(ds: fl.Dataset, passes: int) -> list[list[int]]:
    return [values(ds) for _ in range(passes)]


def test_seeded_orders_are_the_same_in_a_new_process() -> None:
    # Two iterators (the second one reshuffles) and two epochs under repeat.
    script = textwrap.dedent(
        """
        import json
        import feedline as fl
        ds = fl.Dataset.range(50).shuffle(20, seed=1234)
        out = [[int(x) for x in ds] for _ in range(2)]
        out.append([int(x) for x in ds.repeat(2)])
        print(json.dumps(out))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    ds = fl.Dataset.range(N).shuffle(20, seed=1234)
    here = [*orders_of(ds, 2), values(ds.repeat(2))]
    assert json.loads(done.stdout) == here


def test_reshuffle_gives_a_new_order_per_iterator_derived_from_the_seed() -> None:
    first = orders_of(fl.Dataset.range(N).shuffle(N, seed=5), 3)
    again = orders_of(fl.Dataset.range(N).shuffle(N, seed=5), 3)
    assert first == again
    assert len({tuple(o) for o in first}) == 3
    assert all(sorted(o) == list(range(N)) for o in first)


def test_reshuffle_gives_a_new_order_per_epoch_of_repeat() -> None:
    ds = fl.Dataset.range(N).shuffle(N, seed=5).repeat(3)
    out = values(ds)
    epochs = [out[i * N : (i + 1) * N] for i in range(3)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    assert values(fl.Dataset.range(N).shuffle(N, seed=5).repeat(3)) == out


def test_no_reshuffle_repeats_one_order() -> None:
    ds = fl.Dataset.range(N).shuffle(N, seed=5, reshuffle_each_iteration=False)
    order = values(ds)
    assert order != list(range(N))
    assert orders_of(ds, 2) == [order, order]
    assert values(ds.repeat(3)) == order * 3


@pytest.mark.parametrize("buffer_size", [2, 5, 17])
def test_output_k_comes_from_the_first_buffer_size_plus_k_elements(buffer_size: int) -> None:
    for seed in range(100):
        out = values(fl.Dataset.range(40).shuffle(buffer_size, seed=seed))
        assert out[0] < buffer_size
        assert all(x < buffer_size + k for k, x in enumerate(out))


@pytest.mark.parametrize("buffer_size", [1, 2, 10, N, 1000])
def test_is_a_permutation(buffer_size: int) -> None:
    out = values(fl.Dataset.range(N).shuffle(buffer_size, seed=3))
    assert sorted(out) == list(range(N))


def test_buffer_size_one_is_identity() -> None:
    assert values(fl.Dataset.range(N).shuffle(1, seed=3)) == list(range(N))


def test_keeps_elements_and_spec() -> None:
    ds = fl.Dataset.from_tensor_slices(
        {"x": np.arange(6, dtype=np.float32), "s": ["a", "b", "c", "d", "e", "f"]}
    )
    shuffled = ds.shuffle(6, seed=0)
    assert shuffled.element_spec == ds.element_spec
    assert shuffled.cardinality() == 6
    pairs = sorted((float(e["x"]), e["s"]) for e in shuffled)
    assert pairs == [(float(i), c.encode()) for i, c in enumerate("abcdef")]


def test_unseeded_datasets_differ() -> None:
    a = values(fl.Dataset.range(N).shuffle(N))
    b = values(fl.Dataset.range(N).shuffle(N))
    assert sorted(a) == sorted(b) == list(range(N))
    assert a != b


def test_negative_seed_is_accepted_and_deterministic() -> None:
    a = values(fl.Dataset.range(N).shuffle(N, seed=-1))
    assert a == values(fl.Dataset.range(N).shuffle(N, seed=-1))
    assert sorted(a) == list(range(N))


@pytest.mark.parametrize("seed", [1.5, "1", True])
def test_bad_seed_fails_at_build_time(seed: object) -> None:
    with pytest.raises(TypeError, match="seed"):
        fl.Dataset.range(3).shuffle(3, seed=seed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: fl.Dataset.range(30).shuffle(7, seed=11), id="seeded"),
        pytest.param(lambda: fl.Dataset.range(30).shuffle(7), id="unseeded"),
        pytest.param(
            lambda: fl.Dataset.range(30).shuffle(7, seed=11, reshuffle_each_iteration=False),
            id="no-reshuffle",
        ),
        pytest.param(
            lambda: fl.Dataset.range(12).map(lambda x: x * 2).shuffle(5, seed=2).repeat(3),
            id="repeat",
        ),
        pytest.param(
            lambda: fl.Dataset.range(8).shuffle(8, seed=2).repeat(2).shuffle(4, seed=9),
            id="nested",
        ),
    ],
)
def test_state_roundtrip(make) -> None:
    # Cuts inside the later epochs check that a restored pass continues the epoch sequence.
    assert_state_roundtrip(make(), cut_points=(0, 1, 5, 13, 25, 30))


def test_state_resumes_an_unseeded_shuffle_in_a_rebuilt_pipeline() -> None:
    # A new process rebuilds the pipeline, with a new random seed; the state carries the old one.
    def build() -> fl.Dataset:
        return fl.Dataset.range(40).shuffle(10).repeat(2)

    with build().iterator() as it:
        take(it, 25)
        state = json.loads(json.dumps(it.get_state()))
        rest = values(it)
    with build().iterator(state) as resumed:
        assert values(resumed) == rest


def test_first_order_does_not_depend_on_spec_inference() -> None:
    def build() -> fl.Dataset:
        return fl.Dataset.range(N).shuffle(N, seed=4).map(lambda x: x + 1)

    plain = values(build())
    probed = build()
    _ = probed.element_spec
    assert values(probed) == plain


# -- crafted states -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("produced", N + 1),  # past the end of a pass of known length
        ("produced", -1),
        ("produced", "2"),
        ("seed", 99),  # another seed than the one given: another pipeline's state
        ("seed", -1),
        ("run", -2),
        ("epoch", 1.5),
        ("input_start", None),  # would restart the input: a silently wrong pass
        ("input_start", []),
    ],
)
def test_state_with_a_bad_field_is_rejected(field: str, value: Any) -> None:
    assert_root_field_rejected(fl.Dataset.range(N).shuffle(10, seed=7), 3, field, value)


def test_state_past_the_end_of_an_input_of_unknown_length_is_rejected() -> None:
    # Replaying it ran off the end of the input: silently an empty rest of the pass before.
    ds = fl.Dataset.range(N).filter(lambda x: x % 2 == 0).shuffle(10, seed=7)
    state = saved_state(ds, 3)
    state["root"]["produced"] = N // 2 + 1
    assert_state_rejected(ds, state, "produced")
    state["root"]["produced"] = N // 2  # the whole pass: resumes at its end
    assert list(ds.iterator(state)) == []


def test_a_shuffle_that_never_reshuffles_only_has_the_first_pass() -> None:
    ds = fl.Dataset.range(N).shuffle(10, seed=7, reshuffle_each_iteration=False)
    state = saved_state(ds, 3)
    state["root"]["run"] = 1
    assert_state_rejected(ds, state, "run")
