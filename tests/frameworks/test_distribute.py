"""``feedline.distribute``: disjoint parts that cover the data, by file where it can, and ranks
that all yield the same number of elements."""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import feedline as fl
import feedline.distribute as dist
from tests.helpers import assert_state_roundtrip


def values(ds: fl.Dataset) -> list[object]:
    """Every row of every element, as Python values (batches split)."""
    out: list[object] = []
    for element in ds:
        rows = element if isinstance(element, np.ndarray) and element.ndim else [element]
        out.extend(r.item() if isinstance(r, np.generic) else r for r in rows)
    return out


def write_files(tmp_path: Path, files: int, lines: int) -> list[str]:
    paths = []
    for f in range(files):
        path = tmp_path / f"part-{f}.txt"
        path.write_text("".join(f"{f}-{i}\n" for i in range(lines)))
        paths.append(str(path))
    return paths


def assert_parts_cover_once(ds: fl.Dataset, n: int, by: str) -> list[list[object]]:
    parts = []
    for i in range(n):
        part, how = dist.shard(ds, n, i)
        assert how == by
        parts.append(values(part))
    everything = Counter(values(ds))
    assert Counter(v for part in parts for v in part) == everything
    return parts


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_element_parts_are_disjoint_and_cover(n: int) -> None:
    ds = (
        fl.Dataset.range(50)
        .map(lambda x: x * 3)
        .filter(lambda x: x % 2 == 0)
        .shuffle(8, seed=1)
        .batch(4)
    )
    assert_parts_cover_once(ds, n, "element")


def test_the_split_goes_below_the_per_element_ops() -> None:
    calls = []

    def work(x: np.int64) -> np.int64:
        calls.append(int(x))
        return x

    ds = fl.Dataset.range(40).map(work).batch(5)
    part, by = dist.shard(ds, 4, 1)
    assert by == "element"
    assert repr(part) == "<Dataset range(0, 40, 1) -> shard(4, 1) -> map(work) -> batch(5)>"
    part.element_spec  # noqa: B018 - its tracing calls the function: not counted below
    calls.clear()
    assert values(part) == list(range(1, 40, 4))
    assert sorted(calls) == list(range(1, 40, 4))  # no work done for other parts


def test_ops_that_count_elements_split_above_them() -> None:
    ds = fl.Dataset.range(30).take(17).map(lambda x: x + 1)
    part, _ = dist.shard(ds, 2, 0)
    assert repr(part).endswith("take(17) -> shard(2, 0) -> map(<lambda>)>")
    assert_parts_cover_once(ds, 2, "element")


def test_text_files_are_split_by_file(tmp_path: Path) -> None:
    paths = write_files(tmp_path, 5, 4)
    ds = fl.TextLineDataset(paths).map(lambda s: s + b"!")
    parts = assert_parts_cover_once(ds, 2, "file")
    # Each part has whole files: 3 and 2 of them.
    assert {line.split(b"-")[0] for line in parts[0]} == {b"0", b"2", b"4"}
    assert len(parts[1]) == 8


def test_listed_files_are_split_by_name_below_an_unseeded_shuffle(tmp_path: Path) -> None:
    write_files(tmp_path, 6, 3)
    ds = fl.Dataset.list_files(str(tmp_path / "*.txt")).interleave(
        fl.TextLineDataset, cycle_length=2, num_parallel_calls=2
    )
    parts = assert_parts_cover_once(ds, 3, "file")
    for part in parts:
        assert len({line.split(b"-")[0] for line in part}) == 2


def test_fewer_files_than_parts_split_by_element(tmp_path: Path) -> None:
    paths = write_files(tmp_path, 2, 5)
    assert_parts_cover_once(fl.TextLineDataset(paths), 3, "element")


