"""prefetch: run the input ahead of its consumer into a bounded buffer."""

from __future__ import annotations

from typing import Any

from feedline.ops.base import Op, UnaryOp
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import StageIterator, State
from feedline.runtime.parallel import AsyncStage
from feedline.runtime.stage_config import StageConfig

# Where an AUTOTUNE prefetch buffer starts, in elements; the tuner grows or shrinks it.
DEFAULT_AUTOTUNE_BUFFER = 2


class PrefetchOp(UnaryOp):
    def __init__(self, input_op: Op, buffer_size: int | None) -> None:
        super().__init__(input_op)
        self.buffer_size = buffer_size  # None: AUTOTUNE
        self.name = "prefetch" if buffer_size is None else f"prefetch({buffer_size})"

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        # One worker pulls the input ahead (more could not pull faster: pulls are serial).
        # Tuned, it starts inline (0): reading ahead costs a hand-off per element, which only
        # pays once the consumer is seen to have work of its own to overlap with (its first
        # calls show it, or the tuner's windows later).
        tuned = self.buffer_size is None
        starts_inline = tuned and ctx.options.autotune_enabled
        config = StageConfig(
            name=self.name,
            key=self,
            parallelism=0 if starts_inline else 1,
            choose_read_ahead=starts_inline,
            parallelism_tunable=tuned,
            max_parallelism=1,
            buffer_size=self.buffer_size or DEFAULT_AUTOTUNE_BUFFER,
            buffer_tunable=self.buffer_size is None,
            deterministic=True,
        )
        return AsyncStage(
            config,
            ctx=ctx,
            make_input=lambda s: self.input.make_iterator(ctx, s),
            transform=None,
            state=state,
        )
