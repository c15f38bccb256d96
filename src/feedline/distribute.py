"""Rank sharding: ``auto_shard`` gives each training process (rank) its own part of a dataset.

tf.data's counterpart is ``tf.data.experimental.AutoShardPolicy`` (FILE, else DATA) applied by
``tf.distribute``; torch users call ``DistributedSampler``. Here:

- ``shard(ds, num_shards, index)``: one of ``num_shards`` disjoint parts that together hold
  every element once. By file where the dataset reads files (each part reads only its files),
  else by element; either way the split happens as near the source as it can go (below maps,
  filters, shuffles and batches, which then run on the part only), so no rank does another's
  work. ``feedline.torch.IterableDataset`` splits between DataLoader workers with it too.
- ``auto_shard(ds, ...)``: the rank's part, with every rank yielding the same number of
  elements (one rank with an extra batch hangs DDP's all-reduce), by ``drop`` / ``pad`` /
  ``repeat``; the iterator's report says how many were dropped or added.
- ``rank_and_world()``: where the rank comes from (torch.distributed, JAX, ``RANK`` /
  ``WORLD_SIZE``).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from feedline.dataset import Dataset
from feedline.ops.base import INFINITE, UNKNOWN, Op, UnaryIterator, UnaryOp, require_positive_int
from feedline.ops.batching import BatchOp, RebatchOp, UnbatchOp
from feedline.ops.interleave import InterleaveOp
from feedline.ops.mapping import FilterOp, IgnoreErrorsOp, MapOp
from feedline.ops.prefetch import PrefetchOp
from feedline.ops.scheduled_batch import ScheduledBatchOp
from feedline.ops.shuffle import ShuffleOp
from feedline.ops.slicing import RepeatOp, ShardOp
from feedline.ops.sources import TensorSlicesOp
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.structure import STRING_DTYPE, TensorSpec

__all__ = ["ShardPlan", "auto_shard", "rank_and_world", "shard", "shard_plan"]

EQUALIZE = ("drop", "pad", "repeat")

# Ops a split may pass below: each handles every element (or batch of them) on its own, so
# splitting their input gives each part exactly its share of their output. Not take, skip,
# enumerate, scan, window, zip... (they count or pair elements: a part would get other ones).
# A batch passed below batches the part's own elements: each row still comes out once.
_PER_ELEMENT = (
    MapOp,
    FilterOp,
    IgnoreErrorsOp,
    BatchOp,  # padded_batch too (a subclass)
    ScheduledBatchOp,
    UnbatchOp,
    RebatchOp,
    ShuffleOp,
    PrefetchOp,
    RepeatOp,
)
# Between a list of file names and the interleave reading them: a split of the names there
# gives each part its own files.
_NAME_ORDER = (ShuffleOp, RepeatOp, PrefetchOp)


def rank_and_world() -> tuple[int, int, str]:
    """``(rank, world_size, where from)``: torch.distributed's process group when one is
    initialized, else JAX's processes when there are several, else the ``RANK`` and
    ``WORLD_SIZE`` variables (torchrun sets them), else ``(0, 1, "single process")``.

    Only frameworks already imported are asked: sharding never imports torch or JAX."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), "torch.distributed"
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        return jax.process_index(), jax.process_count(), "jax"
    if "WORLD_SIZE" in os.environ:
        try:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        except ValueError as e:
            raise ValueError(f"RANK / WORLD_SIZE must be integers: {e}") from None
        return rank, world, "RANK/WORLD_SIZE"
    return 0, 1, "single process"


@dataclass(frozen=True)
class ShardPlan:
    """What ``auto_shard`` decided for this rank: ``shard_plan(ds)`` of the dataset it
    returned, and a line of its iterators' report."""

    index: int
    num_shards: int
    by: str  # "file", "element" or "off" (auto_shard_policy OFF: not split)
    ranks_from: str
    equalize: str
    own: int  # elements of this rank's part, before equalizing (INFINITE: no end)
    each: int  # elements every rank yields
    dropped: int  # of this rank's part
    added: int  # padded or repeated elements

    def describe(self) -> str:
        head = (
            f"auto_shard: rank {self.index} of {self.num_shards} ({self.ranks_from}), by {self.by}"
        )
        if self.own == INFINITE:
            return f"{head}; infinite, nothing to equalize"
        change = {"drop": f"{self.dropped} dropped", "pad": f"{self.added} padded"}
        done = change.get(self.equalize, f"{self.added} repeated")
        return f"{head}; {self.own} elements, {self.each} each ({self.equalize}: {done})"


