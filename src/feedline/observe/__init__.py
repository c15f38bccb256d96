"""Seeing what a pipeline does: stats, the bottleneck, AUTOTUNE's decisions.

- ``view.py``: ``PassView``, the public view of a pass every observer reads.
- ``stats.py``: ``it.stats()`` and ``it.report()``: per-stage numbers and the bottleneck.
- ``timeline.py``: a time series of a running pipeline, sampled on a thread.
- ``live.py``: the live view of a running pipeline.
- ``plot.py``: ``it.plot(path)``, a PNG of the timeline.
"""
