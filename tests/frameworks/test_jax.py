"""``feedline.jax.device_put``: jax.Arrays equal to the numpy elements, sent ahead, sharded
over devices from each process's local batch, resumable; and a model that learns. On the CPU a
batch becomes a jax.Array without a copy, and stays right after the pipeline moves on."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.frameworks.helpers import (
    FAILING_EVERY_4TH,
    IMAGES,
    LEAVES,
    aligned,
    assert_feed_resumes,
    assert_worker_batches_stay_right,
    failing_every_4th,
    frozen,
    outcomes,
    regression,
    run_script,
)

jax = pytest.importorskip("jax")
fj = pytest.importorskip("feedline.jax")


def mixed(n: int = 12) -> fl.Dataset:
    return fl.Dataset.from_tensor_slices(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": np.arange(n * 2, dtype=np.float32).reshape(n, 2) / 3,
            "flag": (np.arange(n) % 3 == 0, np.array([b"s%d" % i for i in range(n)], object)),
        }
    )


def assert_array_like(got: Any, want: Any) -> None:
    """A jax.Array with JAX's dtype for the numpy one (int64 is int32 unless x64 is on, JAX's
    own rule) and the same values; strings stay numpy arrays of bytes."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_array_like(got[key], want[key])
    elif isinstance(want, tuple):
        assert type(got) is tuple and len(got) == len(want)
        for g, w in zip(got, want):
            assert_array_like(g, w)
    elif isinstance(want, np.ndarray) and want.dtype == object:
        assert got.tolist() == want.tolist()
    else:
        assert isinstance(got, jax.Array)
        assert got.dtype == jax.dtypes.canonicalize_dtype(np.asarray(want).dtype)
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("prefetch", [0, 1, 2, fl.AUTOTUNE])
def test_arrays_equal_the_numpy_elements(prefetch: int) -> None:
    ds = mixed().batch(5)
    want = list(ds)
    with fj.device_put(ds, prefetch=prefetch) as it:
        got = list(it)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_array_like(g, w)


def test_elements_are_sent_ahead_and_on_the_device() -> None:
    device = jax.devices()[0]
    with fj.device_put(fl.Dataset.range(10).batch(2), sharding=device, prefetch=3) as it:
        first = next(it)
        assert len(it._queue) == 3  # the next three are already on their way
        assert first.devices() == {device}
    with fj.device_put(fl.Dataset.range(100).batch(2), prefetch=fl.AUTOTUNE) as it:
        assert sum(1 for _ in it) == 50
        assert 2 <= it.ahead <= 8


@pytest.mark.parametrize("prefetch", [0, 3])
def test_state_dict_resumes_exactly(prefetch: int) -> None:
    assert_feed_resumes(
        lambda ds: fj.device_put(ds, prefetch=prefetch),
        mixed(40).shuffle(16, seed=1).batch(3),
        (0, 1, 2, 6, 13, 14),
        lambda e: np.concatenate([np.asarray(e["x"]).ravel(), np.asarray(e["id"])]),
    )


@pytest.mark.parametrize("prefetch", [0, 1, 3, fl.AUTOTUNE])
def test_a_failed_element_fails_in_its_place(prefetch: int) -> None:
    with fj.device_put(failing_every_4th(), prefetch=prefetch) as it:
        assert outcomes(it, int) == FAILING_EVERY_4TH


@pytest.mark.parametrize("name", LEAVES)
def test_values_and_dtypes_are_the_numpy_ones(name: str) -> None:
    leaf = LEAVES[name]
    before = np.array(leaf)
    (got,) = fj.device_put([leaf], prefetch=0)
    assert got.shape == np.shape(leaf)
    assert_array_like(got, np.asarray(leaf))
    np.testing.assert_array_equal(leaf, before)  # the input untouched


def pointer(x: Any) -> int:
    return int(x.unsafe_buffer_pointer())


def test_a_batch_is_shared_where_xla_can_use_its_memory_and_copied_elsewhere() -> None:
    image = aligned(IMAGES.astype(np.float32))
    frozen_image = frozen(aligned(IMAGES))
    shared = [image, frozen_image, aligned(np.arange(9, dtype=np.int32))]
    copied = [
        aligned(IMAGES.astype(np.float32), offset=16),  # XLA:CPU wants 64-byte alignment
        image[:, ::2],  # not contiguous
        aligned(np.arange(9, dtype=np.int64)),  # int64 becomes int32 (x64 is off)
    ]
    for a, got in zip(shared + copied, fj.device_put(shared + copied, prefetch=0)):
        np.testing.assert_array_equal(np.asarray(got), a)
        assert (pointer(got) == a.ctypes.data) == any(a is s for s in shared), a.dtype


