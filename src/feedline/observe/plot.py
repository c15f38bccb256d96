"""``it.plot(path)``: a PNG of a pipeline over time, drawn from its ``Timeline``.

Four panels share the time axis: what each stage buffers (and may buffer), each stage's
parallelism, the rate the consumer receives elements at, and how much of its time it waits.
matplotlib is an optional extra (``feedline[viz]``), imported only here and only when called.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedline.observe.timeline import SampledWindow, Timeline, Window, record

if TYPE_CHECKING:
    from feedline.observe.view import PassView

# 1000 x 900 pixels.
FIGSIZE = (10.0, 9.0)
DPI = 100
# Rates are averaged over this many seconds: per-sample rates of a batched stream are mostly
# noise (a batch either arrived in a 0.1 s sample or it did not).
SMOOTHING_SECONDS = 0.5

VIZ_HINT = "pip install 'feedline[viz]'"


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only; ``PlotUnavailable`` without matplotlib."""
    try:
        import matplotlib

        # No display needed (CI, ssh), and no GUI window from a library call.
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable(f"the plot needs matplotlib: {VIZ_HINT}") from e
    return plt


def plot_timeline(
    timeline: Timeline,
    path: str | Path,
    title: str = "feedline pipeline",
    marks: Sequence[tuple[float, str]] = (),
) -> Path:
    """Write the PNG to ``path`` and return it. ``marks`` are (time, label) pairs drawn as
    vertical lines, e.g. where a run changes phase."""
    plt = pyplot()
    windows = timeline.windows(SMOOTHING_SECONDS)
    if len(windows) < 2:
        warnings.warn(
            "the timeline has almost no samples: call feedline.observe.timeline.record(it) "
            "before iterating to plot the run over time",
            stacklevel=2,
        )
    names = list(dict.fromkeys(s.name for w in windows for s in w.stages))
    t = [w.end for w in windows]
    fig, (buffers, workers, rate, wait) = plt.subplots(
        4, 1, sharex=True, figsize=FIGSIZE, dpi=DPI, constrained_layout=True
    )
    for index, name in enumerate(names):
        color = f"C{index}"
        stage = [_stage(w, name) for w in windows]
        buffers.plot(t, [s.buffered_elements if s else math.nan for s in stage], color=color)
        buffers.plot(
            t,
            [s.buffer_limit if s else math.nan for s in stage],
            color=color,
            linestyle="--",
            linewidth=0.8,
            label=f"{name} (dashed: limit)",
        )
        workers.step(
            t,
            [s.knobs.get("parallelism", math.nan) if s else math.nan for s in stage],
            where="post",
            color=color,
            label=name,
        )
    rate.plot(t, [w.rate for w in windows], color="C0")
    wait.plot(t, [100 * w.wait_fraction for w in windows], color="C3")
    panels = (
        (buffers, "buffered elements"),
        (workers, "parallelism"),
        (rate, "elements/s received"),
        (wait, "consumer waits (%)"),
    )
    # A map's hundreds of buffered elements or workers would flatten a prefetch's few.
    for axes in (buffers, workers):
        axes.set_yscale("symlog", linthresh=4)
    for axes, label in panels:
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
        for when, _ in marks:
            axes.axvline(when, color="grey", linewidth=0.8, linestyle=":")
    for when, text in marks:
        buffers.annotate(
            text, (when, 1.0), xycoords=("data", "axes fraction"), fontsize=8, va="bottom"
        )
    if names:
        buffers.legend(fontsize=8, loc="upper right")
        workers.legend(fontsize=8, loc="upper right")
    wait.set_ylim(0, 100)
    wait.set_xlabel("seconds since the pass started")
    fig.suptitle(title)
    out = Path(path)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _stage(window: Window, name: str) -> SampledWindow | None:
    return next((s for s in window.stages if s.name == name), None)


def plot_iterator(it: PassView, path: str | Path) -> Path:
    """``it.plot(path)``: the timeline recorded for ``it`` (started now if none was)."""
    return plot_timeline(record(it), path)
