"""``feedline.torch``: tensors equal to the numpy elements, exact resumption, DataLoader
workers that each read their own part, and a model that learns from a pipeline."""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.errors import InvalidStateError
from tests.frameworks.helpers import (
    FAILING_EVERY_4TH,
    LEAVES,
    assert_feed_resumes,
    assert_worker_batches_stay_right,
    failing_every_4th,
    no_process_left,
    outcomes,
    regression,
    run_script,
)

torch = pytest.importorskip("torch")
ft = pytest.importorskip("feedline.torch")

Pair = collections.namedtuple("Pair", ["left", "right"])


def mixed(n: int = 10) -> fl.Dataset:
    """int64, float32, bool and string components, nested in a dict, a tuple, a namedtuple."""
    return fl.Dataset.from_tensor_slices(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3) / 7,
            "pair": Pair(
                np.arange(n) % 2 == 0,
                np.array([f"s{i}".encode() for i in range(n)], dtype=object),
            ),
        }
    )


def assert_tensor_like(t: Any, a: Any, where: str) -> None:
    """``t`` is ``a`` as to_torch gives it: a tensor of the same dtype and values, or bytes
    (a list of them for an array of strings)."""
    if isinstance(a, dict):
        assert isinstance(t, dict) and t.keys() == a.keys(), where
        for key in a:
            assert_tensor_like(t[key], a[key], f"{where}[{key!r}]")
    elif isinstance(a, tuple):
        assert type(t) is type(a) and len(t) == len(a), where
        for i, (x, y) in enumerate(zip(t, a)):
            assert_tensor_like(x, y, f"{where}[{i}]")
    elif isinstance(a, bytes) or (isinstance(a, np.ndarray) and a.dtype == object):
        assert t == (a.tolist() if isinstance(a, np.ndarray) else a), where
    else:
        a = np.asarray(a)
        assert isinstance(t, torch.Tensor), where
        assert t.dtype == torch.from_numpy(np.empty(0, a.dtype)).dtype, where
        assert tuple(t.shape) == a.shape, where
        np.testing.assert_array_equal(t.numpy(), a, err_msg=where)


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_tensors_equal_the_numpy_elements(batch: int | None, device: str | None) -> None:
    ds = mixed() if batch is None else mixed().batch(batch)
    want = list(ds)
    with ft.to_torch(ds, device=device) as it:
        got = list(it)
    assert len(got) == len(want)
    for i, (t, a) in enumerate(zip(got, want)):
        assert_tensor_like(t, a, f"element {i}")


def test_batches_become_tensors_without_a_copy() -> None:
    batch = np.arange(12, dtype=np.float32).reshape(4, 3)
    (tensor,) = ft.to_torch([batch])
    assert tensor.data_ptr() == batch.ctypes.data
    frozen = batch.copy()
    frozen.flags.writeable = False  # e.g. cached data: never handed out to be written into
    (copied,) = ft.to_torch([frozen])
    assert copied.data_ptr() != frozen.ctypes.data
    (flipped,) = ft.to_torch([batch[::-1]])  # torch takes no negative strides
    np.testing.assert_array_equal(flipped.numpy(), batch[::-1])


@pytest.mark.parametrize("name", LEAVES)
def test_values_and_dtypes_are_the_numpy_ones(name: str) -> None:
    (got,) = ft.to_torch([LEAVES[name]])
    leaf = np.asarray(LEAVES[name])
    assert_tensor_like(got, leaf, name)
    # An array is shared unless torch could write into read-only data or cannot take its
    # strides (a numpy scalar has no memory to share).
    shares = (
        type(LEAVES[name]) is np.ndarray
        and leaf.flags.writeable
        and min(leaf.strides, default=0) >= 0
        and leaf.size > 0
    )
    assert np.shares_memory(got.numpy(), leaf) == shares, name


def test_pipeline_batches_and_elements_become_tensors_without_a_copy() -> None:
    images = fl.Dataset.range(12).map(lambda i: np.full((8, 8, 3), i, np.uint8))
    for ds in (images, images.batch(4)):
        with ds.iterator() as it:
            arrays = list(it)
        for a, t in zip(arrays, ft.to_torch(arrays)):
            assert t.data_ptr() == a.ctypes.data
            np.testing.assert_array_equal(t.numpy(), a)
    # A scalar element (a numpy scalar, not an array) becomes a 0-d tensor.
    assert [t.shape for t in ft.to_torch(fl.Dataset.range(2))] == [torch.Size([])] * 2


