"""``feedline explain script.py [args...]``: run a script, then report every pipeline it ran.

While the script runs, ``DatasetIterator.__init__`` and ``close`` are wrapped (and restored
afterwards), so iterating costs exactly what it costs without ``explain``. Each iterator is
remembered by a weak reference: the script's own lifetimes are unchanged. An iterator that
closes (or is dropped, which closes it) leaves its ``stats()`` as they were at that moment;
one still open when the script ends is measured then, and closed.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import traceback
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from feedline.observe.plot import PlotUnavailable, plot_timeline, pyplot
from feedline.observe.stats import collect_stats, format_report
from feedline.observe.timeline import Timeline, record
from feedline.pipeline import DatasetIterator

# Set on each iterator created under ``track()``: a weak reference to it would already be
# cleared when the garbage collector closes an iterator caught in a reference cycle.
_ATTRIBUTE = "_feedline_explain"
_PACKAGE = str(Path(__file__).resolve().parent)
# An iterator sampled fewer times than this (it ran for a few tenths of a second) gets no plot.
MIN_SAMPLES = 3


@dataclass
class Tracked:
    number: int  # in creation order, from 1
    created_at: str  # "file:line" of the script code that made it
    ref: weakref.ref[DatasetIterator]
    timeline: Timeline | None
    stats: dict[str, Any] | None = None  # as the iterator closed

    def final_stats(self) -> dict[str, Any] | None:
        """The stats as it closed; if it is still open, as of now (and it is closed)."""
        it = self.ref()
        if it is not None and not it.closed:
            it.close()  # records self.stats, through the wrapped close
        return self.stats


def _caller() -> str:
    """Where user code (outside the feedline package) created the iterator."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _record_stats(it: DatasetIterator) -> None:
    tracked: Tracked | None = getattr(it, _ATTRIBUTE, None)
    if tracked is not None:
        # close() may run in a finalizer: measuring must never stop it from closing.
        try:
            tracked.stats = collect_stats(it)
        except Exception as e:
            print(
                f"feedline explain: no stats for iterator {tracked.number}: {e!r}", file=sys.stderr
            )


@contextmanager
def track(timelines: bool = False) -> Iterator[list[Tracked]]:
    """Within the block, every new ``DatasetIterator`` is appended to the yielded list (with a
    ``Timeline`` recording it when ``timelines``)."""
    tracked: list[Tracked] = []
    original_init = DatasetIterator.__init__
    original_close = DatasetIterator.close

    @functools.wraps(original_init)
    def init(it: DatasetIterator, *args: Any, **kwargs: Any) -> None:
        original_init(it, *args, **kwargs)
        entry = Tracked(
            number=len(tracked) + 1,
            created_at=_caller(),
            ref=weakref.ref(it),
            timeline=record(it) if timelines else None,
        )
        setattr(it, _ATTRIBUTE, entry)
        tracked.append(entry)

    @functools.wraps(original_close)
    def close(it: DatasetIterator) -> None:
        if not it.closed:
            _record_stats(it)
        original_close(it)

    DatasetIterator.__init__ = init  # type: ignore[method-assign, assignment]
    DatasetIterator.close = close  # type: ignore[method-assign, assignment]
    try:
        yield tracked
    finally:
        DatasetIterator.__init__ = original_init  # type: ignore[method-assign]
        DatasetIterator.close = original_close  # type: ignore[method-assign]


def run_script(path: Path, args: Sequence[str]) -> int:
    """Run ``path`` as ``python path args...`` would, in this process; its exit status.
    An exception is printed with the script's part of the traceback, status 1."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return _exit_status(e.code)
    except KeyboardInterrupt:
        print("feedline explain: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        _print_script_error(e, path)
        return 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


def _exit_status(code: object) -> int:
    # As the interpreter does: None is success, an int is the status, anything else is printed.
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _print_script_error(error: BaseException, path: Path) -> None:
    """The traceback from the script's first frame on: explain's and runpy's frames are noise.
    A script that fails to compile has no frame of its own: then only the error is shown."""
    script = os.path.realpath(path)
    tb = error.__traceback__
    while tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next
    traceback.print_exception(type(error), error, tb, file=sys.stderr)


def report(tracked: Sequence[Tracked], out: TextIO, plot: Path | None = None) -> None:
    """Print the report of each iterator that delivered anything (and plot it to ``plot``,
    numbered ``NAME-2.png`` ... after the first)."""
    used = [(t, s) for t in tracked if (s := t.final_stats()) and s["consumer"]["elements"]]
    unused = len(tracked) - len(used)
    summary = f"{len(tracked)} iterator{'s' if len(tracked) != 1 else ''} created"
    if unused:
        summary += f", {unused} of them delivered nothing"
    print(f"\n== feedline explain: {summary}", file=out)
    for index, (t, stats) in enumerate(used):
        print(f"\n-- iterator {t.number}, created at {t.created_at}", file=out)
        print(format_report(stats), file=out)
        if plot is None or t.timeline is None:
            continue
        if len(t.timeline.samples()) < MIN_SAMPLES:
            print("plot: none, it ran too briefly to show anything over time", file=out)
            continue
        path = plot if index == 0 else plot.with_name(f"{plot.stem}-{index + 1}{plot.suffix}")
        plot_timeline(t.timeline, path, title=f"iterator {t.number}, {t.created_at}")
        print(f"plot: {path}", file=out)


def explain(script: Path, args: Sequence[str], plot: Path | None = None) -> int:
    """``feedline explain``: the script's exit status (2 if it cannot be run at all)."""
    if not script.exists():
        print(f"feedline explain: no such script: {script}", file=sys.stderr)
        return 2
    if plot is not None:
        try:
            pyplot()  # fail before running a long script, not after
        except PlotUnavailable as e:
            print(f"feedline explain: --plot: {e}", file=sys.stderr)
            return 2
    with track(timelines=plot is not None) as tracked:
        status = run_script(script, args)
        # Still inside track(): iterators the script left open close here, with their stats.
        sys.stdout.flush()
        report(tracked, sys.stdout, plot)
    return status
