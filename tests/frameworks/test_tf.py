"""``feedline.tf.to_tf_dataset``: a tf.data.Dataset of the same elements and signature, which
Keras trains on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import feedline as fl
from tests.frameworks.helpers import regression, run_script
from tests.helpers import assert_elements_equal

tf = pytest.importorskip("tensorflow")
ftf = pytest.importorskip("feedline.tf")


def mixed(n: int = 10) -> fl.Dataset:
    return fl.Dataset.from_tensor_slices(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": np.arange(n * 2, dtype=np.float32).reshape(n, 2),
            "pair": (np.arange(n) % 2 == 0, np.array([b"t%d" % i for i in range(n)], object)),
        }
    )


def numpy_of(element: Any) -> Any:
    """A tf element as feedline's numpy one (strings as bytes / object arrays of bytes)."""
    return tf.nest.map_structure(lambda t: t.numpy(), element)


@pytest.mark.parametrize("batch", [None, 3])
def test_same_elements_and_signature(batch: int | None) -> None:
    ds = mixed() if batch is None else mixed().batch(batch)
    out = ftf.to_tf_dataset(ds)
    want = list(ds)
    got = [numpy_of(e) for e in out]
    assert_elements_equal(got, want)
    spec = out.element_spec
    assert spec["id"].dtype == tf.int64 and spec["x"].dtype == tf.float32
    assert spec["pair"][0].dtype == tf.bool and spec["pair"][1].dtype == tf.string
    assert spec["x"].shape.as_list() == ([2] if batch is None else [None, 2])
    assert int(out.cardinality()) == ds.cardinality()


def test_each_iteration_is_a_new_pass() -> None:
    out = ftf.to_tf_dataset(fl.Dataset.range(4).shuffle(4, seed=2))
    first, second = [[int(x) for x in out] for _ in range(2)]
    assert sorted(first) == sorted(second) == [0, 1, 2, 3]
    assert first != second  # reshuffled each pass, as tf.data's shuffle


@pytest.mark.timeout(300)
def test_keras_fits_a_model_on_a_pipeline() -> None:
    keras = tf.keras
    ds = regression([1.0, 2.0, -3.0], 0.5, rows=256, epochs=1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = model.fit(ftf.to_tf_dataset(ds), epochs=20, verbose=0, shuffle=False)  # 320 steps
    assert history.history["loss"][-1] < 1e-3


def test_a_missing_tensorflow_names_the_extra() -> None:
    (message,) = run_script(
        "import sys, json; sys.modules['tensorflow'] = None\n"
        "import feedline as fl, feedline.tf as ftf\n"
        "try:\n"
        "    ftf.to_tf_dataset(fl.Dataset.range(2))\n"
        "except ImportError as e:\n"
        "    print(json.dumps(str(e)))\n"
    )
    assert "pip install 'feedline[tf]'" in message
