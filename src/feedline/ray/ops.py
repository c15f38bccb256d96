"""``distribute``: the op, and the transformation users apply."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from feedline.ops.base import AUTOTUNE, Op, UnaryOp, require_positive_int
from feedline.options import Options
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State

if TYPE_CHECKING:
    from feedline.dataset import Dataset

# Virtual shards by default: the most actors a pass can use, and what a saved state holds.
# Fixed, so that the output never depends on how many actors run.
DEFAULT_SHARDS = 32


class DistributeOp(UnaryOp):
    """Runs ``input_op`` as virtual shards on Ray actors (``stage.py``)."""

    def __init__(
        self,
        input_op: Op,
        num_workers: int | None,
        address: str | None,
        max_workers: int | None,
        num_shards: int,
        deterministic: bool | None,
        shard_options: Options,
    ) -> None:
        super().__init__(input_op)
        self.num_workers = num_workers  # None: AUTOTUNE
        self.address = address
        self.max_workers = max_workers
        self.num_shards = num_shards
        self.deterministic = deterministic
        self.shard_options = shard_options  # the pipeline's own, for the shards' passes
        self.name = "distribute"

    def cardinality(self) -> int:
        # The shards together yield the input's elements (in another order where the part
        # after the cut is not one to one, never more or fewer).
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        if ctx.probe:
            # A look at an element or two (a spec): here, not worth starting actors for.
            return self.input.make_iterator(ctx, None)
        from feedline.ray.stage import DistributedStage

        return DistributedStage(self, ctx, state)


def distribute(
    num_workers: int = AUTOTUNE,
    address: str | None = None,
    max_workers: int | None = None,
    *,
    num_shards: int = DEFAULT_SHARDS,
    deterministic: bool | None = None,
) -> Callable[[Dataset], Dataset]:
    """Run everything before ``apply`` as shards on Ray actors; what follows runs here:
    ``ds.apply(feedline.ray.distribute(num_workers=fl.AUTOTUNE))``, like
    ``tf.data.experimental.service.distribute``.

    ``num_workers``: actors (``AUTOTUNE``: as many as the tuner finds useful, up to
    ``max_workers``, the cluster's free CPUs and ``num_shards``). ``address``: a Ray cluster
    to connect to; None uses the Ray this process runs, or starts one on this machine (bound
    to 127.0.0.1). ``num_shards``: virtual shards, read round robin, so the output never
    depends on the actors (saved states hold each one's position). ``deterministic=False``
    delivers whatever shard is ready first (None: the pipeline's option).
    """
    workers = None
    if num_workers != AUTOTUNE:
        workers = require_positive_int(num_workers, "num_workers")
    most = None if max_workers is None else require_positive_int(max_workers, "max_workers")
    shards = require_positive_int(num_shards, "num_shards")
    if workers is not None and workers > shards:
        raise ValueError(f"num_workers ({workers}) cannot exceed num_shards ({shards})")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address must be a str or None, got {type(address).__name__}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {deterministic!r}")

    def apply(dataset: Dataset) -> Dataset:
        op = DistributeOp(
            dataset._op, workers, address, most, shards, deterministic, dataset.options()
        )
        return dataset._wrap(op)

    return apply
