"""Virtual shards: how the pipeline before ``distribute`` splits into parts that actors run.

Shard ``k`` of ``S`` is the pipeline with ``shard(S, k)`` inserted below its element-wise tail
(``map``, ``random_map``, ``filter``, ``ignore_errors``, ``prefetch``): everything under that
point (the source, a shuffle, a batch, an interleave) runs whole in every shard, each keeping
every S-th of its elements, and the tail runs on those only, so the tail's work (the costly
part: decoding, augmenting) is split S ways. Read round robin, the shards give back the
sequence under the tail in order, each element through the tail: where the tail maps one
element to one, exactly the local pipeline's output. (tf.data service's ``DATA`` sharding
policy, with the element-wise tail pushed down to it.)

Every shard's part under the cut must yield the same sequence: each shard opens from a fresh
copy of the ops, so their random ops (a shuffle, a ``random_map``) number their passes from
the start in every actor, as a fresh local pipeline's first pass does.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from feedline.ops.base import Op, UnaryOp
from feedline.ops.mapping import FilterOp, IgnoreErrorsOp, MapOp
from feedline.ops.prefetch import PrefetchOp
from feedline.ops.randomness import PassKey
from feedline.ops.slicing import ShardOp
from feedline.runtime.context import IterContext
from feedline.runtime.parallel import AsyncStage
from feedline.runtime.states import State

# Ops that act on each element alone, so they may run after the shard rather than before.
ELEMENT_WISE = (MapOp, FilterOp, IgnoreErrorsOp, PrefetchOp)
# Of those, the ones that make exactly one element of each.
ONE_TO_ONE = (MapOp, PrefetchOp)


class ShardedMapOp(MapOp):
    """A ``map``/``random_map`` in shard ``shard_index`` of ``num_shards``: the positions its
    function sees (the random generator's, a ``StageError``'s) are the element's in the whole
    pipeline, ``index + position * num_shards``, so both match the local pipeline's. Runs on
    threads (``executor="thread"``): the actor is the process."""

    shard_index: int
    num_shards: int

    def _stage(self, ctx: IterContext, state: State | None, key: PassKey | None) -> AsyncStage:
        # The map's own stage, whatever it does to its outputs, its transform given the
        # positions in the whole pipeline (a stage calls it only once it runs).
        stage = super()._stage(ctx, state, key)
        transform = stage.transform
        assert transform is not None
        index, stride = self.shard_index, self.num_shards

        def in_whole_pipeline(raw: list[Any], positions: Sequence[int]) -> Any:
            return transform(raw, [index + p * stride for p in positions])

        stage.transform = in_whole_pipeline
        return stage


class ShardPlan:
    """The pipeline ``op`` cut for ``num_shards`` virtual shards (see the module's docstring)."""

    def __init__(self, op: Op, num_shards: int) -> None:
        tail: list[UnaryOp] = []
        while isinstance(op, ELEMENT_WISE):
            tail.append(op)
            op = op.input
        self.base = op
        self.tail = tail[::-1]  # from the cut upwards
        self.num_shards = num_shards

    @property
    def one_to_one(self) -> bool:
        """The shards read round robin give exactly the local pipeline's elements in order."""
        return all(isinstance(op, ONE_TO_ONE) for op in self.tail)

    def shard_op(self, index: int) -> Op:
        """The pipeline of shard ``index``, built on this plan's ops (use a fresh copy of the
        plan per shard: see the module's docstring)."""
        op: Op = ShardOp(self.base, self.num_shards, index)
        for upper in self.tail:
            made = copy.copy(upper)  # ops are immutable descriptions: a copy on a new input
            if isinstance(upper, MapOp):
                # Same fields, one method different: the class is swapped rather than the
                # map's constructor called again (which would copy its function anew).
                made.__class__ = ShardedMapOp
                assert isinstance(made, ShardedMapOp)
                made.shard_index, made.num_shards = index, self.num_shards
                made.executor = "thread"
            made.input, made.inputs = op, (op,)
            op = made
        return op

    def shard_names(self, index: int) -> list[str]:
        """The op names a saved state of shard ``index``'s pass lists (``"pipeline"``), as
        ``DatasetIterator`` writes them: depth first from the top."""
        names = []
        stack = [self.shard_op(index)]
        while stack:
            op = stack.pop()
            names.append(op.name)
            stack.extend(reversed(op.inputs))
        return names
