"""PyTorch: feedline's numpy elements as torch tensors, in a training loop or a DataLoader.

- ``to_torch(ds)``: an iterator of tensors in the elements' nesting, converted without a copy
  (``torch.from_numpy``) and, given a ``device``, copied there one element ahead of the
  consumer. ``state_dict()`` / ``load_state_dict()`` resume the pass exactly: it is a
  ``torch.distributed.checkpoint`` ``Stateful``, to save beside the model. This is the fast
  path: feedline's own threads and processes do the parallel work (AUTOTUNE sizes them), so no
  DataLoader workers are needed. torchdata's counterpart: ``StatefulDataLoader``.
- ``IterableDataset(ds)``: a ``torch.utils.data.IterableDataset`` for those who keep their
  DataLoader; each worker of each rank reads its own part (``feedline.distribute.shard``), so
  every element comes out once in all.

Strings have no torch dtype: a string component comes out as ``bytes``, and a batch of them
as a (nested) list of ``bytes``, as torch's ``default_convert`` leaves them. torch is the
``feedline[torch]`` extra, imported on first use.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

from feedline.dataset import Dataset
from feedline.distribute import ops_of, rank_and_world, shard
from feedline.feed import Feed
from feedline.io.fs import require
from feedline.ops.slicing import ShardOp
from feedline.structure import map_structure

__all__ = ["TorchIterator", "tensor_to_numpy", "to_tensors", "to_torch"]


def _torch() -> ModuleType:
    return require("torch", "torch", "feedline.torch")


def to_tensors(element: Any) -> Any:
    """``element`` with every numpy leaf as a torch tensor (sharing its memory where numpy
    allows), nesting kept (tuples, namedtuples, dicts); strings stay ``bytes`` (a batch of
    them: a list)."""
    return _tensors(element, _torch())


def _tensors(element: Any, torch: ModuleType) -> Any:
    # A batch is most often one array: converted without walking a structure (the whole
    # conversion then costs ~1 us, against a batch every ~65 us at 4M elements/s).
    if type(element) is np.ndarray:
        return _array(element, torch)
    return map_structure(lambda leaf: _tensor(leaf, torch), element)


def _tensor(x: Any, torch: ModuleType) -> Any:
    if type(x) is np.ndarray:
        return _array(x, torch)
    if isinstance(x, np.generic):
        return _array(np.asarray(x), torch)
    return x  # bytes, or a tensor already


def _array(a: np.ndarray, torch: ModuleType) -> Any:
    # dtype.kind first: comparing dtypes (``a.dtype == object``) or building ``dtype.name``
    # costs more than the conversion itself.
    kind = a.dtype.kind
    if kind == "O":
        return a.tolist()  # strings: torch has no dtype for them
    if kind == "V" and a.dtype.name == "bfloat16":  # ml_dtypes' (see tensor_to_numpy)
        return torch.from_numpy(_writable(a).view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(_writable(a))
    except TypeError as e:
        raise TypeError(f"a numpy array of dtype {a.dtype} has no torch counterpart: {e}") from e


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` itself where torch may share it, else a copy: a read-only array (cached or
    constant data) must not become a tensor the training loop could write into, and torch
    takes no negative strides."""
    if a.flags.writeable and min(a.strides, default=0) >= 0:
        return a
    return np.array(a)


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor a user function returned, as the numpy array feedline's elements are
    (sharing its memory where it is on the CPU). bfloat16, which numpy lacks, becomes
    ml_dtypes' bfloat16 (the dtype JAX and TensorFlow give numpy), bit for bit, and
    ``to_torch`` turns it back into ``torch.bfloat16``."""
    torch = _torch()
    t = tensor.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        try:
            ml_dtypes = require("ml_dtypes", "torch", "a torch.bfloat16 tensor in a pipeline")
        except ImportError as e:
            raise TypeError(
                "a function returned a torch.bfloat16 tensor, which numpy cannot hold without "
                f"the ml_dtypes package ({e}); install it, or return tensor.float()"
            ) from e
        return np.asarray(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    try:
        return np.asarray(t.numpy())
    except TypeError as e:
        raise TypeError(f"a torch tensor of dtype {t.dtype} has no numpy counterpart: {e}") from e


class TorchIterator(Feed):
    """What ``to_torch`` returns: an iterator of tensors, and a ``Stateful`` for checkpoints.

    With a ``device``, each element is sent there (from pinned memory with ``pin_memory``,
    ``non_blocking``) as the one before it is handed out, so on a GPU the copy overlaps the
    training step; ``state_dict()`` is still that of the elements handed out.
    """

    def __init__(
        self, iterable: Iterable[Any], device: Any = None, pin_memory: bool = False
    ) -> None:
        self._torch = _torch()
        self._device = None if device is None else self._torch.device(device)
        self._pin = bool(pin_memory) and self._pinning_possible()
        sends = self._device is not None or self._pin
        super().__init__(iterable, self._to_device if sends else self._tensors, int(sends))

    def _pinning_possible(self) -> bool:
        if self._torch.cuda.is_available():
            return True
        # As torch's DataLoader does: pinned memory needs an accelerator.
        warnings.warn(
            "to_torch: pin_memory needs CUDA, which is not available; not pinning", stacklevel=3
        )
        return False

    def _tensors(self, element: Any) -> Any:
        return _tensors(element, self._torch)

    def _to_device(self, element: Any) -> Any:
        return map_structure(self._send, element)

    def _send(self, leaf: Any) -> Any:
        x = _tensor(leaf, self._torch)
        if not isinstance(x, self._torch.Tensor):
            return x
        if self._pin:
            x = x.pin_memory()
        return x if self._device is None else x.to(self._device, non_blocking=True)


def to_torch(
    iterable: Iterable[Any], device: Any = None, pin_memory: bool = False
) -> TorchIterator:
    """Torch tensors of ``iterable``'s elements (a Dataset, its iterator, or any iterable of
    numpy elements). ``device``: where to copy them, ahead of the consumer; ``pin_memory``:
    through page-locked memory (CUDA only). The result's ``state_dict`` / ``load_state_dict``
    save and resume the pass (over a Dataset or its iterator). torchdata's counterpart:
    ``StatefulDataLoader``; tf.data has none (it yields tf.Tensors already)."""
    return TorchIterator(iterable, device, pin_memory)


def warn_if_unsharded_in_worker(op: Any) -> None:
    """Warn when a pass starts in one of several DataLoader workers without a split: each
    worker would then yield every element (the duplicated rows users report). Only under an
    iterable-style dataset: a map-style one's workers get disjoint indices."""
    data = sys.modules["torch.utils.data"]
    info = data.get_worker_info()
    if (
        info is None
        or info.num_workers < 2
        or not isinstance(info.dataset, data.IterableDataset)
        or getattr(info.dataset, "splits_by_worker", False)
    ):
        return
    if any(isinstance(node, ShardOp) for node in ops_of(op)):
        return  # split by the user
    warnings.warn(
        f"a feedline pass started in DataLoader worker {info.id} of {info.num_workers} reads "
        "the whole dataset: every worker yields every element. Wrap the dataset in "
        "feedline.torch.IterableDataset (each worker reads its own part), or use "
        "feedline.torch.to_torch without DataLoader workers",
        stacklevel=3,
    )


