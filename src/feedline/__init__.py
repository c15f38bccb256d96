"""feedline: tf.data-style input pipelines in pure Python and numpy.

Port a tf.data pipeline by changing the import::

    import feedline as fl
    ds = fl.Dataset.range(100).map(lambda x: x * 2, num_parallel_calls=fl.AUTOTUNE).batch(10)
"""

from feedline import experimental
from feedline.dataset import AUTOTUNE, INFINITE_CARDINALITY, UNKNOWN_CARDINALITY, Dataset
from feedline.errors import DataLossError, InvalidStateError, StageCrashedError, StageError
from feedline.io.files import TextLineDataset
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
    "InvalidStateError",
    "Options",
    "StageCrashedError",
    "StageError",
    "TensorSpec",
    "TextLineDataset",
    "experimental",
]
__version__ = "0.1.0"
