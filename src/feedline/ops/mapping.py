"""Element-wise ops: map, filter, take_while, ignore_errors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from feedline.errors import StageCrashedError, StageError, wrap_user_error
from feedline.ops.base import (
    AUTOTUNE,
    UNKNOWN,
    Op,
    UnaryIterator,
    UnaryOp,
    call_with_element,
    function_name,
)
from feedline.ops.map_calls import map_transform
from feedline.ops.randomness import PassKey, PassKeys
from feedline.ops.tracing import output_check, outputs_spec, traced_spec
from feedline.runtime.chunks import ChunkExecutor, Transform
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator, InputCursor, StageIterator, State
from feedline.runtime.parallel import AsyncStage, default_parallelism
from feedline.runtime.stage_config import StageConfig
from feedline.runtime.states import state_bool, state_int, state_nested
from feedline.structure import normalize_output

if TYPE_CHECKING:
    from feedline.runtime.process import ExecutorSwitch

logger = logging.getLogger("feedline")


class MapOp(UnaryOp):
    """map and random_map. Runs on an ``AsyncStage``: inline in the consumer's thread when
    ``num_parallel_calls`` is None, on worker threads otherwise (AUTOTUNE: tuned).

    With the "process" executor the stage's threads hand each chunk to a worker process
    (``runtime/process/``); without ``num_parallel_calls``, one process runs chunks in turn.
    """

    def __init__(
        self,
        input_op: Op,
        fn: Callable[..., Any],
        name: str | None = None,
        num_parallel_calls: int | None = None,
        deterministic: bool | None = None,
        random: bool = False,
        seed: int | None = None,
        executor: str | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(input_op)
        self.fn = fn
        self.executor = executor  # None: the pipeline's Options.executor
        self.timeout = timeout  # seconds a call may take (runtime/timeouts.py)
        self.num_parallel_calls = num_parallel_calls
        self.deterministic = deterministic
        self.random = random
        self.passes = PassKeys(seed, vary_per_pass=True)
        kind = "random_map" if random else "map"
        self.name = name or f"{kind}({function_name(fn)})"

    def cardinality(self) -> int:
        return self.input.cardinality()

    def compute_spec(self) -> Any:
        fn = self.fn
        if self.random:
            rng = np.random.default_rng(0)

            def apply(element: Any) -> Any:
                out = fn(*element, rng) if type(element) is tuple else fn(element, rng)
                return normalize_output(out)
        else:

            def apply(element: Any) -> Any:
                return normalize_output(call_with_element(fn, element))

        return traced_spec(self.input, outputs_spec(apply), self.name)

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        if not self.random:
            return self._stage(ctx, state, None)
        pass_state = stage_state = None
        if state is not None:
            pass_state = state_nested(state, "pass", self.name)
            stage_state = state_nested(state, "stage", self.name)
        key = self.passes.key(ctx, pass_state, self.name)
        stage = self._stage(ctx, stage_state, key)
        return PassStateIterator(stage, key)

    def _stage(self, ctx: IterContext, state: State | None, key: PassKey | None) -> AsyncStage:
        executor: ChunkExecutor | None = None
        executor_switch: ExecutorSwitch | None = None
        choice = self.executor or ctx.options.executor
        check = output_check(self, ctx, self.executor)
        # A probe pass (for an element spec) looks at an element or two: never worth processes.
        if choice in ("process", "auto") and not ctx.probe:

            def make_process_executor() -> ChunkExecutor:
                from feedline.runtime.process import process_executor

                # One pickled function serves every pass: the worker makes each pass's
                # transform from its random key.
                factory = functools.partial(
                    map_transform, self.fn, self.name, timeout=self.timeout, check=check
                )
                return process_executor(ctx, self, self.name, factory, key, self.timeout)

            if choice == "process":
                executor = make_process_executor()
            # "auto" moves to processes only when tuned, and only a stage with threads.
            elif ctx.options.autotune_enabled and self.num_parallel_calls is not None:
                from feedline.runtime.process import ExecutorSwitch

                executor_switch = ExecutorSwitch(make_process_executor)
        return make_async_stage(
            name=self.name,
            key=self,
            ctx=ctx,
            make_input=lambda s: self.input.make_iterator(ctx, s),
            transform=map_transform(self.fn, self.name, key, self.timeout, check),
            state=state,
            num_parallel_calls=self.num_parallel_calls,
            deterministic=self.deterministic,
            executor=executor,
            executor_switch=executor_switch,
        )


class PassStateIterator(StageIterator):
    """Adds what identifies a pass (its random key) to a stage's saved state."""

    def __init__(self, stage: StageIterator, key: PassKey) -> None:
        self.stage = stage
        self.key = key
        self.inputs = (stage,)
        self.next_chunk = stage.next_chunk  # type: ignore[method-assign]

    def __next__(self) -> Any:
        return self.stage.__next__()

    def get_state(self) -> State:
        return {"stage": self.stage.get_state(), "pass": PassKeys.as_state(self.key)}


