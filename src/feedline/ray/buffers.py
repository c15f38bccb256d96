"""The caller's side of each virtual shard: the chunks received and not yet delivered, and the
position to save, to resume from, or to reopen at on another actor.

A shard's position is always *(a state of its pass, elements to skip after it)*: the state
before the oldest chunk still held, plus what of it was delivered. Elements received but not
delivered are never in a saved state, and a shard reopened after its actor died starts right
after the last chunk received: nothing is lost, nothing comes twice.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from feedline.errors import InvalidStateError
from feedline.pipeline import STATE_VERSION
from feedline.ray.actor import Opening
from feedline.ray.shards import ShardPlan
from feedline.runtime.states import (
    State,
    check_nested,
    state_bool,
    state_dict,
    state_int,
    state_list,
    state_optional_nested,
)

if TYPE_CHECKING:
    from feedline.ray.workers import Worker


class Raise:
    """Stands in a shard's chunk for an element whose production raised ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Chunk:
    """One reply's elements (and ``Raise``s), delivered front to back; ``start``: where the
    shard stood before them."""

    __slots__ = ("items", "start", "taken")

    def __init__(self, start: Opening, items: list[Any]) -> None:
        self.start = start
        self.items = items
        self.taken = 0


class Shard:
    """One virtual shard as the caller holds it."""

    def __init__(self, index: int, position: Opening, ended: bool) -> None:
        self.index = index
        self.received = position  # after the last chunk received
        self.opening: Opening | None = position  # to send with the next call, if any
        self.ended = ended  # its pass has no more to send
        self.chunks: deque[Chunk] = deque()
        self.held = 0  # elements received, not yet delivered
        self.calling = False  # a call is in flight
        self.last_size = 1  # elements the last reply brought
        self.worker: Worker | None = None
        self.losses = 0  # calls lost with their actor

    @property
    def finished(self) -> bool:
        return self.ended and not self.chunks

    def peek(self) -> Any:
        chunk = self.chunks[0]
        return chunk.items[chunk.taken]

    def pop(self) -> None:
        chunk = self.chunks[0]
        chunk.taken += 1
        self.held -= 1
        if chunk.taken == len(chunk.items):
            self.chunks.popleft()

    def receive(self, items: list[Any], after: State | None, ended: bool) -> None:
        """A reply: ``items``, after which the shard's pass stood at ``after``."""
        if items:
            self.chunks.append(Chunk(self.received, items))
            self.held += len(items)
            self.last_size = len(items)
        self.received = Opening(after, 0)
        self.ended = self.ended or ended

    def reopen(self) -> None:
        """The next call opens the shard afresh where the last reply left it."""
        self.opening = self.received

    def position(self) -> Opening:
        if self.chunks:
            chunk = self.chunks[0]
            return Opening(chunk.start.state, chunk.start.skip + chunk.taken)
        return self.received

    def save(self) -> State:
        position = self.position()
        return {"state": position.state, "skip": position.skip, "ended": self.finished}


def saved(shards: list[Shard], cursor: int) -> State:
    return {
        "num_shards": len(shards),
        "cursor": cursor,
        "shards": [shard.save() for shard in shards],
    }


def restored(state: State | None, plan: ShardPlan, owner: str) -> tuple[list[Shard], int]:
    """The shards (and the round robin's next one) as ``state`` saved them, or at the start.

    Each shard's own state is a state of its pass: its envelope (version, the ops it was
    saved from) is checked here; the rest, by the actor that opens the shard, before the pass
    delivers any element (see ``DistributedStage``)."""
    num_shards = plan.num_shards
    if state is None:
        return [Shard(k, Opening(None, 0), False) for k in range(num_shards)], 0
    count = state_int(state, "num_shards", owner, 1)
    if count != num_shards:
        raise InvalidStateError(owner, "num_shards", f"is {count}, not {num_shards}")
    cursor = state_int(state, "cursor", owner, 0, num_shards - 1)
    shards = []
    for k, entry in enumerate(state_list(state, "shards", owner, length=num_shards)):
        entry = state_dict(entry, owner, "state", "skip", "ended")
        shard_state = state_optional_nested(entry, "state", owner)
        if shard_state is not None:
            check_envelope(shard_state, plan.shard_names(k), f"{owner} shard {k}")
        position = Opening(shard_state, state_int(entry, "skip", owner))
        shards.append(Shard(k, position, state_bool(entry, "ended", owner)))
    return shards, cursor


def check_envelope(state: State, names: list[str], owner: str) -> None:
    """``state`` was saved by this version of feedline from a pass over the ops ``names``."""
    version = state_dict(state, owner, "version", "pipeline", "root")["version"]
    if isinstance(version, bool) or version != STATE_VERSION:
        raise InvalidStateError(owner, "version", f"is {version!r}, not {STATE_VERSION}")
    if state["pipeline"] != names:
        raise InvalidStateError(owner, "pipeline", f"is {state['pipeline']!r}, not {names}")
    check_nested(state["root"], "root", owner)