@pytest.mark.timeout(180)
def test_batches_from_process_workers_stay_right_after_the_pipeline_moves_on() -> None:
    assert_worker_batches_stay_right(lambda batches: ft.to_torch(batches), torch.Tensor.data_ptr)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_state_dict_resumes_exactly(device: str | None) -> None:
    assert_feed_resumes(
        lambda ds: ft.to_torch(ds, device=device),
        mixed(30).shuffle(10, seed=4).batch(3),
        (0, 1, 2, 5, 9, 10),
        lambda e: np.concatenate([e["x"].numpy().ravel(), e["id"].numpy(), e["pair"].right]),
    )


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_failed_element_fails_in_its_place(device: str | None) -> None:
    with ft.to_torch(failing_every_4th(), device=device) as it:
        assert outcomes(it, int) == FAILING_EVERY_4TH


def test_a_crafted_state_is_refused_and_the_pass_goes_on() -> None:
    with ft.to_torch(fl.Dataset.range(10)) as it:
        next(it)
        saved = it.state_dict()
        state = json.loads(saved["feedline_state"])
        state["pipeline"] = ["range(0, 11, 1)"]
        with pytest.raises(InvalidStateError):
            it.load_state_dict({"feedline_state": json.dumps(state)})
        with pytest.raises(ValueError, match="feedline_state"):
            it.load_state_dict({"other": 1})
        assert int(next(it)) == 1
    with pytest.raises(TypeError, match="feedline Dataset"):
        ft.to_torch([np.zeros(2)]).state_dict()


def test_it_is_a_stateful_for_distributed_checkpoint(tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.stateful import Stateful

    ds = fl.Dataset.range(20).map(lambda x: x * 2, num_parallel_calls=2).batch(3)
    model = torch.nn.Linear(2, 1)
    with ft.to_torch(ds) as it:
        assert isinstance(it, Stateful)
        next(it), next(it)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming a single process"
            dcp.save({"data": it, "model": model.state_dict()}, checkpoint_id=str(tmp_path))
        rest = [b.tolist() for b in it]
    with ft.to_torch(ds) as resumed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"data": resumed, "model": model.state_dict()}, checkpoint_id=str(tmp_path))
        assert (
            [b.tolist() for b in resumed]
            == rest
            == [[12, 14, 16], [18, 20, 22], [24, 26, 28], [30, 32, 34], [36, 38]]
        )


def test_a_map_returning_bfloat16_tensors() -> None:
    ds = fl.Dataset.range(6).map(lambda x: torch.full((2,), float(x) / 3, dtype=torch.bfloat16))
    batches = list(ft.to_torch(ds.batch(4)))
    assert [b.dtype for b in batches] == [torch.bfloat16] * 2
    want = torch.stack([torch.full((2,), i / 3, dtype=torch.bfloat16) for i in range(6)])
    assert torch.equal(torch.cat(batches), want)  # bit for bit
    assert str(ds.element_spec.dtype) == "bfloat16"


def test_bfloat16_without_ml_dtypes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ml_dtypes", None)
    ds = fl.Dataset.range(2).map(lambda x: torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(fl.StageError, match=r"bfloat16.*ml_dtypes.*tensor\.float\(\)"):
        list(ds)


def test_other_torch_tensors_from_a_map_become_numpy() -> None:
    ds = fl.Dataset.range(3).map(lambda x: {"t": torch.arange(2, dtype=torch.int16) + int(x)})
    assert [e["t"].dtype for e in ds] == [np.int16] * 3
    np.testing.assert_array_equal(next(iter(ds.batch(3)))["t"], [[0, 1], [1, 2], [2, 3]])


def loader(ds: Any, workers: int, persistent: bool = False) -> Any:
    # Workers from a forkserver: forking this process, where other tests may have started
    # JAX's or TensorFlow's threads, could deadlock.
    context = "forkserver" if workers else None
    return torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=context,
        persistent_workers=persistent,
    )


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_dataloader_workers_give_each_element_once(workers: int) -> None:
    ds = fl.Dataset.range(100).map(lambda x: x * 10, num_parallel_calls=fl.AUTOTUNE)
    with no_process_left():
        got = [int(x) for x in loader(ft.IterableDataset(ds), workers)]
    assert sorted(got) == list(range(0, 1000, 10))


