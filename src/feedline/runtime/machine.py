"""Readings of this machine for this process: cores it may use (affinity, cgroup quota), idle
CPU time, available memory, the resident memory of a process, and what a hand-off of the GIL
costs (which sets the default thread budget). Used by the runtime (worker
processes' memory) and the tuner (its budgets) alike."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Iterable


def usable_cores() -> float:
    """Cores this process may run on: its CPU affinity, lowered by a cgroup CPU quota."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        cores = float(os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1.0, min(cores, quota)) if quota else cores


def cgroup_cpu_quota() -> float | None:
    """The cgroup (v2, else v1) CPU limit in cores, or None when there is none."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def idle_cpu_seconds() -> float | None:
    """Seconds the CPUs this process may run on have spent idle since boot (all of them
    together), or None where that cannot be read. Differences over a window tell free cores
    from cores other processes keep busy."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
        ticks = os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None
    # Fields after the name: user nice system idle iowait ...; iowait is idle too.
    idle = sum(int(fields[4]) + int(fields[5]) for fields in lines if fields[0] in cpus)
    return idle / ticks


def available_memory() -> int:
    """Bytes of memory available to new allocations (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30  # unknown platform: assume a small machine


def cpu_seconds_of(pids: Iterable[int]) -> float:
    """User and system CPU seconds used by those of processes ``pids`` still running."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:  # ended, or not ours to read
            continue
        total += times.user + times.system
    return total


def rss_of(pid: int | None = None) -> int:
    """Resident bytes of process ``pid`` (this one by default); 0 if it cannot be read."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


# A pass's worker threads, all stages together, default to as many as can hand the GIL round
# in two switch intervals (sys.getswitchinterval(), 5 ms). Around one interval's worth, a
# thread that wants the GIL starts to wait longer for the others' hand-offs than the
# interpreter lets one thread run, and more threads soon hide no more latency; but where
# that happens depends on the work (20 ms waits, 40 us hand-offs: 6.3k elements/s on 128
# threads, 9.4k on 192, 7.0k on 256, 7.4k on 512), and the tuner finds that knee itself. The
# budget is the ceiling that keeps it from thousands of threads. Within these bounds,
# whatever the reading.
SWITCH_INTERVALS = 2
THREAD_BUDGET_BOUNDS = (64, 1024)


@functools.cache
def gil_handoff_seconds() -> float:
    """What one hand-off of the GIL between two threads costs on this machine: the fastest of
    three short ping-pong readings (~1 ms each; other programs' load only slows one down)."""
    return min(_ping_pong(100) for _ in range(3))


def _ping_pong(rounds: int) -> float:
    ping, pong = threading.Event(), threading.Event()

    def answer() -> None:
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    other = threading.Thread(target=answer, name="feedline-gil-reading", daemon=True)
    other.start()
    started = time.perf_counter()
    for _ in range(rounds):
        ping.set()
        pong.wait()
        pong.clear()
    elapsed = time.perf_counter() - started
    other.join()
    return elapsed / (2 * rounds)


def default_thread_budget() -> int:
    """The worker threads a pass may run when the user sets no cap (see above)."""
    low, high = THREAD_BUDGET_BOUNDS
    handoffs = SWITCH_INTERVALS * sys.getswitchinterval() / gil_handoff_seconds()
    return max(low, min(high, round(handoffs)))
