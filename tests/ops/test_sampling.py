"""Dataset.random, sample_from_datasets and choose_from_datasets.

Random values cannot be tf.data's; what is checked against tf.data 2.21 is everything else:
value ranges, which passes repeat their numbers, specs, cardinality, argument checks and the
deterministic cases (one-hot weights, choose_from_datasets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.helpers import assert_state_rejected, assert_state_roundtrip, saved_state, take

pytestmark = pytest.mark.timeout(60)

D = fl.Dataset
i64 = np.int64
INF, UNK = fl.INFINITE_CARDINALITY, fl.UNKNOWN_CARDINALITY


def ints(ds: Any) -> list[int]:
    return [int(v) for v in ds]


# -- Dataset.random ---------------------------------------------------------------------------


def test_random_values_are_int64_in_tf_data_range() -> None:
    ds = D.random(seed=5)
    assert ds.cardinality() == INF
    assert ds.element_spec == fl.TensorSpec((), np.dtype(i64))
    values = np.array(take(ds, 5000))
    assert values.dtype == i64
    assert values.min() >= 0 and values.max() < 2**32
    assert values.max() > 2**31  # the whole 32-bit range, not 31 bits


def test_random_with_a_seed_repeats_every_pass() -> None:
    ds = D.random(seed=1)
    assert take(ds, 5) == take(ds, 5)
    assert ints(ds.take(3).repeat(2)) == ints(ds.take(3)) * 2
    assert take(D.random(seed=2), 5) != take(ds, 5)


def test_random_without_a_seed_is_new_per_iterator_but_not_per_epoch() -> None:
    ds = D.random()
    assert take(ds, 5) != take(ds, 5)
    epochs = ints(ds.take(3).repeat(2))
    assert epochs[:3] == epochs[3:]


def test_random_rerandomized_is_new_per_epoch() -> None:
    epochs = ints(D.random(seed=1, rerandomize_each_iteration=True).take(3).repeat(2))
    assert epochs[:3] != epochs[3:]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: D.random(seed=1).take(30), id="seeded"),
        pytest.param(lambda: D.random().take(30), id="unseeded"),
        pytest.param(
            lambda: D.random(seed=3, rerandomize_each_iteration=True).take(4).repeat(3),
            id="rerandomized_epochs",
        ),
    ],
)
def test_random_state_roundtrip(make: Any) -> None:
    assert_state_roundtrip(make())


def test_random_bad_seed() -> None:
    with pytest.raises(TypeError, match="seed must be an int"):
        D.random(seed=1.5)  # type: ignore[arg-type]


# -- sample_from_datasets ---------------------------------------------------------------------


def two() -> list[fl.Dataset]:
    return [D.range(10), D.range(100, 110)]


def test_sampling_interleaves_every_element_in_each_inputs_order() -> None:
    got = ints(D.sample_from_datasets(two(), seed=3))
    assert sorted(got) == list(range(10)) + list(range(100, 110))
    assert [v for v in got if v < 100] == list(range(10))
    assert got != sorted(got)


def test_sampling_repeats_its_picks_unless_rerandomized() -> None:
    seeded = D.sample_from_datasets(two(), seed=4)
    assert ints(seeded) == ints(seeded)
    unseeded = D.sample_from_datasets(two())  # tf.data fixes the picks when building it too
    assert ints(unseeded) == ints(unseeded)
    epochs = ints(D.sample_from_datasets(two(), seed=4, rerandomize_each_iteration=True).repeat(2))
    assert epochs[:20] != epochs[20:]


def test_sampling_follows_the_weights() -> None:
    ds = D.sample_from_datasets(
        [D.from_tensors(i64(0)).repeat(), D.from_tensors(i64(1)).repeat()], [0.8, 0.2], seed=0
    )
    share = np.mean(take(ds, 5000))
    assert 0.17 < share < 0.23


def test_stop_on_empty_dataset_ends_at_the_first_exhausted_pick() -> None:
    for seed in range(5):
        got = ints(D.sample_from_datasets(two(), seed=seed, stop_on_empty_dataset=True))
        low, high = [v for v in got if v < 100], [v for v in got if v >= 100]
        assert len(low) == 10 or len(high) == 10
        assert len(got) < 20


def test_datasets_of_weight_zero_are_left_out() -> None:
    only_b = D.sample_from_datasets(two(), weights=[0.0, 1.0])
    assert only_b.cardinality() == 10
    assert ints(only_b) == list(range(100, 110))
    assert ints(D.sample_from_datasets(two(), weights=(-1.0, 2.0))) == list(range(100, 110))
    none = D.sample_from_datasets(two(), weights=np.zeros(2))
    assert none.cardinality() == 0
    assert list(none) == []


def test_a_single_dataset_is_returned_as_it_is() -> None:
    ds = D.range(3)
    assert D.sample_from_datasets([ds]) is ds


@pytest.mark.parametrize(
    "datasets, kwargs, error, message",
    [
        ([], {}, ValueError, "must not be empty"),
        (D.range(3), {}, TypeError, "list of Datasets"),
        ([D.range(3), [1, 2]], {}, TypeError, "list of Datasets"),
        (two(), {"weights": [1, 2]}, TypeError, "float32 or float64"),
        (two(), {"weights": [1.0]}, ValueError, "one weight per dataset"),
        (two(), {"weights": [1.0, np.inf]}, ValueError, "finite"),
        ([D.range(3), D.range(3).map(lambda x: 1.0)], {}, TypeError, "compatible element specs"),
        ([D.range(3), D.range(3).map(lambda x: (x, x))], {}, TypeError, "compatible"),
    ],
)
def test_sample_argument_errors(datasets: Any, kwargs: Any, error: Any, message: str) -> None:
    with pytest.raises(error, match=message):
        D.sample_from_datasets(datasets, **kwargs)


def test_sample_spec_and_cardinality() -> None:
    batched = D.sample_from_datasets(
        [D.range(5).batch(2), D.range(6).batch(3, drop_remainder=True)]
    )
    assert batched.element_spec == fl.TensorSpec((None,), np.dtype(i64))
    assert batched.cardinality() == UNK
    ranks = D.sample_from_datasets([D.range(3), D.range(4).batch(2)])
    assert ranks.element_spec == fl.TensorSpec(None, np.dtype(i64))
    assert D.sample_from_datasets([D.range(3), D.range(2).repeat()]).cardinality() == INF


def test_weights_dataset_gives_one_pick_per_element() -> None:
    weights = D.from_tensor_slices([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert ints(D.sample_from_datasets(two(), weights=weights)) == [0, 100, 1]
    endless = D.from_tensor_slices([[1.0, 0.0]]).repeat()
    short = [D.range(2), D.range(10, 12)]
    assert ints(D.sample_from_datasets(short, endless, stop_on_empty_dataset=True)) == [0, 1]


def test_bad_weights_in_a_weights_dataset_fail_when_met() -> None:
    weights = D.from_tensor_slices([[1.0, 0.0], [-1.0, 1.0]])
    with pytest.raises(fl.StageError, match="non-negative"):
        list(D.sample_from_datasets(two(), weights=weights))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: D.sample_from_datasets(two(), [0.3, 0.7], seed=1), id="weights"),
        pytest.param(
            lambda: D.sample_from_datasets(two(), seed=2, stop_on_empty_dataset=True), id="stop"
        ),
        pytest.param(
            lambda: D.sample_from_datasets(
                [D.from_tensor_slices(["a", "b", "c"]), D.from_tensor_slices(["x", "y"])],
                weights=D.from_tensor_slices(np.full((6, 2), 0.5)),
                seed=3,
            ),
            id="weights_dataset",
        ),
        pytest.param(
            lambda: D.sample_from_datasets(
                [D.range(3).repeat(), D.range(10, 13)], seed=5, rerandomize_each_iteration=True
            ).take(30),
            id="infinite",
        ),
    ],
)
def test_sample_state_roundtrip(make: Any) -> None:
    assert_state_roundtrip(make())


# -- choose_from_datasets ---------------------------------------------------------------------


def choices(*picks: int) -> fl.Dataset:
    return D.from_tensor_slices(np.array(picks, i64))


def three() -> list[fl.Dataset]:
    return [D.range(2), D.range(10, 13), D.range(20, 21)]


def test_choose_stops_at_the_first_exhausted_pick_by_default() -> None:
    ds = D.choose_from_datasets(three(), choices(0, 1, 1, 0, 2, 0, 0, 0, 0))
    assert ints(ds) == [0, 10, 11, 1, 20]
    assert ds.cardinality() == UNK


def test_choose_may_pass_over_exhausted_inputs() -> None:
    two_inputs = [D.range(2), D.range(10, 12)]
    ds = D.choose_from_datasets(
        two_inputs, choices(0, 0, 0, 1, 0, 1, 1, 1), stop_on_empty_dataset=False
    )
    assert ints(ds) == [0, 1, 10, 11]


def test_choose_cardinality_is_infinite_with_an_infinite_input() -> None:
    ds = D.choose_from_datasets([D.range(2).repeat(), D.range(10, 13)], D.range(2))
    assert ds.cardinality() == INF
    assert ints(ds) == [0, 10]


@pytest.mark.parametrize("pick, message", [(2, "2 >= 2"), (-1, "-1 >= 2")])
def test_choice_out_of_range(pick: int, message: str) -> None:
    ds = D.choose_from_datasets([D.range(2), D.range(10, 12)], choices(0, pick))
    with pytest.raises(fl.StageError, match=f"Selector index out of range: {message}"):
        list(ds)


@pytest.mark.parametrize(
    "datasets, choice, error",
    [
        (three(), D.range(3).map(lambda x: np.int32(x)), TypeError),
        (three(), D.range(3).batch(2), TypeError),
        (three(), [0, 1], TypeError),
        ([], D.range(3), ValueError),
    ],
)
def test_choose_argument_errors(datasets: Any, choice: Any, error: Any) -> None:
    with pytest.raises(error):
        D.choose_from_datasets(datasets, choice)


def test_choose_state_roundtrip() -> None:
    picks = choices(*([0, 1, 1, 2, 0, 1] * 3))
    inputs = [D.range(10), D.range(50, 60), D.range(2)]
    assert_state_roundtrip(D.choose_from_datasets(inputs, picks, stop_on_empty_dataset=False))


# -- crafted states -----------------------------------------------------------------------------


def _sampled(stop_on_empty_dataset: bool = False) -> fl.Dataset:
    inputs = [D.range(5), D.range(10, 15)]
    return D.sample_from_datasets(
        inputs, weights=[0.5, 0.5], seed=3, stop_on_empty_dataset=stop_on_empty_dataset
    )


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.update(picks=-1), "picks"),
        (lambda r: r.update(done=0), "done"),
        (lambda r: r["inputs"].pop(), "inputs"),  # another number of datasets
        (lambda r: r["inputs"].append({"index": 0}), "inputs"),
        (lambda r: r["inputs"].__setitem__(0, [0]), "inputs"),
        (lambda r: r.update(inputs=[None, None]), "done"),  # all done, yet not done
        (lambda r: r.update(selector=None), "selector"),
        (lambda r: r["selector"].update(drawn=-5), "drawn"),
        (lambda r: r["selector"].update(seed=4), "seed"),  # not the seed given
        (lambda r: r["selector"].pop("run"), "run"),
    ],
)
def test_sample_state_with_a_bad_field_is_rejected(
    edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    ds = _sampled()
    state = saved_state(ds, 2)
    edit(state["root"])
    assert_state_rejected(ds, state, field)


def test_sample_state_with_an_input_done_must_be_done_when_that_ends_it() -> None:
    ds = _sampled(stop_on_empty_dataset=True)
    state = saved_state(ds, 2)
    state["root"]["inputs"][1] = None
    assert_state_rejected(ds, state, "done")


def test_random_state_is_checked() -> None:
    ds = D.random(seed=5).take(10)
    state = saved_state(ds, 2)
    state["root"]["input"]["drawn"] = 2**70
    assert_state_rejected(ds, state, "drawn")
    state["root"]["input"]["drawn"] = 2
    state["root"]["input"]["epoch"] = 1  # a seeded random repeats its first pass only
    assert_state_rejected(ds, state, "epoch")
