"""The caller's side of ``distribute``: virtual shards read round robin from Ray actors.

Everything runs in the consumer's thread: calls to the actors are asynchronous, so the actors
work while the consumer does; each ``next`` delivers what has arrived and, every few
milliseconds or when it must wait, files replies and sends more calls. Bounds: one call in
flight per shard, ``CALLS_PER_ACTOR`` per actor, a chunk ahead per shard, and the bytes held
(received, not delivered) within ``max_buffer_bytes`` (the tuner caps it by the RAM budget);
replies are fetched as soon as they are ready, so a slow consumer never fills the object
store, and numpy arrays come out of it without a copy (read-only, as Ray hands them).

Its ``parallelism`` knob is the number of actors; with ``num_workers=AUTOTUNE`` the stage sets
it by the rule of ``tuning.py`` (``_tune``).
"""

from __future__ import annotations

import time
from typing import Any

import cloudpickle

from feedline.autotune.budget import budget_for
from feedline.errors import StageCrashedError
from feedline.ray import cluster
from feedline.ray.actor import RefusedState, Reply
from feedline.ray.buffers import Raise, Shard, restored, saved
from feedline.ray.shards import ShardPlan
from feedline.ray.tuning import ActorWindow, actor_move
from feedline.ray.workers import CPUS_PER_ACTOR, Worker, Workers
from feedline.runtime.chunks import element_nbytes
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import ChunkedIterator
from feedline.runtime.states import State
from feedline.runtime.tunable import Knob, StageMetrics, StartChoice, Tunable

# Work per call: ~100x Ray's own cost per call (about 1 ms).
CALL_SECONDS = 0.1
# Calls queued per actor: one running, one ready to start the moment it returns.
CALLS_PER_ACTOR = 2
# Bytes one reply may bring, at most (and at least, whatever the budget).
MAX_CALL_BYTES, MIN_CALL_BYTES = 64 * 2**20, 2**20
MAX_CALL_ELEMENTS = 100_000
# How often the consumer's thread files replies and sends calls while elements are at hand.
POLL_SECONDS = 0.005
# How long one wait for replies lasts before the actors' count and health are looked at.
WAIT_TICK = 0.25
# How often the cluster's free CPUs are read (a call to Ray's control store).
CLUSTER_READ_SECONDS = 1.0
# The window over which the actor count is tuned (``_tune``).
TUNE_SECONDS = 1.0
# Calls of one shard lost with their actor before the shard is taken to be what kills them.
MAX_LOSSES = 3


