"""tf.data (tensorflow-cpu) in the two forms its users write.

- ``numpy_function``: the shared numpy/Python element function wrapped in
  ``tf.numpy_function``, as a user with numpy code would port it.
- ``tf_ops``: the same work written with TensorFlow ops, where such ops exist. Equivalent work
  but not bit-identical output (TF's own crop offsets and string hash).

Both run at AUTOTUNE (the ``tf.data`` records); a hand-set grid gives ``tf.data-oracle``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from benchmarks import workloads as wl
from benchmarks.systems import AUTOTUNE, OpenIterator, RunSpec, tuned_specs
from benchmarks.workloads import Workload

NAME = "tf.data"
REQUIRES = ("tensorflow",)

# (source dataset, map function or None) for a workload in one form.
Form = Callable[[Any, Workload, int, str], tuple[Any, Any]]


def specs(workload: Workload, mode: str) -> list[RunSpec]:
    forms: list[str | None] = ["native"]
    if workload.make_fn is not None:
        forms = ["numpy_function"]
        if workload.name in TF_OPS:
            forms.append("tf_ops")
    return tuned_specs(workload, mode, "tf.data", NAME, forms)


def build(workload: Workload, config: dict[str, Any], elements: int, data_dir: str) -> OpenIterator:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    def knob(value: Any) -> Any:
        return tf.data.AUTOTUNE if value == AUTOTUNE else (value or None)

    form = TF_OPS[workload.name] if config["form"] == "tf_ops" else _numpy_function
    ds, fn = form(tf, workload, elements, data_dir)
    if fn is not None:
        ds = ds.map(fn, num_parallel_calls=knob(config["num_parallel_calls"]))
    ds = ds.batch(workload.batch_size).prefetch(knob(config["prefetch"]))
    return ds.__iter__


def _indices(tf: Any, workload: Workload, elements: int) -> Any:
    stop, repeat = workload.source(elements)
    ds = tf.data.Dataset.range(stop)
    return ds.repeat() if repeat else ds


def _numpy_function(tf: Any, workload: Workload, elements: int, data_dir: str) -> tuple[Any, Any]:
    fn = workload.element_fn(data_dir)
    if fn is None:
        return _indices(tf, workload, elements), None
    dtype = tf.as_dtype(workload.out_dtype)

    def wrapped(i: Any) -> Any:
        out = tf.numpy_function(fn, [i], dtype, stateful=False)
        out.set_shape(workload.out_shape)
        return out

    return _indices(tf, workload, elements), wrapped


def _overhead_ops(tf: Any, workload: Workload, elements: int, data_dir: str) -> tuple[Any, Any]:
    return _indices(tf, workload, elements), lambda x: x + 1


def _normalise(tf: Any, x: Any) -> Any:
    x = tf.cast(x, tf.float32) * (1 / 255)
    return (x - wl.MEAN) / wl.STD


def _numpy_cpu_ops(tf: Any, workload: Workload, elements: int, data_dir: str) -> tuple[Any, Any]:
    # The source images come from numpy's default_rng(i), which TF cannot reproduce, so only
    # the source is a numpy_function; the rounds of work are TF ops.
    def augment(i: Any) -> Any:
        image = tf.numpy_function(wl.numpy_source_image, [i], tf.uint8, stateful=False)
        image.set_shape(wl.IMAGE_SHAPE)
        out = image
        for _ in range(wl.NUMPY_ROUNDS):
            out = tf.reverse(_normalise(tf, image), axis=[1])
        return out

    return _indices(tf, workload, elements), augment


def _python_cpu_ops(tf: Any, workload: Workload, elements: int, data_dir: str) -> tuple[Any, Any]:
    lines, vocab = wl.load_text(data_dir)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            list(vocab), tf.constant(list(vocab.values()), tf.int64)
        ),
        default_value=-1,
    )

    def tokenize(line: Any) -> Any:
        words = tf.strings.split(tf.strings.lower(line))
        words = tf.strings.regex_replace(words, "[^[:alnum:]]", "")
        ids = table.lookup(words)
        unknown = wl.VOCAB_SIZE + 1 + tf.strings.to_hash_bucket_fast(words, wl.OOV_BUCKETS)
        ids = tf.where(ids < 0, unknown, ids)[: wl.SEQ_LEN]
        ids = tf.pad(ids, [[0, wl.SEQ_LEN - tf.shape(ids)[0]]])
        return tf.ensure_shape(tf.cast(ids, tf.int32), [wl.SEQ_LEN])

    source = tf.data.Dataset.from_tensor_slices([lines[i % len(lines)] for i in range(elements)])
    return source, tokenize


def _image_ops(tf: Any, workload: Workload, elements: int, data_dir: str) -> tuple[Any, Any]:
    paths = [wl.image_path(data_dir, i) for i in range(elements)]

    def decode(i: Any, path: Any) -> Any:
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        seed = tf.stack([tf.constant(wl.SEED, tf.int64), i])
        crop = tf.image.stateless_random_crop(image, [wl.CROP, wl.CROP, 3], seed=seed)
        crop = tf.image.stateless_random_flip_left_right(crop, seed=seed)
        return _normalise(tf, crop)

    source = tf.data.Dataset.zip(
        tf.data.Dataset.range(elements), tf.data.Dataset.from_tensor_slices(paths)
    )
    return source, decode


TF_OPS: dict[str, Form] = {
    "overhead": _overhead_ops,
    "numpy_cpu": _numpy_cpu_ops,
    "python_cpu": _python_cpu_ops,
    "image": _image_ops,
}