def test_an_unseeded_shuffle_below_an_element_split_warns() -> None:
    ds = fl.Dataset.range(10).shuffle(10).take(5)
    with pytest.warns(UserWarning, match="no seed"):
        dist.shard(ds, 2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist.shard(fl.Dataset.range(10).shuffle(10, seed=1).take(5), 2, 0)
        dist.shard(fl.Dataset.range(10).shuffle(10), 2, 0)  # split below it: no risk


def test_a_part_resumes_exactly(tmp_path: Path) -> None:
    write_files(tmp_path, 4, 6)
    ds = fl.Dataset.list_files(str(tmp_path / "*.txt"), seed=2).interleave(
        fl.TextLineDataset, cycle_length=2
    )
    part, _ = dist.shard(ds.batch(2), 2, 1)
    assert_state_roundtrip(part, cut_points=(0, 1, 2, 5))
    plain = dist.auto_shard(fl.Dataset.range(23).batch(2), 3, 2, "pad")
    assert_state_roundtrip(plain, cut_points=(0, 1, 3, 4))


@pytest.mark.parametrize(
    ("rank_env", "want"),
    [({}, (0, 1, "single process")), ({"RANK": "2", "WORLD_SIZE": "4"}, (2, 4, "RANK/WORLD_SIZE"))],
)
def test_ranks_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, rank_env: dict[str, str], want: tuple[int, int, str]
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in rank_env.items():
        monkeypatch.setenv(key, value)
    assert dist.rank_and_world() == want


def test_auto_shard_reads_the_rank_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = dist.auto_shard(fl.Dataset.range(10))
    assert values(ds) == [1, 4, 7]
    plan = dist.shard_plan(ds)
    assert plan is not None and (plan.index, plan.num_shards, plan.ranks_from) == (
        1,
        3,
        "RANK/WORLD_SIZE",
    )


def rank_outputs(ds: fl.Dataset, world: int, equalize: str) -> list[list[object]]:
    return [values(dist.auto_shard(ds, world, rank, equalize)) for rank in range(world)]


@pytest.mark.parametrize("known", [True, False])
def test_drop_gives_equal_disjoint_parts(known: bool) -> None:
    ds = fl.Dataset.range(22)
    if not known:
        ds = ds.filter(lambda x: x != 5)  # unknown cardinality: the parts are counted
    outputs = rank_outputs(ds, 4, "drop")
    assert {len(o) for o in outputs} == {5}
    flat = [v for o in outputs for v in o]
    assert len(set(flat)) == len(flat)
    plan = dist.shard_plan(dist.auto_shard(ds, 4, 0))
    assert plan is not None and (plan.own, plan.each, plan.dropped) == (6, 5, 1)


def test_pad_covers_everything_and_masks_the_padding() -> None:
    outputs = rank_outputs(fl.Dataset.range(10), 4, "pad")
    assert {len(o) for o in outputs} == {3}
    real = [x for o in outputs for x, is_real in o if is_real]
    assert sorted(real) == list(range(10))
    padding = [(rank, x) for rank, o in enumerate(outputs) for x, is_real in o if not is_real]
    assert padding == [(2, 2), (3, 3)]  # each part repeats its own first element


def test_repeat_covers_everything_from_the_start() -> None:
    ds = fl.Dataset.range(9).batch(2)  # 5 batches over 2 ranks: 3 and 2
    outputs = [list(dist.auto_shard(ds, 2, rank, "repeat")) for rank in range(2)]
    assert [len(o) for o in outputs] == [3, 3]
    assert [b.tolist() for b in outputs[1]] == [[1, 3], [5, 7], [1, 3]]
    assert sorted(x for o in outputs for b in o for x in b.tolist()) == sorted([*range(9), 1, 3])


def test_the_plan_is_in_the_report_and_the_cardinality_is_exact() -> None:
    ds = dist.auto_shard(fl.Dataset.range(10).filter(lambda x: x < 9), 2, 1, "drop")
    assert ds.cardinality() == 4
    with ds.iterator() as it:
        assert len(list(it)) == 4
        report = it.report(file=io.StringIO())
    assert (
        "auto_shard: rank 1 of 2 (given), by element; 4 elements, 4 each (drop: 0 dropped)"
        in report
    )


def test_infinite_datasets_need_no_equalizing() -> None:
    ds = dist.auto_shard(fl.Dataset.range(5).repeat(), 2, 0, "pad")
    assert ds.cardinality() == fl.INFINITE_CARDINALITY
    with ds.iterator() as it:
        # Split below the repeat: every epoch, this rank's part.
        assert [int(next(it)) for _ in range(5)] == [0, 2, 4, 0, 2]


def test_bad_arguments() -> None:
    ds = fl.Dataset.range(4)
    with pytest.raises(ValueError, match="equalize"):
        dist.auto_shard(ds, 2, 0, "truncate")
    with pytest.raises(ValueError, match="both"):
        dist.auto_shard(ds, 2)
    with pytest.raises(ValueError, match="index"):
        dist.shard(ds, 2, 2)
    with pytest.raises(ValueError, match="empty"):
        dist.auto_shard(fl.Dataset.range(1), 2, 1, "pad")


@pytest.mark.parametrize(
    ("policy", "by"), [("AUTO", "file"), ("FILE", "file"), ("DATA", "element"), ("OFF", "off")]
)
def test_the_auto_shard_policy_option(tmp_path: Path, policy: str, by: str) -> None:
    options = fl.Options()
    options.experimental_distribute.auto_shard_policy = policy
    ds = fl.TextLineDataset(write_files(tmp_path, 4, 3)).with_options(options)
    part, how = dist.shard(ds, 2, 1)
    assert how == by
    assert len(values(part)) == (12 if policy == "OFF" else 6)
    if policy != "OFF":
        assert_parts_cover_once(ds, 2, by)


def test_a_file_policy_without_files_is_refused() -> None:
    options = fl.Options()
    options.experimental_distribute.auto_shard_policy = fl.experimental.AutoShardPolicy.FILE
    with pytest.raises(ValueError, match="FILE"):
        dist.shard(fl.Dataset.range(8).with_options(options), 2, 0)
    options.experimental_distribute.auto_shard_policy = "HINT"
    with pytest.raises(ValueError, match="HINT"):
        dist.shard(fl.Dataset.range(8).with_options(options), 2, 0)
