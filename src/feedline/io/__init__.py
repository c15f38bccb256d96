"""Reading and writing data files.

- ``fs.py``: opening local paths and fsspec URLs; the lazy import of optional extras.
- ``paths.py``: file-name matching with tf.data's rules, for ``Dataset.list_files``.
- ``files.py``: ``TextLineDataset``.
- ``text.py``: text files, one element per line.
- ``tfrecord.py``: ``TFRecordDataset`` and ``TFRecordWriter``; ``crc32c.py`` their checksum
  (google-crc32c, or a numpy fallback); ``compressed.py`` GZIP/ZLIB streams a block at a time.
- ``example.py``: ``tf.train.Example`` encoding and parsing; ``example_fast.py`` the numpy
  path for large batches.
- ``csv.py``: ``CsvDataset`` and ``make_csv_dataset``; ``csv_iterator.py`` the op,
  ``csv_records.py`` splitting records and converting fields as tf.data does.
- ``parquet.py``: ``ParquetDataset``.
- ``tar.py``: WebDataset ``.tar`` shards: ``TarShardDataset`` and ``TarShardWriter``.
- ``images.py``: ``decode_image``.
- ``fixed_length.py``: ``FixedLengthRecordDataset``.
"""

from __future__ import annotations

import importlib
from typing import Any

from feedline.errors import DataLossError

# Each reader's module is imported on first use, so `import feedline` stays cheap.
_HOMES = {
    "TFRecordDataset": "tfrecord",
    "TFRecordWriter": "tfrecord",
    "FixedLenFeature": "example",
    "VarLenFeature": "example",
    "parse_single_example": "example",
    "parse_example": "example",
    "encode_example": "example",
    "CsvDataset": "csv",
    "make_csv_dataset": "csv",
    "ParquetDataset": "parquet",
    "TarShardDataset": "tar",
    "TarShardWriter": "tar",
    "decode_image": "images",
    "FixedLengthRecordDataset": "fixed_length",
}

__all__ = ["DataLossError", *_HOMES]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'feedline.io' has no attribute {name!r}")
    return getattr(importlib.import_module(f"feedline.io.{home}"), name)