@pytest.mark.parametrize("rows", [4, fj.NARROW_MIN_BYTES // 8])  # JAX's narrowing, or ours
def test_int64_and_float64_are_narrowed_as_jax_narrows_them(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # x64 is off: JAX's rule makes them int32 and float32 (int64 wraps), a copy either way.
    # A large one is narrowed here, at a 64-byte boundary: that copy is what JAX then uses.
    imported: list[np.ndarray] = []
    from_dlpack = jax.dlpack.from_dlpack

    def keeping(array: np.ndarray) -> Any:
        imported.append(array)
        return from_dlpack(array)

    monkeypatch.setattr(jax.dlpack, "from_dlpack", keeping)
    leaves = [
        np.resize(np.array([2**40 + 5, -(2**35) - 1, 7, 2**31], np.int64), rows),
        np.linspace(-3, 3, rows * 2).reshape(rows, 2),
        np.resize(np.array([2**63 + 1, 3], np.uint64), rows),
    ]
    got = list(fj.device_put(leaves, prefetch=0))
    for leaf, out in zip(leaves, got):
        want = jax.device_put(leaf)
        assert out.dtype == want.dtype == jax.dtypes.canonicalize_dtype(leaf.dtype)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    if rows < fj.NARROW_MIN_BYTES // 8:
        assert imported == []
    else:
        assert [a.dtype for a in imported] == [np.int32, np.float32, np.uint32]
        assert [pointer(out) for out in got] == [a.ctypes.data for a in imported]
    frozen_int64 = frozen(np.arange(4, dtype=np.int64))
    (out,) = fj.device_put([frozen_int64], prefetch=0)
    assert out.dtype == np.int32 and np.asarray(out).tolist() == [0, 1, 2, 3]


def test_writable_arrays_are_imported_through_dlpack_and_others_through_device_put(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DLPack's import keeps the GIL, where device_put lets it go and waits to get it back
    behind the pipeline's threads; DLPack cannot export a read-only array."""
    calls: list[str] = []

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(jax.dlpack, "from_dlpack", spy("dlpack", jax.dlpack.from_dlpack))
    monkeypatch.setattr(jax, "device_put", spy("device_put", jax.device_put))
    writable = aligned(IMAGES.astype(np.float32))
    read_only = frozen(aligned(IMAGES.astype(np.float32)))
    gapped = writable[:, ::2]
    for a, got in zip(
        [writable, read_only, gapped], fj.device_put([writable, read_only, gapped], prefetch=0)
    ):
        np.testing.assert_array_equal(np.asarray(got), a)
        assert got.devices() == {jax.devices()[0]}
    assert pointer(got) != gapped.ctypes.data
    assert calls == ["dlpack", "device_put", "device_put"]


def test_batches_are_stacked_where_they_can_be_shared() -> None:
    ds = fl.Dataset.range(12).map(lambda i: np.full((8, 8, 3), i, np.float32)).batch(4)
    with ds.iterator() as it:
        batches = list(it)
    assert all(b.ctypes.data % 64 == 0 for b in batches)
    for b, got in zip(batches, fj.device_put(batches, prefetch=0)):
        assert pointer(got) == b.ctypes.data
        np.testing.assert_array_equal(np.asarray(got), b)


def test_a_shared_batch_lives_as_long_as_its_jax_array() -> None:
    # What makes sharing safe: the memory of a batch (a worker's shared memory included) is
    # reused only once nothing refers to it, and JAX refers to it while the jax.Array lives.
    batch = aligned(np.arange(1024, dtype=np.float32))
    freed: list[bool] = []
    weakref.finalize(batch.base, freed.append, True)
    (got,) = fj.device_put([batch], prefetch=0)
    assert pointer(got) == batch.ctypes.data
    del batch
    gc.collect()
    assert not freed
    np.testing.assert_array_equal(np.asarray(got), np.arange(1024))
    del got
    gc.collect()
    assert freed


@pytest.mark.parametrize("writable", [True, False])  # imported through DLPack, or not
def test_donating_a_shared_batch_does_not_write_into_it(writable: bool) -> None:
    batch = aligned(np.ones((64, 1024), np.float32))
    if not writable:
        batch = frozen(batch)
    (got,) = fj.device_put([batch], prefetch=0)
    assert pointer(got) == batch.ctypes.data
    out = jax.jit(lambda x: x * 3 + 1, donate_argnums=0)(got)
    np.testing.assert_array_equal(np.asarray(out), 4)
    np.testing.assert_array_equal(batch, 1)


@pytest.mark.timeout(180)
def test_batches_from_process_workers_stay_right_after_the_pipeline_moves_on() -> None:
    assert_worker_batches_stay_right(lambda batches: fj.device_put(batches), pointer)


def test_bad_prefetch() -> None:
    with pytest.raises(ValueError, match="prefetch"):
        fj.device_put(fl.Dataset.range(2), prefetch=-3)


SHARDED = """
import json
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import feedline as fl, feedline.jax as fj

assert jax.config.jax_enable_x64
mesh = Mesh(np.array(jax.devices()), ("batch",))
sharding = NamedSharding(mesh, PartitionSpec("batch"))
columns = {"id": np.arange(16), "x": np.ones((16, 3), np.float32), "ok": np.ones(16, bool)}
ds = fl.Dataset.from_tensor_slices(columns).batch(4, drop_remainder=True)
out = []
with fj.device_put(ds, sharding=sharding) as it:
    for batch in it:
        out.append({
            "devices": len(jax.devices()),
            "dtypes": {k: str(v.dtype) for k, v in batch.items()},
            "ids": np.asarray(batch["id"]).tolist(),
            "shards": [[d.id, np.asarray(s.data).tolist()]
                       for s in batch["id"].addressable_shards for d in [s.device]],
            "sharding": batch["id"].sharding == sharding,
        })
print(json.dumps(out))
"""


@pytest.mark.timeout(180)
def test_a_named_sharding_over_two_devices_from_the_local_batch() -> None:
    env = {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
    }
    (batches,) = run_script(SHARDED, env=env)
    assert len(batches) == 4
    for i, b in enumerate(batches):
        assert b["devices"] == 2 and b["sharding"]
        assert b["dtypes"] == {"id": "int64", "x": "float32", "ok": "bool"}
        assert b["ids"] == list(range(4 * i, 4 * i + 4))
        # Rows split over the two devices: two each.
        assert sorted(s for _, s in b["shards"]) == [b["ids"][:2], b["ids"][2:]]


PLACED = """
import json
import numpy as np
import jax
import feedline as fl, feedline.jax as fj

ds = fl.Dataset.range(8).map(lambda i: np.full((4,), i, np.float32)).batch(2)
out = {}
for name, target in [("default", None), ("first", jax.devices()[0]), ("second", jax.devices()[1])]:
    with fj.device_put(ds, sharding=target) as it:
        batches = list(it)
    out[name] = {
        "devices": sorted({d.id for b in batches for d in b.devices()}),
        "committed": sorted({b.committed for b in batches}),
        "values": [np.asarray(b)[:, 0].tolist() for b in batches],
    }
print(json.dumps(out))
"""


@pytest.mark.timeout(180)
def test_with_several_devices_arrays_go_where_device_put_puts_them() -> None:
    # Only the first CPU device takes DLPack's import; with several, the default is left to
    # device_put (an uncommitted array, which jit may place anywhere).
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    (placed,) = run_script(PLACED, env=env)
    values = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    assert placed["default"] == {"devices": [0], "committed": [False], "values": values}
    assert placed["first"] == {"devices": [0], "committed": [True], "values": values}
    assert placed["second"] == {"devices": [1], "committed": [True], "values": values}


@pytest.mark.timeout(240)
def test_a_model_learns_from_a_pipeline() -> None:
    jnp = jax.numpy
    ds = regression([2.0, -1.0, 0.5], -1.0, rows=512, epochs=10)

    def loss_fn(params: Any, features: Any, labels: Any) -> Any:
        w, b = params
        return jnp.mean((features @ w + b - labels) ** 2)

    @jax.jit
    def step(params: Any, features: Any, labels: Any) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params, features, labels)
        return jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads), loss

    params = (jnp.zeros((3, 1)), jnp.zeros(()))
    steps = 0
    with fj.device_put(ds, prefetch=fl.AUTOTUNE) as batches:
        for features, labels in batches:
            params, loss = step(params, features, labels)
            steps += 1
    assert steps == 320
    assert float(loss) < 1e-3


def test_a_missing_jax_names_the_extra() -> None:
    (message,) = run_script(
        "import sys, json; sys.modules['jax'] = None\n"
        "import feedline as fl, feedline.jax as fj\n"
        "try:\n"
        "    fj.device_put(fl.Dataset.range(2))\n"
        "except ImportError as e:\n"
        "    print(json.dumps(str(e)))\n"
    )
    assert "pip install 'feedline[jax]'" in message
