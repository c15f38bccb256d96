"""What runs in one Ray actor: the virtual shards handed to it, each an ordinary feedline pass
(tuned by its own AUTOTUNE), read a chunk of elements per call.

Calls cost ~1 ms of Ray's time each (0.8 ms wall, 1.2 ms CPU measured here), so a call reads
until it has ``max_n`` elements or has worked ``seconds`` (about 100 ms): one large object
per call. Which elements a call returns depends only on the shard's position, never on the
time, so the stream of a shard is the same however it is cut into calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import cloudpickle

from feedline.errors import InvalidStateError, StageCrashedError, StageError
from feedline.options import Options
from feedline.pipeline import DatasetIterator
from feedline.ray.shards import ShardPlan
from feedline.runtime.process.worker import ExportedError
from feedline.runtime.states import State


@dataclass(frozen=True)
class Opening:
    """Where a shard resumes: a saved state of its pass (None: the start), then ``skip``
    elements (failed ones count) dropped."""

    state: State | None
    skip: int


@dataclass(frozen=True)
class RefusedState:
    """An ``InvalidStateError`` on its way back, rebuilt as the same error."""

    owner: str
    field: str
    message: str

    def restore(self) -> InvalidStateError:
        error = InvalidStateError(self.owner, self.field, "")
        error.args = (self.message,)
        return error


@dataclass(frozen=True)
class Reply:
    """One call's elements, then (if the pass raised after them) its error; the shard's
    state after them; whether it ended; what the call cost; where it ran."""

    elements: list[Any]
    error: ExportedError | RefusedState | None
    crashed: bool  # the error ends the shard's pass (a ``StageCrashedError``)
    state: State | None
    ended: bool
    wall: float
    cpu: float
    node: str


class ShardWorker:
    """The actor's object (``ray.remote`` wraps it where Ray is imported)."""

    def __init__(self, plan: bytes, options: Options) -> None:
        self._plan = plan  # a cloudpickled ShardPlan: a fresh copy of its ops per shard
        self._options = options
        self._passes: dict[int, DatasetIterator] = {}
        self._node = f"{_node_id()} pid {os.getpid()}"

    def node(self) -> str:
        """Where this actor runs; answered once it is up."""
        return self._node

    def read(self, shard: int, opening: Opening | None, max_n: int, seconds: float) -> Reply:
        """Up to ``max_n`` next elements of ``shard`` (opened first where ``opening`` says)."""
        started, cpu_started = time.perf_counter(), time.process_time()
        elements: list[Any] = []
        error: BaseException | None = None
        ended = False
        try:
            if opening is not None:
                self._open(shard, opening)
            it = self._passes[shard]
            deadline = started + seconds
            while len(elements) < max_n:
                elements.append(next(it))
                if time.perf_counter() >= deadline:
                    break
        except StopIteration:
            ended = True
        except Exception as e:
            error = e
        state = self._passes[shard].get_state() if shard in self._passes else None
        exported: ExportedError | RefusedState | None = None
        if isinstance(error, InvalidStateError):
            exported = RefusedState(error.owner, error.field, str(error))
        elif error is not None:
            exported = ExportedError(error)
        return Reply(
            elements,
            exported,
            isinstance(error, StageCrashedError) or not isinstance(error, StageError | None),
            state,
            ended,
            time.perf_counter() - started,
            time.process_time() - cpu_started,
            self._node,
        )

    def _open(self, shard: int, opening: Opening) -> None:
        self.forget(shard)
        plan: ShardPlan = cloudpickle.loads(self._plan)
        it = DatasetIterator(plan.shard_op(shard), self._options, opening.state)
        try:
            for _ in range(opening.skip):
                try:
                    next(it)
                except StopIteration:
                    raise InvalidStateError(
                        "distribute", "skip", f"is {opening.skip}: shard {shard} ends before"
                    ) from None
                except StageError:
                    pass  # a failed element counts: it was delivered, as its error
        except BaseException:
            it.close()
            raise
        self._passes[shard] = it

    def forget(self, shard: int) -> None:
        """``shard`` is read elsewhere now (or no more): close its pass here."""
        it = self._passes.pop(shard, None)
        if it is not None:
            it.close()

    def close(self) -> None:
        for shard in list(self._passes):
            self.forget(shard)


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())[:12]