def make_async_stage(
    *,
    name: str,
    key: object,
    ctx: IterContext,
    make_input: Callable[[State | None], StageIterator],
    transform: Transform | None,
    state: State | None,
    num_parallel_calls: int | None,
    deterministic: bool | None,
    executor: ChunkExecutor | None = None,
    executor_switch: ExecutorSwitch | None = None,
) -> AsyncStage:
    """An async stage for a map-like op: inline (None), fixed parallelism (N) or tuned;
    ``executor`` runs its transform elsewhere (worker processes)."""
    autotune = num_parallel_calls == AUTOTUNE
    tuned = autotune and ctx.options.autotune_enabled
    start_parallelism = None
    if num_parallel_calls is None:
        parallelism = 0
    elif tuned:
        # Start inline: the first chunk shows what the work costs; workers start only if it
        # is worth a hand-off (see AsyncStage).
        parallelism, start_parallelism = 0, default_parallelism()
    elif autotune:
        parallelism = default_parallelism()
    else:
        parallelism = num_parallel_calls
    config = StageConfig(
        name=name,
        key=key,
        parallelism=parallelism,
        parallelism_tunable=autotune,
        max_parallelism=ctx.options.max_parallelism if autotune else max(parallelism, 0),
        buffer_size=None,  # sized by the stage from parallelism and chunk size
        buffer_tunable=False,
        deterministic=ctx.in_order
        or (ctx.options.deterministic if deterministic is None else deterministic),
        start_parallelism=start_parallelism,
    )
    return AsyncStage(
        config,
        ctx=ctx,
        make_input=make_input,
        transform=transform,
        state=state,
        executor=executor,
        executor_switch=executor_switch,
    )


class CursorStage(ChunkedIterator):
    """A one-input stage that reads its input through a cursor and reports a failing element
    after delivering the elements before it (so an error surfaces at its own position)."""

    def __init__(self, op: UnaryOp, ctx: IterContext, state: State | None) -> None:
        self.position = 0
        cursor_state = None
        if state is not None:
            self.position = state_int(state, "position", op.name)
            cursor_state = state_nested(state, "cursor", op.name)
        self.cursor = InputCursor.restore(
            lambda s: op.input.make_iterator(ctx, s), cursor_state, op.name
        )
        self.inputs = (self.cursor.input,)
        self._pending: StageError | None = None

    def fail_at_cursor(self, error: StageError, delivered: list[Any]) -> list[Any]:
        """Deliver ``delivered`` now and raise ``error`` on the next call, or raise it now."""
        self._pending = error
        if not delivered:
            self.raise_pending()
        return delivered

    def raise_pending(self) -> None:
        error, self._pending = self._pending, None
        if error is not None:
            self.cursor.advance(1)
            self.position += 1
            raise error

    def get_state(self) -> State:
        return {"cursor": self.cursor.get_state(), "position": self.position}


class FilterOp(UnaryOp):
    def __init__(self, input_op: Op, predicate: Callable[..., Any]) -> None:
        super().__init__(input_op)
        self.predicate = predicate
        self.name = f"filter({function_name(predicate)})"

    def cardinality(self) -> int:
        return UNKNOWN  # tf.data's answer, even over an infinite input

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return FilterIterator(self, ctx, state)


def _as_bool(value: Any, stage: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype != np.bool_:
        raise TypeError(
            f"{stage}: the predicate must return a scalar bool, "
            f"got {type(value).__name__} with shape {arr.shape} and dtype {arr.dtype}"
        )
    return bool(arr)


class FilterIterator(CursorStage):
    def __init__(self, op: FilterOp, ctx: IterContext, state: State | None) -> None:
        super().__init__(op, ctx, state)
        self.op = op

    def next_chunk(self, max_n: int) -> list[Any]:
        self.raise_pending()
        predicate, name = self.op.predicate, self.op.name
        while True:
            raw = self.cursor.peek(max_n)
            if not raw:
                return []
            out: list[Any] = []
            for element in raw:
                try:
                    keep = _as_bool(call_with_element(predicate, element), name)
                except Exception as e:
                    return self.fail_at_cursor(wrap_user_error(name, self.position, e), out)
                self.cursor.advance(1)
                self.position += 1
                if keep:
                    out.append(element)
            if out:
                return out


class TakeWhileOp(UnaryOp):
    def __init__(self, input_op: Op, predicate: Callable[..., Any]) -> None:
        super().__init__(input_op)
        self.predicate = predicate
        self.name = f"take_while({function_name(predicate)})"

    def cardinality(self) -> int:
        return UNKNOWN

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return TakeWhileIterator(self, ctx, state)


class TakeWhileIterator(UnaryIterator):
    def __init__(self, op: TakeWhileOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.done, self.position = False, 0
        if state is not None:
            self.done = state_bool(state, "done", op.name)
            self.position = state_int(state, "position", op.name)
        super().__init__(op, ctx, state)

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        element = next(self.input)
        try:
            keep = _as_bool(call_with_element(self.op.predicate, element), self.op.name)
        except Exception as e:
            raise wrap_user_error(self.op.name, self.position, e) from e
        finally:
            self.position += 1
        if not keep:
            self.done = True
            raise StopIteration
        return element

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "done": self.done, "position": self.position}


class IgnoreErrorsOp(UnaryOp):
    """Drops elements whose production raised an error upstream, counting them."""

    def __init__(self, input_op: Op, log_warning: bool) -> None:
        super().__init__(input_op)
        self.log_warning = log_warning
        self.name = "ignore_errors"

    def cardinality(self) -> int:
        return UNKNOWN  # tf.data's answer, even over an infinite input

    def compute_spec(self) -> Any:
        return self.input.element_spec()

    def make_iterator(self, ctx: IterContext, state: State | None) -> StageIterator:
        return IgnoreErrorsIterator(self, ctx, state)


class IgnoreErrorsIterator(UnaryIterator, ChunkedIterator):
    def __init__(self, op: IgnoreErrorsOp, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.ignored = 0 if state is None else state_int(state, "ignored", op.name)
        super().__init__(op, ctx, state)

    def next_chunk(self, max_n: int) -> list[Any]:
        while True:
            try:
                return self.input.next_chunk(max_n)
            except StageCrashedError:
                raise  # not an element's error: the input can make no more, and ends
            except Exception as e:
                self.ignored += 1
                if self.op.log_warning:
                    logger.warning("ignore_errors dropped an element: %s", e)

    def get_state(self) -> State:
        return {"input": self.input.get_state(), "ignored": self.ignored}
