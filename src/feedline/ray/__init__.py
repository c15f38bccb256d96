"""Pipeline shards on Ray actors: ``ds.apply(feedline.ray.distribute(...))``.

Ray itself is imported only when a pass starts (``pip install 'feedline[ray]'``).

- ``ops.py``: the ``distribute`` op and transformation.
- ``shards.py``: the virtual shards the pipeline before it splits into.
- ``actor.py``: what runs in an actor; ``workers.py``: the actors of a pass.
- ``stage.py``, ``buffers.py``: the caller's side: round robin, state, faults, knobs.
- ``tuning.py``: the rule for the number of actors; ``cluster.py``: starting Ray safely.
- ``data.py``: Ray Data interop.
"""

from feedline.ray.data import from_ray_dataset, to_ray_dataset
from feedline.ray.observe import actors, history
from feedline.ray.ops import distribute

__all__ = ["actors", "distribute", "from_ray_dataset", "history", "to_ray_dataset"]
