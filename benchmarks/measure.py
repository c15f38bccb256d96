"""Measurement shared by every system: the consumer loop, process-tree sampling, the machine.

The consumer loop runs inside the benchmarked process; the sampler runs in the driver, outside
it, so sampling never competes with the pipeline for that process's GIL.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

WARMUP_FRACTION = 0.10
# A time-capped run still gets this many batches, so it has a steady window to measure.
MIN_BATCHES = 12
SAMPLE_INTERVAL_S = 0.050
MIB = 1024 * 1024


def batch_len(batch: Any) -> int:
    """Rows in a batch: numpy arrays, torch tensors and TF tensors all have ``shape[0]``."""
    while isinstance(batch, tuple | list | dict):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(batch.shape[0])


@dataclass
class Timing:
    """What the consumer saw. Rates are elements per second.

    ``elements_per_s`` is the steady-state rate: the least-squares slope of elements received
    against time, over the batches after the first 10% (warm-up). A slope rather than
    (elements / time between two batches) because batches from parallel workers arrive in
    bursts: a difference between two arrival times lands on a burst edge and can be off by a
    whole burst, while the slope through the staircase is not biased.
    ``end_to_end_elements_per_s`` counts every element from iterator creation.
    ``stall_fraction`` is the time blocked in ``next()`` over the steady window's wall time.
    ``time_capped``: the run stopped at its time budget before the last element (which also
    keeps a buffer draining at the end of the data out of the window).
    """

    elements: int
    batches: int
    warmup_batches: int
    elements_per_s: float
    end_to_end_elements_per_s: float
    time_to_first_batch_s: float
    wall_s: float
    stall_fraction: float
    time_capped: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (NaN when xs do not vary)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var <= 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def consume(
    open_iterator: Callable[[], Iterator[Any]],
    batches: int,
    consumer_sleep_s: float,
    max_seconds: float = math.inf,
    min_batches: int = MIN_BATCHES,
) -> tuple[Timing, Iterator[Any]]:
    """Pull up to ``batches`` batches, sleeping ``consumer_sleep_s`` after each (the training
    step); stop early once ``max_seconds`` have passed and ``min_batches`` have arrived.

    Returns the timing and the still-open iterator: the caller records the figures before
    tearing it down, so a teardown that hangs cannot lose them.
    """
    start = time.perf_counter()
    it = open_iterator()
    arrivals: list[float] = []
    blocked: list[float] = []
    sizes: list[int] = []
    capped = False
    for n in range(batches):
        before = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        after = time.perf_counter()
        arrivals.append(after)
        blocked.append(after - before)
        sizes.append(batch_len(batch))
        del batch  # so the consumer holds no batch while it "trains"
        if consumer_sleep_s:
            time.sleep(consumer_sleep_s)
        if n + 1 >= min_batches and n + 1 < batches and after - start > max_seconds:
            capped = True
            break
    if not arrivals:
        raise RuntimeError("the pipeline produced no batch")
    warmup = max(1, int(len(arrivals) * WARMUP_FRACTION)) if len(arrivals) > 2 else 0
    # The steady window starts at the last warm-up batch (or at creation, with no warm-up).
    origin = arrivals[warmup - 1] if warmup else start
    times = [origin, *arrivals[warmup:]]
    received = [0]
    for size in sizes[warmup:]:
        received.append(received[-1] + size)
    window = arrivals[-1] - origin
    total = sum(sizes)
    timing = Timing(
        elements=total,
        batches=len(arrivals),
        warmup_batches=warmup,
        elements_per_s=slope(times, [float(r) for r in received]),
        end_to_end_elements_per_s=total / (arrivals[-1] - start),
        time_to_first_batch_s=arrivals[0] - start,
        wall_s=arrivals[-1] - start,
        stall_fraction=sum(blocked[warmup:]) / window if window > 0 else float("nan"),
        time_capped=capped,
    )
    return timing, it


def close_iterator(it: Iterator[Any]) -> None:
    """Release an iterator's threads and worker processes, whichever way the system allows."""
    close = getattr(it, "close", None)
    if callable(close):
        close()
    del it
    gc.collect()


def time_per_element(fn: Callable[[Any], Any], indices: range, budget_s: float) -> dict[str, float]:
    """Single-threaded wall and CPU seconds per call of ``fn``, over ``indices`` or until
    ``budget_s`` runs out (after a few warm-up calls that load data and fill caches)."""
    for i in indices[:3]:
        fn(i)
    calls = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in indices:
        fn(i)
        calls += 1
        if time.perf_counter() - start > budget_s and calls >= 20:
            break
    return {
        "calls": calls,
        "wall_s_per_element": (time.perf_counter() - start) / calls,
        "cpu_s_per_element": (time.process_time() - cpu_start) / calls,
    }


class TreeSampler:
    """Samples a process and all its descendants every 50 ms: summed RSS (its peak since the
    last ``reset_peak``) and CPU seconds (user + system).

    CPU is summed over every process ever seen, at its last sample, so workers that exit
    still count (up to the last 50 ms of their life). Summed RSS counts pages that forked
    workers share with their parent once per process: ``pss_mib`` gives the fair share view
    at a point in time, at a cost too high for every sample.
    """

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)
        self._interval = interval_s
        self._cpu: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._thread.start()

    def _processes(self) -> list[Any]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return []

    def sample(self) -> tuple[int, float]:
        """Take a sample now: (summed RSS in bytes, total CPU seconds so far)."""
        gone = (self._psutil.NoSuchProcess, self._psutil.AccessDenied)
        with self._lock:
            rss = 0
            for proc in self._processes():
                try:
                    with proc.oneshot():
                        rss += proc.memory_info().rss
                        cpu = proc.cpu_times()
                        self._cpu[(proc.pid, proc.create_time())] = cpu.user + cpu.system
                except gone:
                    continue
            self._peak = max(self._peak, rss)
            return rss, sum(self._cpu.values())

    def reset_peak(self, value: int) -> None:
        with self._lock:
            self._peak = value

    @property
    def peak(self) -> int:
        with self._lock:
            return self._peak

    def pss_mib(self) -> float | None:
        """Proportional set size of the tree (shared pages split between sharers), or None."""
        total = 0
        for proc in self._processes():
            try:
                total += proc.memory_full_info().pss
            except (self._psutil.Error, AttributeError):
                return None
        return total / MIB

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


PACKAGES = ("feedline", "numpy", "tensorflow-cpu", "torch", "grain", "pillow", "psutil")


def describe_machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, Python and package versions: stored with every record."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cores": usable_cores(),
        "ram_gib": round(ram, 1),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
