"""Worker processes for ``executor="process"``.

Pure-Python per-element work holds the GIL, so threads cannot run it in parallel; processes
can. The stage keeps its worker *threads* (``runtime/parallel.py``): each becomes a dispatcher
that hands its chunk to a worker process and waits for the result, so ordering, iterator state,
errors at their positions and the ``parallelism`` knob work exactly as on threads.

- ``spawn.py``: starting workers (forkserver, ``__main__`` kept out) and pickling what they run.
- ``shm.py``: messages between the two sides, large buffers in shared memory (reply segments).
- ``worker.py``: what runs in a worker: its loop, the chunk service, its heap, its errors.
- ``pool.py``: the parent's side: worker processes, their pools, one pool per op in a run.
- ``executor.py``: what a map stage sees: its pool and executor, its moves threads <-> processes.
- ``remote.py``: ``interleave(executor="process")``: slots whose datasets live in workers.
"""

from feedline.runtime.process.executor import (
    ExecutorSwitch,
    ProcessExecutor,
    ProcessPool,
    process_executor,
)
from feedline.runtime.process.pool import WorkerPool, _pools, shared_pool
from feedline.runtime.process.shm import (
    MAX_FREE_REPLY_SEGMENTS,
    SHM_MIN_BYTES,
    ReplyArena,
    ReplySegments,
)
from feedline.runtime.process.spawn import (
    _main_not_reimported,
    require_cloudpickle,
    start_forkserver_soon,
)
from feedline.runtime.process.worker import (
    _M_TRIM_THRESHOLD,
    HEAP_KEEP_MAX,
    Rows,
    WorkerHeap,
    as_rows,
)

__all__ = [
    "HEAP_KEEP_MAX",
    "MAX_FREE_REPLY_SEGMENTS",
    "SHM_MIN_BYTES",
    "_M_TRIM_THRESHOLD",
    "ExecutorSwitch",
    "ProcessExecutor",
    "ProcessPool",
    "ReplyArena",
    "ReplySegments",
    "Rows",
    "WorkerHeap",
    "WorkerPool",
    "_main_not_reimported",
    "_pools",
    "as_rows",
    "process_executor",
    "require_cloudpickle",
    "shared_pool",
    "start_forkserver_soon",
]