def shard(ds: Dataset, num_shards: int, index: int) -> tuple[Dataset, str]:
    """Part ``index`` of ``num_shards`` disjoint parts holding every element of ``ds`` once,
    and how it was split: ``"file"``, ``"element"`` (or ``"off"``, see below).

    The split goes as near the source as the ops above it allow (see ``_PER_ELEMENT``). There,
    a reader of a list of files (an op with a ``paths`` list, such as ``TextLineDataset``'s)
    keeps every ``num_shards``-th file, and an interleave over a list of file names (as after
    ``list_files``) reads every ``num_shards``-th name, when there are at least
    ``num_shards`` files; otherwise every ``num_shards``-th element is kept there. Batches
    above the split batch the part's own elements.

    ``Options().experimental_distribute.auto_shard_policy`` is read as tf.data reads it:
    AUTO (or unset) as above, FILE by file or a ``ValueError``, DATA by element, OFF not at
    all (every part is the whole dataset: ``"off"``)."""
    n = require_positive_int(num_shards, "num_shards")
    i = require_positive_int(index, "index", allow_zero=True)
    if i >= n:
        raise ValueError(f"index must be < num_shards ({n}), got {i}")
    policy = _policy(ds)
    if policy == "OFF":
        return ds, "off"
    if n == 1:
        return ds, "element"
    chain = [ds._op]
    while isinstance(chain[-1], _PER_ELEMENT):
        chain.append(chain[-1].input)  # type: ignore[attr-defined]
    bottom = chain.pop()
    split, by = _split_files(bottom, n, i) if policy != "DATA" else (None, "element")
    if split is None and policy == "FILE":
        raise ValueError(
            f"auto_shard_policy FILE: {bottom.name} reads no list of at least {n} files to "
            "split (use AUTO or DATA to split by element)"
        )
    if split is None:
        _warn_if_unseeded(bottom)
        split, by = ShardOp(bottom, n, i), "element"
    for op in reversed(chain):
        split = _with_input(op, split)
    return Dataset(split, ds.options()), by


def _policy(ds: Dataset) -> str:
    policy = ds.options().experimental_distribute.auto_shard_policy
    if policy is None:
        return "AUTO"
    if policy.name == "HINT":
        # tf.data's HINT splits where shard(SHARD_HINT, SHARD_HINT) placeholders stand.
        raise ValueError("auto_shard_policy HINT: feedline has no SHARD_HINT placeholders")
    return str(policy.name)


def _split_files(op: Op, n: int, i: int) -> tuple[Op | None, str]:
    """``op`` reading only its part of the files, or None if it reads no list of files (or
    one of fewer than ``n``)."""
    paths = getattr(op, "paths", None)
    if (
        isinstance(paths, list | tuple)
        and len(paths) >= n
        and all(isinstance(p, str) for p in paths)
    ):
        part = copy.copy(op)
        part.paths = list(paths[i::n])  # type: ignore[attr-defined]
        _forget_spec(part)
        return part, "file"
    if isinstance(op, InterleaveOp):
        names = [op.input]
        while isinstance(names[-1], _NAME_ORDER):
            names.append(names[-1].input)  # type: ignore[attr-defined]
        source = names.pop()
        if isinstance(source, TensorSlicesOp) and source.cardinality() >= n:
            spec = source.element_spec()
            if isinstance(spec, TensorSpec) and spec.dtype == STRING_DTYPE and spec.shape == ():
                # Split below a shuffle of the names: an unseeded one shuffles differently in
                # each rank, and the parts would overlap.
                split: Op = ShardOp(source, n, i)
                for above in reversed([op, *names]):
                    split = _with_input(above, split)
                return split, "file"
    return None, "element"


def _with_input(op: Op, new_input: Op) -> Op:
    """A copy of the one-input ``op`` reading ``new_input``."""
    clone = copy.copy(op)
    clone.input = new_input  # type: ignore[attr-defined]
    clone.inputs = (new_input,)
    _forget_spec(clone)
    return clone


def _forget_spec(op: Op) -> None:
    # copy.copy goes through Op.__getstate__/__setstate__: the copy has a lock of its own.
    op._spec, op._spec_known = None, False


def ops_of(op: Op) -> Iterator[Op]:
    """``op`` and every op below it."""
    stack = [op]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.inputs)


def _warn_if_unseeded(op: Op) -> None:
    """Elements split above a random choice made without a seed (a shuffle, a sample) can
    overlap: each rank's process draws its own seed, so ranks see different orders."""
    for node in ops_of(op):
        passes = getattr(node, "passes", None)
        if passes is not None and not passes.seeded and not isinstance(node, MapOp):
            warnings.warn(
                f"sharding by element above {node.name}, which has no seed: processes draw "
                "their own random order, so their shares may overlap; give it a seed",
                stacklevel=4,
            )
            return


