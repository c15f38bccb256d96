"""feedline: tf.data-style input pipelines in pure Python and numpy.

Port a tf.data pipeline by changing the import::

    import feedline as fl
    ds = fl.Dataset.range(100).map(lambda x: x * 2, num_parallel_calls=fl.AUTOTUNE).batch(10)
"""

from feedline import distribute, experimental
from feedline.dataset import AUTOTUNE, INFINITE_CARDINALITY, UNKNOWN_CARDINALITY, Dataset
from feedline.errors import DataLossError, InvalidStateError, StageCrashedError, StageError
from feedline.io.files import TextLineDataset
from feedline.io.fixed_length import FixedLengthRecordDataset
from feedline.io.tfrecord import TFRecordDataset
from feedline.ops.cache import CacheFileError
from feedline.ops.in_memory import DatasetSpec
from feedline.options import AutotuneOptions, Options
from feedline.pipeline import DatasetIterator
from feedline.structure import TensorSpec

__all__ = [
    "AUTOTUNE",
    "INFINITE_CARDINALITY",
    "UNKNOWN_CARDINALITY",
    "AutotuneOptions",
    "CacheFileError",
    "DataLossError",
    "Dataset",
    "DatasetIterator",
    "DatasetSpec",
    "FixedLengthRecordDataset",
    "InvalidStateError",
    "Options",
    "StageCrashedError",
    "StageError",
    "TFRecordDataset",
    "TensorSpec",
    "TextLineDataset",
    "distribute",
    "experimental",
]
__version__ = "0.1.0"
