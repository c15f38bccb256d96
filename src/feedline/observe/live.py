"""A live view of a running pipeline: each stage's knobs, rates and buffers, the bottleneck,
and the progress of the loop driving it.

``open_view`` picks how: on a terminal with ``rich`` installed (the ``feedline[viz]`` extra), a
table redrawn a few times a second; otherwise (a pipe, a CI log, no rich) a plain line every
couple of seconds, with no escape codes. Both read the same ``Timeline``; the loop being
watched only reports its progress through ``update``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from feedline.observe.stats import _size as format_bytes
from feedline.observe.timeline import SampledWindow, Timeline, Window

# Rates shown are averaged over the last this many seconds.
SPAN = 1.0
REFRESH_PER_SECOND = 4
PLAIN_EVERY = 2.0  # seconds between plain lines (a new phase label prints one at once)


COLUMNS = ("stage", "parallelism", "buffer held/limit", "bytes", "elements/s", "waited on")


def stage_cells(s: SampledWindow) -> dict[str, str]:
    """A stage's row, by column, shared by both views."""
    parallelism = s.knobs.get("parallelism")
    held = f"{s.buffered_elements}/{s.buffer_limit}" if s.buffer_limit else f"{s.buffered_elements}"
    return {
        "stage": s.name,
        "parallelism": "-" if parallelism is None else str(parallelism),
        "buffer held/limit": held,
        "bytes": format_bytes(s.buffered_bytes),
        "elements/s": f"{s.rate:,.0f}",
        "waited on": f"{s.consumer_wait_fraction:.0%}",
    }


def consumer_line(w: Window, unit: str) -> str:
    """``unit``: what the consumer receives, "batches" or "elements"."""
    return f"{w.rate:,.0f} {unit}/s received, waiting {w.wait_fraction:.0%} of the time"


class View:
    """The silent view (for a loop nobody watches); the base of the other two."""

    def __init__(self, timeline: Timeline, title: str, total: float, unit: str) -> None:
        self.timeline = timeline
        self.title = title
        self.total = total
        self.unit = unit
        self.done = 0.0
        self.label = ""

    def update(self, done: float, label: str) -> None:
        """The loop has done ``done`` of ``total`` (in ``unit``) and is in phase ``label``."""
        self.done = done
        self.label = label

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def progress(self) -> str:
        # A loop checks its clock before its last step, so it can end a little past the total.
        return f"{min(self.done, self.total):.1f}/{self.total:.1f} {self.unit}"


class PlainView(View):
    """One line every ``PLAIN_EVERY`` seconds and at each new phase, for pipes and logs."""

    def __init__(
        self, timeline: Timeline, title: str, total: float, unit: str, out: TextIO
    ) -> None:
        super().__init__(timeline, title, total, unit)
        self.out = out
        self._last = -PLAIN_EVERY

    def update(self, done: float, label: str) -> None:
        new_phase = label != self.label
        super().update(done, label)
        now = time.monotonic()
        if new_phase or now - self._last >= PLAIN_EVERY:
            self._last = now
            print(self.line(), file=self.out, flush=True)

    def line(self) -> str:
        w = self.timeline.recent(SPAN)
        head = f"  [{self.progress()}] {self.label}"
        if w is None:
            return head
        stages = " | ".join(
            f"{c['stage']} x{c['parallelism']} buf {c['buffer held/limit']} {c['elements/s']}/s"
            for c in map(stage_cells, w.stages)
        )
        consumer = consumer_line(w, self.timeline.unit)
        return f"{head}: {consumer} | {stages} | bottleneck: {w.bottleneck()['stage']}"


class RichView(View):
    """A table redrawn ``REFRESH_PER_SECOND`` times a second by rich's own thread."""

    def __init__(
        self, timeline: Timeline, title: str, total: float, unit: str, out: TextIO
    ) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__(timeline, title, total, unit)
        self._live = Live(
            console=Console(file=out),
            get_renderable=self.render,
            refresh_per_second=REFRESH_PER_SECOND,
        )

    def __enter__(self) -> View:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()  # draws the final state, which then stays on screen

    def render(self) -> Any:
        from rich.console import Group
        from rich.markup import escape
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            f"[bold]{escape(self.title)}[/]",
            ProgressBar(total=self.total, completed=self.done, width=30),
            self.progress(),
            f"[cyan]{escape(self.label)}[/]",
        )
        w = self.timeline.recent(SPAN)
        if w is None:
            return Group(bar, "waiting for the first samples...")
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in COLUMNS:
            table.add_column(column, justify="left" if column == "stage" else "right")
        for s in w.stages:
            table.add_row(*map(escape, stage_cells(s).values()))
        bottleneck = w.bottleneck()
        return Group(
            bar,
            table,
            f"consumer: {consumer_line(w, self.timeline.unit)}",
            f"[bold]bottleneck:[/] {escape(bottleneck['stage'])} "
            f"[dim]({escape(bottleneck['why'])})[/]",
        )


def _rich_for(stream: TextIO, plain: bool) -> bool:
    """Whether to draw with rich: on a terminal, with rich installed, unless asked not to."""
    if plain or not stream.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def open_view(
    timeline: Timeline,
    *,
    title: str,
    total: float,
    unit: str = "s",
    out: TextIO | None = None,
    plain: bool = False,
) -> View:
    """The rich view on a terminal when rich is installed and ``plain`` is not asked for, else
    the plain one."""
    stream = out if out is not None else sys.stdout
    if _rich_for(stream, plain):
        return RichView(timeline, title, total, unit, stream)
    return PlainView(timeline, title, total, unit, stream)


class Steps:
    """Progress through ``total`` steps (None: not known) of a job that also logs lines: each
    step prints "[k/n] what", for pipes and logs."""

    def __init__(self, total: int | None, out: TextIO) -> None:
        self.total = total
        self.done = 0
        self.out = out

    def log(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def step(self, description: str) -> None:
        """A new step begins (the previous one is complete)."""
        self.done += 1
        self.log(f"[{self.done}/{self.total or '?'}] {description}")

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class RichSteps(Steps):
    """The same lines, scrolling above a progress bar."""

    def __init__(self, total: int | None, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        super().__init__(total, out)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=out),
        )
        self._task = self._progress.add_task("starting", total=total)

    def log(self, line: str) -> None:
        self._progress.console.print(line, markup=False, highlight=False)

    def step(self, description: str) -> None:
        super().step(description)
        self._progress.update(self._task, completed=self.done - 1, description=description)

    def __enter__(self) -> Steps:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._progress.update(self._task, completed=self.done, description="done")
        self._progress.stop()


def open_steps(total: int | None, out: TextIO | None = None, plain: bool = False) -> Steps:
    """A progress bar on a terminal with rich (unless ``plain``), numbered lines otherwise."""
    stream = out if out is not None else sys.stdout
    return RichSteps(total, stream) if _rich_for(stream, plain) else Steps(total, stream)
