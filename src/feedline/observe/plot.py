"""``it.plot(path)``: a PNG of a pipeline over time, drawn from its ``Timeline``.

Four panels share the time axis: what each stage buffers (and may buffer), each stage's
parallelism, the rate the consumer receives elements (or batches) at, and how much of its
time it waits. Each AUTOTUNE decision is marked on the parallelism panel with its knob, and
listed with its reason under the panels.
matplotlib is an optional extra (``feedline[viz]``), imported only here and only when called.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedline.observe.timeline import SampledWindow, Timeline, Window, record, take_sample

if TYPE_CHECKING:
    from feedline.observe.view import PassView

# 1000 x 1050 pixels: four panels and the decisions' reasons.
FIGSIZE = (10.0, 10.5)
DPI = 100
# Rates are averaged over this many seconds: per-sample rates of a batched stream are mostly
# noise (a batch either arrived in a 0.1 s sample or it did not).
SMOOTHING_SECONDS = 0.5
# The last this many decisions have their reasons listed under the plot.
MAX_REASONS = 15

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
    decisions: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write the PNG to ``path`` and return it. ``marks`` are (time, label) pairs drawn as
    vertical lines, e.g. where a run changes phase; ``decisions``: AUTOTUNE's history (as in
    ``stats()["autotune"]["history"]``), marked where each was made."""
    plt = pyplot()
    windows = timeline.windows(SMOOTHING_SECONDS)
    if len(windows) < 2:
        warnings.warn(
            "the timeline has almost no samples: with AUTOTUNE off, call "
            "feedline.observe.timeline.record(it) before iterating to plot the run over time",
            stacklevel=2,
        )
    names = list(dict.fromkeys(s.name for w in windows for s in w.stages))
    t = [w.end for w in windows]
    fig, (buffers, workers, rate, wait, reasons) = plt.subplots(
        5,
        1,
        figsize=FIGSIZE,
        dpi=DPI,
        constrained_layout=True,
        gridspec_kw={"height_ratios": (1, 1, 1, 1, 0.6)},
    )
    for axes in (buffers, workers, rate):
        axes.sharex(wait)
        axes.tick_params(labelbottom=False)
    reasons.axis("off")
    colors = {name: f"C{index}" for index, name in enumerate(names)}
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
        (rate, f"{timeline.unit}/s received"),
        (wait, "consumer waits (%)"),
    )
    # A map's hundreds of buffered elements or workers would flatten a prefetch's few: a
    # log scale, with every power of two named, so 12 workers read apart from 16.
    for axes in (buffers, workers):
        axes.set_yscale("symlog", linthresh=1, base=2)
        axes.yaxis.set_major_locator(_powers_of_two(plt))
        axes.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    _mark_decisions(workers, reasons, decisions, colors)
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


def _powers_of_two(plt: Any) -> Any:
    from matplotlib.ticker import FixedLocator

    return FixedLocator([0, *(2**k for k in range(16))])


def _mark_decisions(
    axes: Any, reasons: Any, decisions: Sequence[Mapping[str, Any]], colors: Mapping[str, str]
) -> None:
    """Each decision as a point at its time and new value (its stage's color) on ``axes``,
    labelled with its knob and number; the reasons in a numbered list on ``reasons``."""
    for number, d in enumerate(decisions, start=1):
        color = colors.get(d["stage"], "black")
        if d["knob"] == "parallelism":
            axes.plot([d["time"]], [d["new"]], marker="o", markersize=4, color=color)
            where = (d["time"], d["new"])
            coords: Any = "data"
        else:
            where = (d["time"], 0.02)
            coords = ("data", "axes fraction")
        axes.annotate(
            f"{number} {d['knob']} {d['old']}->{d['new']}",
            where,
            xycoords=coords,
            fontsize=6,
            rotation=30,
            color=color,
            xytext=(2, 2),
            textcoords="offset points",
        )
    if decisions:
        shown = list(enumerate(decisions, start=1))[-MAX_REASONS:]
        text = "\n".join(
            f"{n}. {d['time']:.2f}s {d['stage']}.{d['knob']} {d['old']}->{d['new']}: "
            f"{_short(d['reason'])}"
            for n, d in shown
        )
        reasons.text(0.0, 1.0, text, fontsize=6, va="top", family="monospace")


def _short(text: str, most: int = 110) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _stage(window: Window, name: str) -> SampledWindow | None:
    return next((s for s in window.stages if s.name == name), None)


def plot_iterator(it: PassView, path: str | Path) -> Path:
    """``it.plot(path)``: the timeline recorded for ``it`` (started now if none was), with
    AUTOTUNE's decisions."""
    tuner = it.tuner
    history = [] if tuner is None else [vars(d) for d in tuner.history]
    timeline = record(it)
    if timeline.followed and not it.closed:
        timeline.add(take_sample(it))  # up to now, not to the tuner's last tick
    return plot_timeline(timeline, path, decisions=history)