_classes: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # The class derives from torch's, so it is made when first asked for, not at import.
    if name != "IterableDataset":
        raise AttributeError(f"module 'feedline.torch' has no attribute {name!r}")
    if name not in _classes:
        _classes[name] = _iterable_dataset_class()
    return _classes[name]


def _unpickle_iterable_dataset(blob: bytes, epoch: int) -> Any:
    return __getattr__("IterableDataset")(pickle.loads(blob), epoch)


def _start_runs_at(ds: Dataset, run: int) -> None:
    """Every random op of ``ds`` numbers its next passes from ``run`` (see ``set_epoch``)."""
    for op in ops_of(ds._op):
        passes = getattr(op, "passes", None)
        if passes is not None:
            passes.start_runs_at(run)


def _iterable_dataset_class() -> type:
    torch = _torch()

    class IterableDataset(torch.utils.data.IterableDataset):  # type: ignore[misc, name-defined]
        """``ds`` for a torch DataLoader: every element once across the DataLoader's workers
        and the ranks of a process group (or ``RANK`` / ``WORLD_SIZE``). Worker ``w`` of
        rank ``r`` reads part ``r * num_workers + w`` (by file where ``ds`` reads files, see
        ``feedline.distribute.shard``); elements come out as tensors (``to_tensors``).

        Use ``DataLoader(feedline.torch.IterableDataset(ds.batch(32)), batch_size=None)``
        to keep feedline's batches. Counterpart: a torch ``IterableDataset`` that splits by
        ``get_worker_info()``, as torch's documentation shows."""

        splits_by_worker = True

        def __init__(self, ds: Dataset, epoch: int = 0) -> None:
            super().__init__()
            if not isinstance(ds, Dataset):
                raise TypeError(
                    f"IterableDataset takes a feedline Dataset, got {type(ds).__name__}"
                )
            self.dataset = ds
            self.epoch = epoch
            self._epoch_applied = False

        def set_epoch(self, epoch: int) -> None:
            """Call before each epoch (as ``DistributedSampler.set_epoch``) when the
            DataLoader's workers are not persistent: each epoch's workers get a new copy
            of the dataset, whose shuffles would otherwise repeat the first epoch's order.
            (In one process, or with ``persistent_workers=True``, passes vary anyway.)"""
            self.epoch = int(epoch)
            self._epoch_applied = False

        def part(self) -> Dataset:
            """The part this worker of this rank reads."""
            rank, world, _ = rank_and_world()
            info = torch.utils.data.get_worker_info()
            workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
            return shard(self.dataset, world * workers, rank * workers + worker)[0]

        def __iter__(self) -> Iterator[Any]:
            if not self._epoch_applied:
                self._epoch_applied = True
                _start_runs_at(self.dataset, self.epoch)
            with self.part().iterator() as it:
                for element in it:
                    yield to_tensors(element)

        def __reduce__(self) -> tuple[Any, tuple[bytes, int]]:
            # To workers started by spawn or forkserver (macOS's default; the safe choice in
            # a process with threads, e.g. JAX's), with the lambdas of the pipeline.
            from feedline.runtime.process.spawn import cloudpickle_dumps

            return _unpickle_iterable_dataset, (cloudpickle_dumps(self.dataset), self.epoch)

    IterableDataset.__module__ = __name__
    return IterableDataset