@pytest.mark.timeout(180)
def test_dataloader_workers_split_files_and_keep_batches(tmp_path: Path) -> None:
    for f in range(6):
        (tmp_path / f"{f}.txt").write_text("".join(f"{f}.{i}\n" for i in range(5)))
    files = fl.Dataset.list_files(str(tmp_path / "*.txt"))
    ds = files.interleave(fl.TextLineDataset, cycle_length=2).batch(4)
    with no_process_left():
        batches = list(loader(ft.IterableDataset(ds), 2))
    lines = [line for b in batches for line in b]
    assert sorted(lines) == sorted(f"{f}.{i}".encode() for f in range(6) for i in range(5))
    # Each batch holds lines of one worker's files (3 files of 5 lines: batches of 4, 4, 4, 3).
    assert sorted(len(b) for b in batches) == [3, 3, 4, 4, 4, 4, 4, 4]


@pytest.mark.timeout(240)
def test_set_epoch_reshuffles_each_epoch_whatever_the_workers() -> None:
    ds = fl.Dataset.range(24).shuffle(24, seed=5)
    runs = []
    for persistent in (False, True):
        wrapped = ft.IterableDataset(ds)
        epochs = loader(wrapped, 2, persistent)
        orders = []
        with no_process_left():
            for epoch in range(2):
                wrapped.set_epoch(epoch)
                orders.append([int(x) for x in epochs])
            del epochs  # persistent workers end with their DataLoader
        assert all(sorted(order) == list(range(24)) for order in orders)
        assert orders[0] != orders[1]  # a new order every epoch
        runs.append(orders)
    assert runs[0] == runs[1]  # the same orders, new workers each epoch or not


def double(x: Any) -> Any:
    return x * 2


@pytest.mark.timeout(240)
def test_process_executor_inside_dataloader_workers() -> None:
    ds = fl.Dataset.range(40).map(double, num_parallel_calls=2, executor="process")
    with no_process_left():
        got = [int(x) for x in loader(ft.IterableDataset(ds), 2)]
    assert sorted(got) == list(range(0, 80, 2))


class UsersWrapper(torch.utils.data.IterableDataset):  # type: ignore[misc]
    """What users write today: every worker iterates the whole dataset. It yields the
    warnings the pass gave in each worker."""

    def __init__(self, ds: fl.Dataset) -> None:
        self.ds = ds

    def __iter__(self) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self.ds.iterator() as it:
                first = next(it)
        yield int(first), [str(w.message) for w in caught]


@pytest.mark.timeout(180)
def test_a_users_own_wrapper_under_workers_is_warned_about() -> None:
    with no_process_left():
        got = list(loader(UsersWrapper(fl.Dataset.range(10)), 2))
    assert [first for first, _ in got] == [0, 0]  # the duplication users reported
    for _, messages in got:
        assert any("every worker yields every element" in m for m in messages), messages
    # Split by the user (shard per worker) or by feedline.torch.IterableDataset: no warning.
    split = UsersWrapper(fl.Dataset.range(10).shard(1, 0))
    with no_process_left():
        assert all(messages == [] for _, messages in loader(split, 2))


@pytest.mark.timeout(240)
def test_a_model_learns_from_a_pipeline() -> None:
    ds = regression([1.5, -2.0, 0.5, 3.0], 0.25, rows=512, epochs=10)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with no_process_left(), ft.to_torch(ds) as batches:
        steps = 0
        for features, labels in batches:
            steps += 1
            loss = torch.nn.functional.mse_loss(model(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert steps == 320
    assert loss.item() < 1e-3


def test_a_missing_torch_names_the_extra() -> None:
    (message,) = run_script(
        "import sys, json; sys.modules['torch'] = None\n"
        "import feedline as fl, feedline.torch as ft\n"
        "try:\n"
        "    ft.to_torch(fl.Dataset.range(2))\n"
        "except ImportError as e:\n"
        "    print(json.dumps(str(e)))\n"
    )
    assert "pip install 'feedline[torch]'" in message
