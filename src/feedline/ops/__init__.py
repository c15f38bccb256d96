"""The op nodes: each ``Dataset`` method adds one, and makes its iterator for a pass.

- ``base.py``: ``Op`` and ``UnaryOp`` (one input), ``UnaryIterator``, argument checks.
- ``sources.py``: range, from_tensors, from_tensor_slices, from_generator.
- ``mapping.py``: map and random_map (on an ``AsyncStage``), filter, take_while, ignore_errors.
- ``batching.py``: batch, unbatch, rebatch.
- ``padding.py``: padded_batch, with padding values of each component's dtype.
- ``slicing.py``: take, skip, shard, repeat, enumerate.
- ``combine.py``: zip and concatenate.
- ``interleave.py``: interleave (and so flat_map).
- ``choices.py``: the slot choices a finishing-order interleave records for its states.
- ``sampling.py``: Dataset.random, sample_from_datasets, choose_from_datasets.
- ``shuffle.py``: shuffle, a bounded random buffer seeded per pass.
- ``randomness.py``: seeds and pass numbering for the ops that draw random numbers.
- ``prefetch.py``: prefetch, the input run ahead into a bounded buffer.
- ``scan.py``: scan (and counter).
- ``windowing.py``: window, runs of consecutive elements as datasets.
- ``grouping.py``: group_by_window (and bucket_by_sequence_length), unique.
- ``in_memory.py``: small datasets of held elements, and held elements inside states.
- ``cache.py``: cache, one complete pass kept in memory or in a file.
- ``saving.py``: save and load, in feedline's own directory format.
- ``tf_snapshot.py``: load of the directories ``tf.data.Dataset.save`` writes.
- ``records.py``: the record codec, specs as JSON, element checks for feedline's files.
- ``tracing.py``: the spec of what a user function returns, found by running it, and the
  check of a stage's outputs against it.
"""
