"""Ray Data interop, for users who mix the two: a Ray ``Dataset`` read as a feedline source,
and a feedline pipeline as a Ray Data datasource whose read tasks each run a virtual shard.

Rows cross as Ray Data shapes them: a dict of columns; an element that is not a dict is the
column ``item`` (Ray Data's own name for a bare value), both ways.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import cloudpickle
import numpy as np

from feedline.errors import InvalidStateError
from feedline.ops.base import Op
from feedline.options import Options
from feedline.pipeline import DatasetIterator
from feedline.ray.cluster import require_ray
from feedline.ray.ops import DEFAULT_SHARDS
from feedline.ray.shards import ShardPlan
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State, skip_elements
from feedline.runtime.states import state_int
from feedline.structure import normalize_output

if TYPE_CHECKING:
    from feedline.dataset import Dataset

# Ray Data's column for rows that are a bare value.
ITEM = "item"
# Elements per block a read task yields: blocks are Ray Data's unit of hand-off.
BLOCK_ROWS = 1024


class RayDatasetOp(Op):
    """A Ray ``Dataset``'s rows as a source (``from_ray_dataset``)."""

    def __init__(self, ray_dataset: Any) -> None:
        super().__init__()
        self.ray_dataset = ray_dataset
        self.name = "from_ray_dataset"

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return RayRowsIterator(self, state)


class RayRowsIterator(StageIterator):
    """Rows in the order Ray Data gives them; the state is the count delivered, and a resumed
    pass skips that many (exact where the Ray dataset's order is fixed: Ray Data's
    ``execution_options.preserve_order``)."""

    def __init__(self, op: RayDatasetOp, state: State | None) -> None:
        self.position = 0 if state is None else state_int(state, "position", op.name)
        self._rows = iter(op.ray_dataset.iter_rows())
        if self.position:
            wanted, self.position = self.position, 0
            if skip_elements(self, wanted) < wanted:
                raise InvalidStateError(
                    op.name, "position", f"is {wanted}: the dataset ends before"
                )

    def __next__(self) -> Any:
        row = dict(next(self._rows))
        self.position += 1
        if list(row) == [ITEM]:
            return normalize_output(row[ITEM])
        return normalize_output(row)

    def get_state(self) -> State:
        return {"position": self.position}

    def close(self) -> None:
        # Ray Data's iterator is a generator holding an executor: stopped now, not whenever
        # it is collected (perhaps after Ray has shut down).
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()


def from_ray_dataset(ray_dataset: Any) -> Dataset:
    """A feedline ``Dataset`` of a Ray Data ``Dataset``'s rows (each a dict of columns; a
    single ``item`` column gives bare values)."""
    from feedline.dataset import Dataset

    return Dataset(RayDatasetOp(ray_dataset))


def to_ray_dataset(dataset: Dataset, num_shards: int = DEFAULT_SHARDS) -> Any:
    """A Ray Data ``Dataset`` whose read tasks each run one virtual shard of ``dataset``
    (the shards of ``distribute``), yielding blocks of its elements as columns."""
    ray = require_ray()
    plan = cloudpickle.dumps(ShardPlan(dataset._op, num_shards))
    source = _datasource_class(ray)(plan, dataset.options(), num_shards)
    return ray.data.read_datasource(source)


@functools.cache
def _datasource_class(ray: Any) -> type:
    """The datasource class, made where Ray Data is imported (a base class of Ray's)."""
    data = ray.data

    class FeedlineDatasource(data.Datasource):  # type: ignore[misc, name-defined]
        def __init__(self, plan: bytes, options: Options, num_shards: int) -> None:
            super().__init__()
            self._plan, self._options, self._num_shards = plan, options, num_shards

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list[Any]:
            # One task per virtual shard, whatever the parallelism asked: the shards are
            # fixed, so the data never depends on how Ray Data schedules them.
            metadata = data.block.BlockMetadata(
                num_rows=None, size_bytes=None, input_files=None, exec_stats=None
            )
            return [
                data.datasource.ReadTask(
                    functools.partial(_read_shard, self._plan, self._options, k), metadata
                )
                for k in range(self._num_shards)
            ]

    return FeedlineDatasource


def _read_shard(plan: bytes, options: Options, index: int) -> Iterator[Any]:
    """The blocks of shard ``index``: its elements, ``BLOCK_ROWS`` at a time, as columns."""
    from ray.data.block import BlockAccessor

    op = cloudpickle.loads(plan).shard_op(index)
    with DatasetIterator(op, options) as it:
        while True:
            rows = [x for _, x in zip(range(BLOCK_ROWS), it)]
            if not rows:
                return
            yield BlockAccessor.batch_to_block(_columns(rows))


def _columns(rows: list[Any]) -> dict[str, np.ndarray]:
    if isinstance(rows[0], dict):
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    return {ITEM: np.stack(rows)}