def auto_shard(
    ds: Dataset,
    num_shards: int | None = None,
    index: int | None = None,
    equalize: str = "drop",
) -> Dataset:
    """This rank's part of ``ds`` (see ``shard``), every rank yielding the same number of
    elements. tf.data: ``tf.distribute`` with ``AutoShardPolicy.AUTO``.

    ``num_shards`` / ``index`` default to ``rank_and_world()``. ``equalize``: ``"drop"`` the
    elements past the smallest part's count; ``"pad"`` up to the largest part's count with
    elements repeated from the part's start, each element becoming ``(element, is_real)``
    (``np.bool_``: False on padding, to mask out of the loss); ``"repeat"`` up to the largest
    count from the part's start. Counting needs the parts' cardinalities; where they are
    unknown (a filter, a file reader), each part is read once to count it (each rank its own
    when the ranks come from torch.distributed or JAX, gathering the counts; else every part
    in this process). The iterator's
    report shows the plan (rank, split, how many dropped or added)."""
    if equalize not in EQUALIZE:
        raise ValueError(f"equalize must be one of {EQUALIZE}, got {equalize!r}")
    rank, world, ranks_from = rank_and_world()
    if num_shards is not None or index is not None:
        if num_shards is None or index is None:
            raise ValueError("pass both num_shards and index, or neither")
        rank, world, ranks_from = index, num_shards, "given"
    part, by = shard(ds, world, rank)
    counts = _counts(ds, world, rank, part, ranks_from)
    own = counts[rank]
    if own == INFINITE:
        plan = ShardPlan(rank, world, by, ranks_from, equalize, own, own, 0, 0)
        return Dataset(ShardPlanOp(part._op, plan), part.options())
    each = min(counts) if equalize == "drop" else max(counts)
    if each > own and own == 0:
        raise ValueError(
            f"rank {rank}'s part of the dataset is empty: there is nothing to {equalize} it "
            f"with up to {each} elements (use fewer ranks, or equalize='drop')"
        )
    plan = ShardPlan(
        rank, world, by, ranks_from, equalize, own, each, max(0, own - each), max(0, each - own)
    )
    if equalize == "drop":
        out = part.take(each)
    elif equalize == "repeat":
        out = part.repeat().take(each)
    else:
        real = Dataset.from_tensors(np.bool_(True)).repeat()
        padding = Dataset.from_tensors(np.bool_(False)).repeat()
        out = Dataset.zip((part, real)).concatenate(
            Dataset.zip((part.repeat().take(plan.added), padding))
        )
    return Dataset(ShardPlanOp(out._op, plan), part.options())


def _counts(ds: Dataset, world: int, rank: int, part: Dataset, ranks_from: str) -> list[int]:
    """Every part's number of elements: from cardinalities, else by reading the parts."""
    cardinalities = [
        shard(ds, world, j)[0].cardinality() if j != rank else part.cardinality()
        for j in range(world)
    ]
    if UNKNOWN not in cardinalities:
        return cardinalities
    if ranks_from == "torch.distributed":
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, _count(part))
        return [int(c) for c in gathered]
    if ranks_from == "jax":
        from jax.experimental import multihost_utils

        counts = multihost_utils.process_allgather(np.int64(_count(part)))
        return [int(c) for c in np.asarray(counts).ravel()]
    return [_count(shard(ds, world, j)[0]) if j != rank else _count(part) for j in range(world)]


def _count(ds: Dataset) -> int:
    n = ds.cardinality()
    if n >= 0 or n == INFINITE:
        return n
    with ds.iterator() as it:
        return sum(1 for _ in it)


def shard_plan(ds: Dataset) -> ShardPlan | None:
    """The plan ``auto_shard`` made for ``ds`` (None for a dataset it did not make)."""
    op = ds._op
    return op.plan if isinstance(op, ShardPlanOp) else None


class ShardPlanOp(UnaryOp):
    """The top of what ``auto_shard`` returns: passes elements through, knows the exact count
    every rank yields, and puts the plan in the report."""

    def __init__(self, input_op: Op, plan: ShardPlan) -> None:
        super().__init__(input_op)
        self.plan = plan
        self.name = f"auto_shard({plan.index}/{plan.num_shards}, {plan.equalize})"

    def cardinality(self) -> int:
        return self.plan.each

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        ctx.note(self.plan.describe())
        return _PassThrough(self, ctx, state)


class _PassThrough(UnaryIterator):
    def __next__(self) -> Any:
        return next(self.input)

    def next_chunk(self, max_n: int) -> list[Any]:
        return self.input.next_chunk(max_n)

    def get_state(self) -> State:
        return {"input": self.input.get_state()}
