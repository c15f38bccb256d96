"""How big a stage's chunks are, and how much its buffer may hold: learnt from the work.

``ChunkSizer`` holds the estimates (seconds and bytes per element, the chunk size they give)
and the arithmetic; the stage passes in what its knobs and executor say at the moment of
asking, so the sizer knows nothing of knobs, locks or threads.
"""

from __future__ import annotations

# A chunk is sized to take about this long to transform: long enough that a hand-off between
# threads is a small part of it, short enough to balance workers. A hand-off costs 50-60 us of
# CPU (wake-ups, the GIL changing hands; measured with two workers on 2 cores): at 2 ms chunks,
# Pillow decoding ran 12% below a plain thread pool; at 10 ms, level with it.
TARGET_CHUNK_SECONDS = 0.010
MAX_CHUNK = 4096
# Made inline, a chunk costs no hand-off, only the booking of a chunk (a few us): it is kept
# to about this long, so that work whose cost jumps (a map that starts waiting on I/O) holds
# the consumer up for a few of them at most before the sizer learns the new cost.
TARGET_INLINE_SECONDS = 0.001
# A worker thread's chunk, at most: a chunk sized on cheap work (5 us an element: 2,000 in
# 10 ms) that turns slow (2 ms an element) delivers nothing for seconds, as its first element
# waits for its last; 256 such elements take 0.5 s once, and a chunk of cheap work on threads
# still pays its 50-60 us hand-off over 1.3 ms or more.
MAX_THREAD_CHUNK = 256


class ChunkSizer:
    """``auto_buffer``: the buffer follows the chunk size and the workers (the user gave no
    ``buffer_size``)."""

    __slots__ = (
        "auto_buffer",
        "block_size",
        "bytes_per_element",
        "chunk_size",
        "last_seconds_per_element",
        "seconds_per_element",
    )

    def __init__(self, auto_buffer: bool) -> None:
        self.auto_buffer = auto_buffer
        self.chunk_size = 1
        self.seconds_per_element = 0.0  # an average over the chunks so far
        self.last_seconds_per_element = 0.0  # the last chunk's
        self.bytes_per_element = 0.0
        # Wanted by the consumer (a batch) as stacked blocks of this many: chunks run on worker
        # processes then end at multiples of it, so that their results, stacked there, hold
        # whole batches.
        self.block_size = 0

    def whole_blocks(self, size: int, on_processes: bool) -> int:
        """``size`` rounded up to whole blocks, when chunks on worker processes are cut at
        block boundaries (see ``block_size``): what such a chunk then holds."""
        block = self.block_size
        if not block or not on_processes:
            return size
        return -(-size // block) * block

    def buffer_limit(self, parallelism: int, buffer_size: int, on_processes: bool) -> int:
        """Elements that may be taken from the input and not yet delivered."""
        if self.auto_buffer:
            whole = self.whole_blocks(self.chunk_size, on_processes)
            if parallelism > 0 and not on_processes:
                # Two of the chunks the workers take (``next_size``), not of the size learnt:
                # 45 threads on cheap work held 190k elements in 880 open chunks, and every
                # pull of the next stage reads the state of them all.
                whole = min(whole, MAX_THREAD_CHUNK)
            return max(2, 2 * max(1, parallelism) * whole)
        return buffer_size

    def next_size(
        self, parallelism: int, buffer_size: int, max_buffer_bytes: int, on_processes: bool
    ) -> int:
        """The size of the next chunk a worker (or, with ``parallelism`` 0, the consumer)
        takes."""
        size = self.whole_blocks(self.chunk_size, on_processes)
        if parallelism == 0 and self.seconds_per_element > 0:
            size = min(size, max(1, int(TARGET_INLINE_SECONDS / self.seconds_per_element)))
        elif parallelism > 0 and not on_processes:
            size = min(size, MAX_THREAD_CHUNK)
        if not self.auto_buffer:
            # Two chunks per worker fit in the user's buffer, so a worker refills while the
            # consumer drains (with one, they would take turns).
            room = buffer_size // (2 * max(1, parallelism))
            size = min(size, max(1, room))
        if self.bytes_per_element:
            # A chunk in flight is outside the byte check at admission: keep all workers'
            # chunks together within half the limit, so a stage holds at most 1.5x of it.
            workers = 2 * max(1, parallelism)
            size = min(size, max(1, int(max_buffer_bytes / (workers * self.bytes_per_element))))
        return size

    def learn_cost(self, elements: int, seconds: float, target: float | None) -> None:
        """``elements`` took ``seconds``; ``target``: the chunk duration the executor wants
        (None: the stage's own threads, ``TARGET_CHUNK_SECONDS``)."""
        if elements <= 0:
            return
        per = self.last_seconds_per_element = seconds / elements
        self.seconds_per_element = (
            per if self.seconds_per_element == 0 else 0.8 * self.seconds_per_element + 0.2 * per
        )
        ideal = (TARGET_CHUNK_SECONDS if target is None else target) / max(
            self.seconds_per_element, 1e-9
        )
        # Grow at most x2 per chunk, so one cheap outlier cannot make a huge chunk.
        self.chunk_size = int(max(1, min(MAX_CHUNK, ideal, self.chunk_size * 2)))

    def learn_bytes(self, per_element: int) -> None:
        """A chunk's elements hold ``per_element`` bytes each: the estimate follows a rise at
        once and a fall slowly, as a buffer sized on a low one could overflow."""
        self.bytes_per_element = max(self.bytes_per_element * 0.9, float(per_element))
