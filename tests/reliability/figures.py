"""What the fault-injection suite checked, added up over the run and printed at its end."""

from __future__ import annotations

from collections import Counter, defaultdict

_FIGURES: defaultdict[str, Counter[str]] = defaultdict(Counter)


def record(suite: str, **counts: int) -> None:
    """Add ``counts`` (pipelines, restores, elements compared, kills, files...) to ``suite``."""
    _FIGURES[suite].update(counts)


def summary_lines() -> list[str]:
    return [
        f"{suite}: " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
        for suite, counts in sorted(_FIGURES.items())
    ]
