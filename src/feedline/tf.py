"""TensorFlow: a feedline pipeline as a ``tf.data.Dataset``, for ``model.fit`` and Keras.

TensorFlow is the ``feedline[tf]`` extra, imported on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

from feedline.dataset import Dataset
from feedline.io.fs import require
from feedline.structure import STRING_DTYPE, TensorSpec, map_structure

__all__ = ["to_tf_dataset"]


def _tf() -> ModuleType:
    return require("tensorflow", "tf", "feedline.tf")


def tf_signature(ds: Dataset) -> Any:
    """``ds.element_spec`` as ``tf.TensorSpec``\\ s (strings: ``tf.string``)."""
    tf = _tf()

    def spec(s: TensorSpec) -> Any:
        dtype = tf.string if s.dtype == STRING_DTYPE else tf.as_dtype(s.dtype)
        return tf.TensorSpec(tf.TensorShape(s.shape), dtype)

    return map_structure(spec, ds.element_spec)


def to_tf_dataset(ds: Dataset) -> Any:
    """A ``tf.data.Dataset`` of ``ds``'s elements, with the signature of ``ds.element_spec``;
    each of its iterations (each epoch of ``model.fit``) is a new pass over ``ds``, run by
    feedline (its AUTOTUNE included) in TensorFlow's generator thread. Counterpart:
    ``tf.data.Dataset.from_generator`` with an ``output_signature``; its cardinality is
    ``ds``'s, so Keras knows the number of steps where ``ds`` does."""
    if not isinstance(ds, Dataset):
        raise TypeError(f"to_tf_dataset takes a feedline Dataset, got {type(ds).__name__}")
    tf = _tf()

    def elements() -> Iterator[Any]:
        # Closed when TensorFlow finishes (or drops) the generator: no thread outlives it.
        with ds.iterator() as it:
            yield from it

    out = tf.data.Dataset.from_generator(elements, output_signature=tf_signature(ds))
    n = ds.cardinality()
    if n >= 0:
        out = out.apply(tf.data.experimental.assert_cardinality(n))
    return out
