"""The actors of one distributed pass: started, retired, replaced, and which shards each reads.

Shards move between actors only between calls (a shard has at most one call in flight), and
a shard that moves is opened on its new actor where its last reply left it: what reached the
caller is never read again, and nothing after it is skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from feedline.options import Options
from feedline.ray.actor import ShardWorker
from feedline.ray.buffers import Shard

# CPUs Ray reserves for each actor: its shards' passes run one call at a time, on one core
# (their maps on threads); more cores per machine are used by more actors.
CPUS_PER_ACTOR = 1


@dataclass(eq=False)
class Worker:
    """One actor and what the caller knows of it."""

    id: int
    handle: Any
    shards: set[int] = field(default_factory=set)
    calls: int = 0  # in flight
    retiring: bool = False  # takes no new calls; stopped once its shards have moved
    up: Any = None  # an ObjectRef answered once the actor runs; None after
    node: str = "(starting)"
    elements: int = 0
    work_wall: float = 0.0
    started: float = field(default_factory=time.perf_counter)  # then up, once it is
    stopped: float | None = None


class Workers:
    """Starts and stops the actors of one pass, and balances the shards over them."""

    def __init__(self, ray: ModuleType, plan: Any, options: Options) -> None:
        self._ray = ray
        self._plan = plan  # an ObjectRef of the cloudpickled ShardPlan: sent once
        self._options = options
        self._actor = ray.remote(ShardWorker)
        self._ids = itertools.count()
        self.live: list[Worker] = []
        self.every: list[Worker] = []  # started in this pass, live or not (for stats)

    def serving(self) -> list[Worker]:
        """The actors not retiring, up or starting."""
        return [w for w in self.live if not w.retiring]

    def active(self) -> list[Worker]:
        """The actors that take shards: up and not retiring. One still starting (or that Ray
        cannot place: no CPU free) takes none, so it never holds elements back."""
        return [w for w in self.live if not w.retiring and w.up is None]

    def starting(self) -> dict[Any, Worker]:
        return {w.up: w for w in self.live if w.up is not None}

    def start(self) -> Worker:
        handle = self._actor.options(num_cpus=CPUS_PER_ACTOR).remote(self._plan, self._options)
        worker = Worker(next(self._ids), handle, up=handle.node.remote())
        self.live.append(worker)
        self.every.append(worker)
        return worker

    def stop(self, worker: Worker) -> None:
        """End ``worker``'s actor (its process exits; whatever it held is let go)."""
        if worker in self.live:
            self.live.remove(worker)
            worker.stopped = time.perf_counter()
        with contextlib.suppress(Exception):  # already dead: nothing to stop
            self._ray.kill(worker.handle, no_restart=True)

    def resize(self, target: int) -> list[Worker]:
        """Start or retire actors to have ``target`` active; returns those started."""
        serving = self.serving()
        started = [self.start() for _ in range(target - len(serving))]
        # Retire those still starting first, then those with the fewest shards: the least
        # to move.
        order = sorted(serving, key=lambda w: (w.up is None, len(w.shards), -w.id))
        for worker in order[: len(serving) - target]:
            worker.retiring = True
        return started

    def move(self, shard: Shard, to: Worker | None) -> None:
        """``shard`` is read by ``to`` from its next call on (None: by no actor)."""
        old = shard.worker
        if old is to:
            return
        if old is not None:
            old.shards.discard(shard.index)
            if old in self.live:
                # Fire and forget: a dead actor has closed its passes already.
                old.handle.forget.remote(shard.index)
        shard.worker = to
        shard.reopen()
        if to is not None:
            to.shards.add(shard.index)

    def balance(self, shards: list[Shard]) -> None:
        """Give every shard still to be read an active actor, about as many to each."""
        active = self.active()
        waiting = [s for s in shards if not s.ended]
        for shard in shards:
            if shard.ended and shard.worker is not None and not shard.calling:
                self.move(shard, None)
        if not active:
            return
        quota = math.ceil(len(waiting) / len(active))
        for shard in waiting:
            if shard.calling:
                continue  # moves after its reply
            worker = shard.worker
            if worker is not None and not worker.retiring and len(worker.shards) <= quota:
                continue
            target = min(active, key=lambda w: len(w.shards))
            if (
                worker is not None
                and not worker.retiring
                and len(target.shards) + 1 >= len(worker.shards)
            ):
                continue  # no better balance
            self.move(shard, target)
        for worker in [w for w in self.live if w.retiring and not w.shards and not w.calls]:
            self.stop(worker)

    def stop_all(self) -> None:
        for worker in list(self.live):
            self.stop(worker)
