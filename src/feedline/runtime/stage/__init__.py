"""The parts of ``AsyncStage`` (``runtime/parallel.py``), one module per job.

- ``core.py``: ``Chunk``, the fields every part shares, and the locking rules they follow.
- ``sizing.py``: ``ChunkSizer``, chunk sizes and buffer limits learnt from the work.
- ``start.py``: ``choose_start``, the parallelism a tuned stage starts with.
- ``positions.py``: the stage's state (where its input resumes; journals of states given out).
- ``workers.py``: the workers' side: pull chunks from the input, transform them.
- ``consumer.py``: the consumer's side: deliver finished chunks in order.
"""
