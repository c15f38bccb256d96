"""Seeds and pass numbering for ops that draw random numbers (shuffle, random_map).

Each pass over such an op draws from ``rng(seed, run, epoch)``: ``run`` numbers the top-level
iterators made over the op (so a new iterator gets new numbers), ``epoch`` numbers the passes
one run makes over it (``repeat``). Both go into saved states, and a restored pass tells its
run which epoch comes next, so resuming inside ``repeat`` continues with the same numbers, in
any process. A probe pass (inferring an element spec) always uses ``(seed, 0, 0)`` and moves
no counter, so looking at ``element_spec`` never changes what a later pass yields.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import numpy as np

from feedline.errors import InvalidStateError
from feedline.runtime.context import IterContext
from feedline.runtime.iterator import State
from feedline.runtime.states import state_int

_SEED_MASK = 2**64 - 1
PassKey = tuple[int, int, int]


def fresh_seed() -> int:
    """An unpredictable 64-bit seed, for ops given ``seed=None``."""
    entropy = np.random.SeedSequence().entropy
    assert isinstance(entropy, int)
    return entropy & _SEED_MASK


def as_seed(seed: Any) -> int:
    """A user's seed as a non-negative 64-bit int; tf.data takes any int64, negatives included."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    return int(seed) & _SEED_MASK


class PassKeys:
    """Hands out the (seed, run, epoch) of each pass over one op."""

    def __init__(self, seed: int | None, vary_per_pass: bool) -> None:
        # A seed the user gave is part of the pipeline: a state with another one is not its.
        self.seeded = seed is not None
        self.seed = fresh_seed() if seed is None else as_seed(seed)
        self.vary_per_pass = vary_per_pass
        self._runs = itertools.count()
        # Per top-level run: (seed, run, next epoch). Weak keys: a finished run leaves nothing.
        self._next_epoch: weakref.WeakKeyDictionary[IterContext, PassKey] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Runs are this process's: a copy elsewhere numbers its own (from the same seed).
        state = dict(self.__dict__)
        del state["_lock"], state["_next_epoch"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._next_epoch = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def start_runs_at(self, run: int) -> None:
        """Number this copy's next passes from ``run``: a copy made afresh for every epoch
        (a DataLoader's workers) would otherwise draw the first pass's numbers each time."""
        with self._lock:
            self._runs = itertools.count(run)

    def key(self, ctx: IterContext, state: State | None, owner: str) -> PassKey:
        """The key of a new pass in ``ctx``, or of the pass a saved ``state`` (of the op
        ``owner``) resumes."""
        restored: PassKey | None = None
        if state is not None:
            restored = self.restored_key(state, owner)
        elif ctx.probe or not self.vary_per_pass:
            return (self.seed, 0, 0)
        if not self.vary_per_pass:
            assert restored is not None
            return restored
        with self._lock:
            known = self._next_epoch.get(ctx)
            key = restored or known or (self.seed, next(self._runs), 0)
            if known is None or known[:2] != key[:2] or known[2] <= key[2]:
                self._next_epoch[ctx] = (key[0], key[1], key[2] + 1)
        return key

    def restored_key(self, state: State, owner: str) -> PassKey:
        """The key a state names, which must be one of this op's keys."""
        seed = state_int(state, "seed", owner, 0, _SEED_MASK)
        if self.seeded and seed != self.seed:
            raise InvalidStateError(owner, "seed", f"is {seed}, not this op's seed {self.seed}")
        # Passes that do not vary all use run 0 and epoch 0.
        most = None if self.vary_per_pass else 0
        return (
            seed,
            state_int(state, "run", owner, 0, most),
            state_int(state, "epoch", owner, 0, most),
        )

    @staticmethod
    def as_state(key: PassKey) -> State:
        seed, run, epoch = key
        return {"seed": seed, "run": run, "epoch": epoch}

    @staticmethod
    def generator(key: PassKey, *more: int) -> np.random.Generator:
        return np.random.default_rng([*key, *more])
