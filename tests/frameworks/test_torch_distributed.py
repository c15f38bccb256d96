"""Two ranks of a real torch.distributed process group (gloo on 127.0.0.1): ``auto_shard``
gives equal counts, disjoint (drop) or covering (pad / repeat) parts, and
``feedline.torch.IterableDataset`` splits between ranks and their DataLoader workers."""

from __future__ import annotations

import pytest

from tests.frameworks.helpers import no_process_left, run_script

pytest.importorskip("torch.distributed")

SETUP = """
import datetime, json
import torch, torch.distributed as dist
import feedline as fl, feedline.distribute as fd, feedline.torch as ft

dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
"""

AUTO_SHARD = (
    SETUP
    + """
# 45 elements, 31 kept by the filter: an unknown cardinality, counted through the group.
ds = fl.Dataset.range(45).filter(lambda x: x % 3 != 0 or x > 40)
out = {}
for policy in ("drop", "pad", "repeat"):
    sharded = fd.auto_shard(ds, equalize=policy)
    rows = []
    for element in sharded:
        value, real = element if policy == "pad" else (element, True)
        rows.append([int(value), bool(real)])
    plan = fd.shard_plan(sharded)
    out[policy] = {"rows": rows, "plan": [plan.own, plan.each, plan.dropped, plan.added,
                                          plan.ranks_from]}
    # The equal count lets every rank take part in each collective (as DDP's all-reduce).
    for _ in rows:
        t = torch.ones(1)
        dist.all_reduce(t)
dist.destroy_process_group()
print(json.dumps(out))
"""
)


@pytest.mark.timeout(240)
def test_two_ranks_get_equal_disjoint_or_covering_parts() -> None:
    with no_process_left():
        ranks = run_script(AUTO_SHARD, ranks=2, timeout=180)
    everything = sorted(x for x in range(45) if x % 3 != 0 or x > 40)
    for policy in ("drop", "pad", "repeat"):
        parts = [r[policy]["rows"] for r in ranks]
        plans = [r[policy]["plan"] for r in ranks]
        assert len(parts[0]) == len(parts[1]), policy
        assert {p[4] for p in plans} == {"torch.distributed"}
        real = [x for part in parts for x, is_real in part if is_real]
        if policy == "drop":
            assert len(set(real)) == len(real) and set(real) <= set(everything)
            assert all(p[1] == min(q[0] for q in plans) == p[0] - p[2] for p in plans)
        else:
            assert sorted(real if policy == "pad" else set(real)) == everything, policy
            assert all(p[1] == max(q[0] for q in plans) == p[0] + p[3] for p in plans)
    # Split below the filter: evens and odds, 16 and 15 of them kept.
    assert [p["drop"]["plan"][:4] for p in ranks] == [[16, 15, 1, 0], [15, 15, 0, 0]]
    assert [p["pad"]["plan"][:4] for p in ranks] == [[16, 16, 0, 0], [15, 16, 0, 1]]


ITERABLE = (
    SETUP
    + """
ds = fl.Dataset.range(60).map(lambda x: x + 1000, num_parallel_calls=2)
loader = torch.utils.data.DataLoader(ft.IterableDataset(ds), batch_size=None, num_workers=2)
got = sorted(int(x) for x in loader)
dist.destroy_process_group()
print(json.dumps(got))
"""
)


@pytest.mark.timeout(240)
def test_ranks_and_their_workers_read_each_element_once() -> None:
    with no_process_left():
        ranks = run_script(ITERABLE, ranks=2, timeout=180)
    assert sorted(ranks[0] + ranks[1]) == list(range(1000, 1060))
    assert len(ranks[0]) == len(ranks[1]) == 30
