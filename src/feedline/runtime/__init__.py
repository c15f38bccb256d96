"""How a dataset description runs: stage iterators, their states, the asynchronous stage.

- ``iterator.py``: ``StageIterator``, the contract of every op's iterator; ``InputCursor``.
- ``states.py``: reading a saved state as untrusted input (``InvalidStateError`` otherwise).
- ``context.py``: what every iterator of one pipeline run shares.
- ``stage_config.py``: ``StageConfig``, how an op asks an ``AsyncStage`` to run.
- ``parallel.py``: ``AsyncStage``, worker threads running a chunk transform ahead; built
  from ``stage/`` (shared core and locking rules, sizing, the start choice, the workers' and
  the consumer's sides, positions and states; its own map inside).
- ``chunks.py``: what chunks are made of, shared by the stage and its executors.
- ``replay.py``: a finishing-order stage's delivery order, recorded in states and replayed.
- ``tunable.py``: the knobs and metrics a stage shows the tuner.
- ``timeouts.py``: a map's time limit per call.
- ``machine.py``: readings of this machine (cores, idle CPU, memory).
- ``process/``: worker processes for ``executor="process"`` (its own map inside).
"""
