"""What the tuner may use: CPU and RAM budgets, from the options or this machine's readings
(``runtime/machine.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from feedline.options import AutotuneOptions
from feedline.runtime.machine import available_memory, usable_cores

# Share of the memory available when the pipeline starts that its buffers may hold by default
# (tf.data's autotuner uses half of RAM too).
DEFAULT_RAM_FRACTION = 0.5


@dataclass(frozen=True)
class Budget:
    cpu: float  # cores this process may use
    ram: int  # bytes the pipeline's buffers and worker processes may hold


def format_bytes(n: float) -> str:
    """``n`` bytes for people: B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def budget_for(options: AutotuneOptions) -> Budget:
    cpu = float(options.cpu_budget) if options.cpu_budget else usable_cores()
    ram = (
        int(options.ram_budget)
        if options.ram_budget
        else int(available_memory() * DEFAULT_RAM_FRACTION)
    )
    return Budget(cpu=cpu, ram=ram)
