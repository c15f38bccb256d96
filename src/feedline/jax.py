"""JAX: feedline's elements as ``jax.Array``\\ s, on the devices (and sharding) of a train step.

``device_put(ds, sharding)`` is the counterpart of flax's ``prefetch_to_device`` and of
``jax.device_put`` over each batch, with a resumable state (``state_dict`` /
``load_state_dict``, as for ``feedline.torch.to_torch``). JAX is the ``feedline[jax]`` extra,
imported on first use.

On the CPU an array becomes a ``jax.Array`` without a copy when XLA can use its memory as it
is: compact, starting at a 64-byte boundary (XLA:CPU's minimum alignment), of a dtype JAX
keeps. ``Dataset.batch`` stacks its batches at that boundary; an int64 or float64 leaf of
64 KiB or more, which JAX narrows to int32 or float32 unless ``jax_enable_x64`` is on (its
own rule, and a copy), is narrowed here into memory at that boundary, so the narrowed copy
is shared too.
So a batch costs a call instead of a copy (2.5-11.5 ms of CPU for a 19 MiB image batch).

Which call: where the target is a CPU device (the default device when it is the only one,
or one passed as ``sharding``), a writable array is handed over through DLPack
(``jax.dlpack.from_dlpack``): ~21 us a call against ~30 us for ``jax.device_put``, and
unlike that one it keeps the GIL. A call that lets the GIL go waits to get it back behind
the pipeline's busy threads: 0.1-0.4 ms a call behind 150 threads waiting on I/O, 2-4 ms
behind one computing in Python, where the DLPack call took 0.1-0.3 ms. Any other array (a
read-only one, which DLPack cannot export, one with gaps, another device, a sharding) goes
through ``jax.device_put``.

Sharing is safe because JAX keeps the numpy array alive as long as the ``jax.Array``, and
feedline never writes into an array it has handed out: a batch is new memory, and one stacked
in a worker's shared memory goes back to that worker only once no array uses it (see
``feedline.runtime.process.shm.ReplySegments``). An iterable of your own arrays is shared as
``jax.device_put`` shares it: do not write into them while their ``jax.Array``\\ s live.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import numpy as np

from feedline.feed import Feed
from feedline.io.fs import require
from feedline.ops.base import AUTOTUNE
from feedline.ops.batching import aligned_empty

__all__ = ["JaxIterator", "device_put"]

# Arrays from this size on are narrowed here (int64 to int32...) into memory XLA shares: one
# copy where JAX's own narrowing makes two (173 -> 42 us for 512 KiB of int64). Below it,
# JAX's is as fast, and in a pipeline faster (56 against 76-80 us for 2 KiB batches).
NARROW_MIN_BYTES = 64 * 1024
# Where an adaptive queue (``prefetch=AUTOTUNE``) starts: one element copying while the
# step uses the other.
_START_AHEAD = 2


def _jax() -> ModuleType:
    return require("jax", "jax", "feedline.jax")


class JaxIterator(Feed):
    """What ``device_put`` returns: ``jax.Array`` leaves in the elements' nesting, ``prefetch``
    elements sent ahead; strings stay numpy arrays of ``bytes`` (JAX has no string dtype)."""

    def __init__(self, iterable: Iterable[Any], sharding: Any, prefetch: int) -> None:
        self._jax = _jax()
        self._sharding = sharding
        # A sharding over processes' devices: each process holds its own rows of the batch.
        self._global = isinstance(sharding, self._jax.sharding.Sharding)
        self._to_first_cpu = not self._global and _first_cpu_device(self._jax, sharding)
        self._canonical: dict[np.dtype, np.dtype] = {}
        if prefetch == AUTOTUNE:
            super().__init__(iterable, self._put, _START_AHEAD, ready=self._all_ready)
        elif isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0 or AUTOTUNE, got {prefetch!r}")
        else:
            super().__init__(iterable, self._put, prefetch)

    def _put(self, element: Any) -> Any:
        jax = self._jax
        leaves, tree = jax.tree_util.tree_flatten(element)
        return jax.tree_util.tree_unflatten(tree, [self._leaf(leaf) for leaf in leaves])

    def _leaf(self, leaf: Any) -> Any:
        if isinstance(leaf, bytes) or (isinstance(leaf, np.ndarray) and leaf.dtype == object):
            return leaf
        if type(leaf) is np.ndarray:
            dtype = self._kept_dtype(leaf.dtype)
            if dtype != leaf.dtype and leaf.nbytes >= NARROW_MIN_BYTES:
                leaf = self._narrowed(leaf, dtype)
            if dtype == leaf.dtype and self._imports(leaf):
                return self._jax.dlpack.from_dlpack(leaf)  # onto the first CPU device
        if self._global:
            # This process's rows of the global batch (all of it on one process).
            return self._jax.make_array_from_process_local_data(self._sharding, np.asarray(leaf))
        return self._jax.device_put(leaf, self._sharding)

    def _imports(self, leaf: np.ndarray) -> bool:
        """Whether DLPack takes ``leaf`` to the target as it is."""
        return (
            self._to_first_cpu
            and leaf.flags.writeable
            and leaf.dtype.isnative
            and (leaf.flags.c_contiguous or leaf.flags.f_contiguous)
        )

    def _kept_dtype(self, dtype: np.dtype) -> np.dtype:
        """The dtype JAX keeps for ``dtype`` (int64 is int32 unless x64 is on)."""
        kept = self._canonical.get(dtype)
        if kept is None:
            kept = self._canonical[dtype] = np.dtype(self._jax.dtypes.canonicalize_dtype(dtype))
        return kept

    @staticmethod
    def _narrowed(leaf: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``leaf`` in ``dtype``, in memory XLA can share."""
        out = aligned_empty(leaf.shape, dtype)
        np.copyto(out, leaf, casting="unsafe")  # JAX's own narrowing: int64 wraps to int32
        return out

    def _all_ready(self, element: Any) -> bool:
        leaves = self._jax.tree_util.tree_leaves(element)
        return all(leaf.is_ready() for leaf in leaves if hasattr(leaf, "is_ready"))


def _first_cpu_device(jax: ModuleType, sharding: Any) -> bool:
    """Whether ``sharding`` names the first CPU device, where DLPack puts a numpy array
    (None: the default device, if it is the only one)."""
    if sharding is None:
        if jax.config.jax_default_device is not None or jax.device_count() != 1:
            return False  # uncommitted arrays may go to another device: device_put decides
        sharding = jax.devices()[0]
    return (
        isinstance(sharding, jax.Device)
        and sharding.platform == "cpu"
        and sharding == jax.devices("cpu")[0]
    )


def device_put(iterable: Iterable[Any], sharding: Any = None, prefetch: int = 2) -> JaxIterator:
    """``jax.Array``\\ s of ``iterable``'s elements (a Dataset, its iterator, or any iterable
    of numpy elements), ``prefetch`` of them sent ahead of the consumer (``AUTOTUNE``: from 2,
    one more each time an element is handed out before its copy finished, up to 8).

    ``sharding``: None (the default device), a device, or a ``jax.sharding.Sharding``; with a
    ``NamedSharding`` over several processes each process passes its own part of the batch
    (as ``feedline.distribute.auto_shard`` gives it) and gets the global array
    (``jax.make_array_from_process_local_data``). Counterparts: flax's
    ``jax_utils.prefetch_to_device``; tf.data's ``prefetch_to_device``."""
    return JaxIterator(iterable, sharding, prefetch)