class DistributedStage(ChunkedIterator, Tunable):
    """One pass of a ``distribute`` op (``ops.py``)."""

    # Its actor count follows ``tuning.py``'s rule (``_tune``): the tuner records its
    # decisions and faults (``events``) and leaves the knob alone.
    tuned_by_itself = True

    def __init__(self, op: Any, ctx: IterContext, state: State | None) -> None:
        self.op = op
        self.name = op.name
        self.key = op
        self.ctx = ctx
        self.num_shards = op.num_shards
        plan = ShardPlan(op.input, op.num_shards)
        self.shards, self.cursor = restored(state, plan, op.name)
        # Shards resumed from a state and not yet opened by an actor: the pass delivers no
        # element before every one is (an actor checks the rest of a shard's state).
        self._unchecked = {
            s.index
            for s in self.shards
            if not s.finished and (s.received.state is not None or s.received.skip)
        }
        self.deterministic = ctx.in_order or (
            ctx.options.deterministic if op.deterministic is None else op.deterministic
        )
        self.metrics = StageMetrics()
        self.max_buffer_bytes = budget_for(ctx.options.autotune).ram
        self.solo_cpu_share = None
        self.events: list[StartChoice] = []  # actors lost and replaced, for the history
        self._inflight: dict[Any, tuple[Shard, Worker]] = {}
        self._polled = self._cluster_read = 0.0
        self._crash: BaseException | None = None
        self._failed_starts = 0
        # AUTOTUNE with tuning off (Options.autotune.enabled=False): one actor, as started.
        self._autotune = op.num_workers is None and ctx.options.autotune_enabled
        self._tuned_at = (time.perf_counter(), 0.0)  # window start: time, consumer's wait
        self._held = 0  # elements received, not delivered, all shards together
        self.free_cpus = 0.0  # the cluster's, as last read
        self._window_start: tuple[float, dict[int, float]] = (time.perf_counter(), {})
        self._closed = False
        self.knobs = {"parallelism": self._actor_knob(), "buffer_size": self._calls_knob()}
        self.ray = cluster.acquire(op.address, self.max_buffer_bytes)
        try:
            self.workers = Workers(
                self.ray, self.ray.put(cloudpickle.dumps(plan)), op.shard_options
            )
            if not all(shard.finished for shard in self.shards):  # else nothing to read
                self._follow_cluster()
                count = self.knobs["parallelism"].value
                self._resize(count)
                self._event(0, count, "actors started")
        except BaseException:
            self.close()
            raise
        ctx.register(self)

    # -- knobs ---------------------------------------------------------------------------------

    def _actor_knob(self) -> Knob:
        op = self.op
        most = min(op.max_workers or self.num_shards, self.num_shards)
        if op.num_workers is None:  # AUTOTUNE: from one actor, as ``_tune`` finds them useful
            return Knob("parallelism", 1, 1, most, True)
        count = min(op.num_workers, self.num_shards)
        return Knob("parallelism", count, count, count, False)

    @staticmethod
    def _calls_knob() -> Knob:
        return Knob("buffer_size", CALLS_PER_ACTOR, CALLS_PER_ACTOR, CALLS_PER_ACTOR, False)

    @property
    def chunk_size(self) -> int:
        return max(1, round(sum(s.last_size for s in self.shards) / self.num_shards))

    @property
    def has_own_work(self) -> bool:
        return True

    def projected_bytes(
        self, parallelism: int | None = None, buffer_size: int | None = None
    ) -> float:
        actors = self.knobs["parallelism"].value if parallelism is None else parallelism
        calls = CALLS_PER_ACTOR if buffer_size is None else buffer_size
        per_chunk = self.chunk_size * self.metrics.bytes_per_element
        # A chunk ahead per shard, and the calls in flight.
        return per_chunk * (self.num_shards + actors * calls)

    # -- delivering ----------------------------------------------------------------------------

    def next_chunk(self, max_n: int) -> list[Any]:
        if self._crash is not None:
            raise self._crash
        if self._closed:
            return []
        while self._unchecked:
            self._pump(None, WAIT_TICK)  # a state refused is refused here, before any element
        out: list[Any] = []
        while len(out) < max_n:
            shard = self._turn()
            if shard is None:
                break
            if not shard.chunks:
                if out:
                    break  # deliver what is here rather than wait
                self._wait_for(shard)
                continue
            item = shard.peek()
            if type(item) is Raise:
                if out:
                    break  # the elements before it first
                self._take(shard)
                self._held -= 1
                if isinstance(item.error, StageCrashedError):
                    self._crash = item.error
                raise item.error
            out.append(item)
            self._take(shard)
        if out:
            self._held -= len(out)
            self._count_held(delivered=len(out))
        if time.perf_counter() - self._polled > POLL_SECONDS:
            self._poll()
        return out

    def _turn(self) -> Shard | None:
        """The shard whose element comes next (deterministic: round robin, skipping those
        finished), or, in finishing order, the first with elements at hand; None at the end."""
        first_open = None  # none at hand: wait on the next in turn
        for step in range(self.num_shards):
            shard = self.shards[(self.cursor + step) % self.num_shards]
            if shard.finished:
                continue
            if self.deterministic or shard.chunks:
                self.cursor = shard.index
                return shard
            first_open = first_open or shard
        return first_open

    def _count_held(self, delivered: int = 0) -> None:
        with self.metrics.lock:
            self.metrics.elements += delivered
            self.metrics.buffered_elements = self._held
            self.metrics.buffered_bytes = int(self._held * self.metrics.bytes_per_element)

    def _take(self, shard: Shard) -> None:
        shard.pop()
        self.cursor = (shard.index + 1) % self.num_shards

    def _wait_for(self, shard: Shard) -> None:
        """Until ``shard`` (or, in finishing order, any shard) has an element or has ended."""
        started = self.metrics.start_wait()
        try:
            while not shard.chunks and not shard.ended:
                if not self.deterministic and any(s.chunks for s in self.shards):
                    return
                self._pump(shard, WAIT_TICK)
        finally:
            self.metrics.end_wait(started)

    # -- calls ---------------------------------------------------------------------------------

    def _poll(self) -> None:
        self._polled = time.perf_counter()
        if not all(shard.ended for shard in self.shards):
            self._pump(None, 0.0)
        elif self.workers.live:
            self.workers.stop_all()  # all read: their CPUs are free for others now

    def _tune(self) -> None:
        """AUTOTUNE of the actor count: ``tuning.actor_move`` over a window of
        ``TUNE_SECONDS``. The stage applies it itself, for now: the tuner's rules for threads
        try a change for about a second and take it back, shorter than an actor takes to
        start, so they would start and stop actors over and over (measured: 14 reversals in
        28 s of a CPU-bound map)."""
        now = time.perf_counter()
        since, waited_before = self._tuned_at
        if not self._autotune or now - since < TUNE_SECONDS:
            return
        waited = self.metrics.snapshot()["consumer_wait"]
        self._tuned_at = (now, waited)
        move = actor_move(self.actor_window((waited - waited_before) / (now - since)))
        knob = self.knobs["parallelism"]
        if move is not None:
            old = knob.value
            new = knob.set(move.actors)
            if new != old:
                self._event(old, new, move.reason)

    def _pump(self, wanted: Shard | None, timeout: float) -> None:
        """Adjust the actors, send calls, then file the replies ready within ``timeout``."""
        self._follow_cluster()
        self._tune()
        self._resize(self.knobs["parallelism"].value)
        self.workers.balance(self.shards)
        self._send(wanted)
        starting = self.workers.starting()
        refs = list(self._inflight) + list(starting)
        if not refs:
            if wanted is not None:
                raise StageCrashedError(self.name, None, "no actor can read its shards")
            return
        ready, _ = self.ray.wait(refs, num_returns=1 if timeout else len(refs), timeout=timeout)
        for ref in ready:
            if ref in starting:
                self._up(starting[ref])
            else:
                self._file(ref)

    def _up(self, worker: Worker) -> None:
        """``worker``'s actor answered (it runs: shards go to it now), or failed to start."""
        try:
            worker.node = self.ray.get(worker.up)
        except self.ray.exceptions.RayError as e:
            self._failed_starts += 1
            if self._failed_starts > MAX_LOSSES:
                raise StageCrashedError(
                    self.name, None, f"{self._failed_starts} actors failed to start: {e}"
                ) from e
            self._lost(worker, e)
            return
        worker.up = None
        worker.started = time.perf_counter()
        self._failed_starts = 0  # only failures in a row mean the actors cannot start

    def _resize(self, count: int) -> None:
        for worker in self.workers.resize(count):
            self.metrics.start_idle(worker.id)  # until its first call

    def _send(self, wanted: Shard | None) -> None:
        over_budget = self.metrics.buffered_bytes >= self.max_buffer_bytes
        # The shards needed soonest first: fewest elements at hand, then next in turn.
        order = sorted(
            self.shards,
            key=lambda s: (s.held, (s.index - self.cursor) % self.num_shards),
        )
        for shard in order:
            worker = shard.worker
            if shard.ended or shard.calling or worker is None or worker.retiring:
                continue
            if worker.calls >= CALLS_PER_ACTOR:
                continue
            if shard is not wanted and (over_budget or shard.held >= shard.last_size):
                continue  # a chunk ahead is enough
            # A shard to check first is only opened: its elements come in turn.
            self._call(
                shard, worker, 0 if shard.index in self._unchecked else self._call_elements()
            )

    def _call_elements(self) -> int:
        per_element = max(1.0, self.metrics.bytes_per_element)
        budget = self.max_buffer_bytes / (2 * self.num_shards)
        call_bytes = min(MAX_CALL_BYTES, max(MIN_CALL_BYTES, budget))
        return max(1, min(MAX_CALL_ELEMENTS, int(call_bytes / per_element)))

    def _call(self, shard: Shard, worker: Worker, max_n: int) -> None:
        ref = worker.handle.read.remote(shard.index, shard.opening, max_n, CALL_SECONDS)
        shard.opening = None
        shard.calling = True
        worker.calls += 1
        if worker.calls == 1:
            self.metrics.end_idle(worker.id)
        self._inflight[ref] = (shard, worker)

    def _file(self, ref: Any) -> None:
        """Take in the reply of one call (or what its failure means)."""
        shard, worker = self._inflight.pop(ref)
        shard.calling = False
        worker.calls -= 1
        if worker.calls == 0:
            self.metrics.start_idle(worker.id)
        exceptions = self.ray.exceptions
        try:
            reply: Reply = self.ray.get(ref)
        except exceptions.RayActorError as e:  # died, or unavailable: both are a loss here
            self._lost(worker, e)
            return
        except exceptions.RayTaskError as e:
            raise StageCrashedError(self.name, None, f"an actor failed: {e}") from e
        except exceptions.RayError as e:  # the reply itself was lost (its node, its owner)
            shard.reopen()
            self._event(len(self.workers.serving()), None, f"a reply was lost ({e!r}); reread")
            return
        self._received(shard, worker, reply)

    def _received(self, shard: Shard, worker: Worker, reply: Reply) -> None:
        if isinstance(reply.error, RefusedState):
            self._crash = reply.error.restore()  # the pass cannot go on from this state
            raise self._crash
        self._unchecked.discard(shard.index)
        items = list(reply.elements)
        if reply.error is not None:
            items.append(Raise(reply.error.restore()))
        shard.receive(items, reply.state, reply.ended or reply.crashed)
        self._held += len(items)
        worker.node = reply.node
        worker.elements += len(reply.elements)
        worker.work_wall += reply.wall
        if reply.elements:
            with self.metrics.lock:
                n = self.metrics.worked + len(reply.elements)
                size = element_nbytes(reply.elements[0])
                # A running mean over the elements worked on, sampled one per reply.
                self.metrics.bytes_per_element += (
                    (size - self.metrics.bytes_per_element) * len(reply.elements) / n
                )
        self.metrics.add_work(len(reply.elements), reply.wall, reply.cpu)
        self._count_held()

    def _lost(self, worker: Worker, error: BaseException) -> None:
        """``worker``'s actor died (killed, out of memory, its node gone) or cannot be reached:
        its shards reopen on other actors where their last reply left them."""
        if worker not in self.workers.live:
            return
        before = len(self.workers.serving())
        for ref, (shard, owner) in list(self._inflight.items()):
            if owner is worker:
                del self._inflight[ref]
                shard.calling = False
                shard.losses += 1
                if shard.losses > MAX_LOSSES:
                    raise StageCrashedError(
                        self.name,
                        None,
                        f"shard {shard.index} lost {shard.losses} actors in a row: its work "
                        "kills them",
                    ) from error
        shards = sorted(worker.shards)
        for index in shards:
            self.workers.move(self.shards[index], None)
        self.workers.stop(worker)
        self.metrics.end_idle(worker.id)
        replaced = "" if worker.retiring else "; a new actor started"
        if not worker.retiring:
            self.metrics.start_idle(self.workers.start().id)
        self._event(
            before,
            len(self.workers.serving()),
            f"actor {worker.id} on {worker.node} lost ({type(error).__name__}): shards "
            f"{shards} reopen on other actors after their last delivered elements{replaced}",
        )

    def _follow_cluster(self) -> None:
        """A tuned actor count stays within the CPUs the cluster has free (read every few
        seconds): an actor Ray cannot place would hold its shards' elements back."""
        knob = self.knobs["parallelism"]
        now = time.perf_counter()
        if not self._autotune or now - self._cluster_read < CLUSTER_READ_SECONDS:
            return
        self._cluster_read = now
        free = self.free_cpus = float(self.ray.available_resources().get("CPU", 0.0))
        most = min(self.op.max_workers or self.num_shards, self.num_shards)
        room = len(self.workers.serving()) + int(free // CPUS_PER_ACTOR)
        knob.maximum = max(knob.minimum, min(most, room))
        if knob.value > knob.maximum:
            knob.set(knob.maximum)  # actors Ray could not place would only wait

    def _event(self, old: int, new: int | None, reason: str) -> None:
        new = old if new is None else new
        event = StartChoice(time.perf_counter(), "parallelism", old, new, reason)
        self.events.append(event)

    # -- observing, saving, closing ------------------------------------------------------------

    def workers_detail(self) -> list[dict[str, Any]]:
        return self.actors()

    def actors(self) -> list[dict[str, Any]]:
        """Each actor of the pass (``live``: not stopped yet): its node, elements made,
        their rate and how busy it was."""
        now = time.perf_counter()

        def seconds(w: Worker) -> float:
            return max((w.stopped or now) - w.started, 1e-9)

        return [
            {
                "actor": w.id,
                "node": w.node,
                "shards": len(w.shards),
                "elements": w.elements,
                "elements_per_s": w.elements / seconds(w),
                "busy": w.work_wall / seconds(w),
                "retiring": w.retiring,
                "live": w in self.workers.live,
            }
            for w in self.workers.every
        ]

    def actor_window(self, consumer_wait: float) -> ActorWindow:
        """The inputs of ``tuning.actor_move`` since the last call (the tuner's window), with
        ``consumer_wait`` as the tuner measured it."""
        now = time.perf_counter()
        since, before = self._window_start
        workers = list(self.workers.live)
        up = [w for w in workers if w.up is None and not w.retiring]
        busy = [(w.work_wall - before.get(w.id, 0.0)) / max(now - since, 1e-9) for w in up]
        self._window_start = (now, {w.id: w.work_wall for w in workers})
        knob = self.knobs["parallelism"]
        most = min(self.op.max_workers or self.num_shards, self.num_shards)
        return ActorWindow(
            consumer_wait,
            [min(1.0, b) for b in busy],
            sum(1 for w in workers if w.up is not None),
            self.free_cpus,
            most if self._autotune else knob.value,
            CPUS_PER_ACTOR,
        )

    def get_state(self) -> State:
        return saved(self.shards, self.cursor)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.ctx.unregister(self)
        self._inflight.clear()
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.stop_all()
        if getattr(self, "ray", None) is not None:
            cluster.release()
