"""The timeline recorder, the plot, the live views and explain's iterator tracking."""

from __future__ import annotations

import gc
import io
import struct
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

import feedline as fl
from feedline import explain
from feedline.observe import live, plot, timeline
from feedline.observe.timeline import Sample, StageSample, Timeline, record

pytestmark = pytest.mark.timeout(60)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first; fails if not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


EXPECTED_PNG_SIZE = (int(plot.FIGSIZE[0] * plot.DPI), int(plot.FIGSIZE[1] * plot.DPI))


def slow_pipeline(n: int = 200) -> fl.Dataset:
    def work(x: int) -> int:
        time.sleep(0.001)
        return x

    return fl.Dataset.range(n).map(work, num_parallel_calls=fl.AUTOTUNE).prefetch(fl.AUTOTUNE)


def timeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == timeline.THREAD_NAME]


def wait_until(condition: object, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gc.collect()
        if callable(condition) and condition():
            return True
        time.sleep(0.02)
    return False


def test_record_samples_until_the_iterator_closes() -> None:
    with slow_pipeline().iterator() as it:
        line = record(it, interval=0.02)
        assert record(it) is line  # one recorder per iterator
        assert [t.name for t in timeline_threads()] == [timeline.THREAD_NAME]
        for _ in it:
            # However many workers the map has, the loop lasts a few of the samples' ticks.
            time.sleep(0.0005)
    assert wait_until(lambda: not line.running)
    samples = line.samples()
    assert len(samples) >= 3
    assert [s.time for s in samples] == sorted(s.time for s in samples)
    last = samples[-1]
    assert last.delivered == 200
    assert {s.name for s in last.stages} == {"map(work)", "prefetch"}
    map_stage = next(s for s in last.stages if s.name == "map(work)")
    assert map_stage.elements == 200
    assert map_stage.knobs["parallelism"] >= 1
    # Closed: record() now returns the finished timeline instead of starting another.
    assert record(it) is line


def test_recording_does_not_keep_a_dropped_iterator_alive() -> None:
    it = slow_pipeline(10**6).iterator()
    next(it)
    line = record(it, interval=0.02)
    ref = weakref.ref(it)
    del it
    assert wait_until(lambda: ref() is None and not line.running)
    assert line.samples()


def test_stop_ends_recording_and_keeps_the_samples() -> None:
    with slow_pipeline(10**6).iterator() as it:
        line = record(it, interval=0.02)
        next(it)
        line.stop()
        assert not line.running
        count = len(line.samples())
        time.sleep(0.1)
        assert len(line.samples()) == count >= 1
        # A stopped recorder of an open iterator is replaced by a new one.
        again = record(it, interval=0.02)
        assert again is not line and again.running


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Timeline(0)


def _sample(t: float, delivered: int, wait: float, elements: int) -> Sample:
    stage = StageSample(
        name="map(f)",
        knobs={"parallelism": 2, "buffer_size": 1},
        own_work=True,
        elements=elements,
        worked=elements,
        work_wall=elements * 0.001,
        work_cpu=elements * 0.0001,
        consumer_wait=wait,
        input_wall=elements * 0.0001,
        buffered_elements=3,
        buffered_bytes=3 * 8,
        buffer_limit=8,
    )
    return Sample(time=t, delivered=delivered, wait=wait, stages=(stage,))


def test_windows_give_rates_and_a_bottleneck() -> None:
    line = Timeline()
    assert line.recent() is None
    for i in range(11):
        # 100 elements/s; the consumer waits half the time, on a map that mostly sleeps.
        line.add(_sample(i * 0.1, 10 * i, 0.05 * i, 10 * i))
    window = line.recent(span=0.5)
    assert window is not None
    assert window.end - window.start == pytest.approx(0.5)
    assert window.rate == pytest.approx(100)
    assert window.wait_fraction == pytest.approx(0.5)
    (stage,) = window.stages
    assert stage.rate == pytest.approx(100)
    assert stage.mean_ms == pytest.approx(1.0)
    assert stage.cpu_share == pytest.approx(0.1)
    bottleneck = window.bottleneck()
    assert bottleneck["stage"] == "map(f)"
    assert "waits" in bottleneck["advice"]
    smoothed = line.windows(span=0.25)  # the shortest window of at least 0.25 s: 0.3 s
    assert len(smoothed) == 10
    assert all(w.end - w.start >= 0.1 - 1e-9 for w in smoothed)
    assert smoothed[-1].end - smoothed[-1].start == pytest.approx(0.3)


def test_a_window_in_which_a_map_waited_on_its_input_blames_the_input() -> None:
    line = Timeline()
    for i in range(11):
        # The map's work: 0.1 ms an element; taking them from its input: 1 ms each.
        stage = StageSample(
            name="map(f)",
            knobs={"parallelism": 0},
            own_work=True,
            elements=10 * i,
            worked=10 * i,
            work_wall=10 * i * 0.0001,
            work_cpu=10 * i * 0.0001,
            consumer_wait=0.099 * i,
            input_wall=10 * i * 0.001,
            buffered_elements=0,
            buffered_bytes=0,
            buffer_limit=0,
        )
        line.add(Sample(time=i * 0.1, delivered=10 * i, wait=0.099 * i, stages=(stage,)))
    window = line.recent(span=0.5)
    assert window is not None
    assert "the input of map(f) sets the pace" in window.bottleneck()["advice"]


def test_a_long_recording_is_thinned_not_truncated() -> None:
    line = Timeline(interval=0.1)
    for i in range(timeline.MAX_SAMPLES + 1):
        line.add(_sample(float(i), i, 0.0, i))
    samples = line.samples()
    assert len(samples) <= timeline.MAX_SAMPLES // 2 + 2
    assert samples[0].time == 0.0  # still from the start ...
    assert samples[-1].time == timeline.MAX_SAMPLES  # ... to the latest
    assert line.interval == pytest.approx(0.2)


def test_it_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with slow_pipeline().iterator() as it:
        record(it, interval=0.02)
        for _ in it:
            pass
        out = it.plot(tmp_path / "run.png")
    assert out == tmp_path / "run.png"
    assert png_size(out) == EXPECTED_PNG_SIZE


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(plot.PlotUnavailable, match=r"feedline\[viz\]"):
        plot.plot_timeline(Timeline(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _recorded() -> Timeline:
    line = Timeline()
    for i in range(6):
        line.add(_sample(i * 0.2, 10 * i, 0.1 * i, 10 * i))
    return line


def test_plain_view_prints_lines_without_escape_codes() -> None:
    out = io.StringIO()
    with live.open_view(_recorded(), title="t", total=2.0, out=out) as view:
        assert type(view) is live.PlainView
        view.update(0.5, "phase one")
        view.update(0.6, "phase one")  # too soon after the last line: nothing printed
        view.update(0.7, "phase two")  # a new phase: printed at once
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("  [0.5/2.0 s] phase one: 50 elements/s received")
    assert "map(f) x2 buf 3/8" in lines[0]
    assert "bottleneck: map(f)" in lines[0]
    assert lines[1].startswith("  [0.7/2.0 s] phase two")
    assert "\x1b" not in out.getvalue()


def test_rich_view_on_a_terminal_and_plain_when_asked() -> None:
    pytest.importorskip("rich")
    out = FakeTerminal()
    assert type(live.open_view(_recorded(), title="t", total=1, out=out, plain=True)) is (
        live.PlainView
    )
    with live.open_view(_recorded(), title="demo", total=2.0, out=out) as view:
        assert type(view) is live.RichView
        view.update(1.0, "phase [one]")  # brackets are text, not rich markup
    text = out.getvalue()
    assert "map(f)" in text
    assert "24 B" in text  # the bytes buffered
    assert "phase [one]" in text
    assert "bottleneck" in text


def test_plain_steps_number_each_step() -> None:
    out = io.StringIO()
    with live.open_steps(2, out=out) as steps:
        steps.step("first")
        steps.log("a line")
        steps.step("second")
    assert out.getvalue().splitlines() == ["[1/2] first", "a line", "[2/2] second"]


def test_track_finds_iterators_without_touching_iteration() -> None:
    next_before = fl.DatasetIterator.__next__
    init_before = fl.DatasetIterator.__init__
    with explain.track() as tracked:
        assert fl.DatasetIterator.__next__ is next_before  # iteration is not wrapped
        assert list(fl.Dataset.range(5).prefetch(1)) == [0, 1, 2, 3, 4]  # dropped at once
        kept = slow_pipeline(50).iterator()
        next(kept)
        assert len(tracked) == 2
        dropped, open_one = tracked
        assert dropped.stats is not None and dropped.stats["consumer"]["elements"] == 5
        assert dropped.created_at.startswith(__file__)
        assert open_one.stats is None  # still open: measured at the end
        stats = open_one.final_stats()
        assert kept._closed
        assert stats is not None and stats["consumer"]["elements"] == 1
    assert fl.DatasetIterator.__init__ is init_before
    assert not hasattr(fl.Dataset.range(1).iterator(), explain._ATTRIBUTE)


def test_rich_steps_show_a_bar_and_the_lines() -> None:
    pytest.importorskip("rich")
    out = FakeTerminal()
    with live.open_steps(2, out=out) as steps:
        assert type(steps) is live.RichSteps
        steps.step("first [a]")
        steps.log("a line")
        steps.step("second")
    text = out.getvalue()
    assert "[1/2] first [a]" in text
    assert "a line" in text
    assert "2/2" in text


def test_without_rich_a_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # makes `import rich` fail
    assert type(live.open_view(_recorded(), title="t", total=1, out=FakeTerminal())) is (
        live.PlainView
    )
    assert type(live.open_steps(1, out=FakeTerminal())) is live.Steps


def _slow(x: int) -> int:
    time.sleep(0.0005)
    return x


@pytest.mark.timeout(60)
def test_a_tuned_pass_is_recorded_from_its_start_without_a_thread_of_its_own(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    ds = fl.Dataset.range(3000).map(_slow, num_parallel_calls=fl.AUTOTUNE).batch(16)
    with ds.iterator() as it:
        for _ in it:
            assert not any(t.name == timeline.THREAD_NAME for t in threading.enumerate())
        out = it.plot(tmp_path / "run.png")
        samples = record(it).samples()
        history = it.stats()["autotune"]["history"]
    assert out.stat().st_size > 0
    assert samples[0].time < 0.1  # from the start ...
    assert samples[-1].delivered == -(-3000 // 16)  # ... to the end of the loop
    assert len(samples) >= 5
    assert history  # what the plot marks


def test_what_the_consumer_receives_is_named() -> None:
    D = fl.Dataset
    assert D.range(4).batch(2).prefetch(1).map(lambda x: x).iterator().unit == "batches"
    assert D.range(4).batch(2).unbatch().iterator().unit == "elements"
    assert D.range(4).map(lambda x: x).iterator().unit == "elements"


def test_the_report_never_cuts_a_knob_off() -> None:
    ds = fl.Dataset.range(2000).map(_slow, num_parallel_calls=fl.AUTOTUNE).batch(8)
    with ds.iterator() as it:
        for _ in it:
            pass
        text = it.report(file=io.StringIO())
    row = next(line for line in text.splitlines() if line.startswith("map("))
    assert "buffer_size=" in row and "executor=" in row


def _waits(x: int) -> int:
    time.sleep(0.002)
    return x


@pytest.mark.timeout(60)
def test_recovery_flags_a_waiting_stage_held_to_one_call() -> None:
    from feedline.observe import recovery

    ds = fl.Dataset.range(10**6).map(_waits, num_parallel_calls=1).batch(8)
    with ds.iterator() as it:
        line = record(it, interval=0.05)
        for _ in range(10):
            next(it)
        middle = recovery.read(it.consumer.wait)
        for _ in range(20):
            next(it)
        end = recovery.read(it.consumer.wait)
        verdict = recovery.judge("io", 4.0, middle, end, line.recent(end.wall - middle.wall))
        line.stop()
    assert verdict.judged and not verdict.kept_up, verdict
    assert "map(_waits) waits on one call at a time" in verdict.detail


def test_recovery_does_not_judge_short_phases_and_passes_a_served_consumer() -> None:
    from feedline.observe import recovery

    start = recovery.Reading(0.0, 0.0, None, 0.0)
    served = recovery.Reading(2.0, 0.01, None, 0.05)  # waited 2.5%, used no CPU
    assert not recovery.judge("p", 1.0, start, served, None).judged
    assert recovery.judge("p", 4.0, start, served, None).kept_up
    waiting = recovery.Reading(2.0, 0.02, None, 1.9)  # waited 95%, used 1% of a core
    assert not recovery.judge("p", 4.0, start, waiting, None).kept_up


def test_the_report_shows_a_long_run_of_an_interleaves_readers_in_short() -> None:
    table = [np.arange(5) + 100 * k for k in range(10)]
    ds = (
        fl.Dataset.range(10)
        .map(int)
        .interleave(
            lambda k: fl.Dataset.from_tensor_slices(table[k]), num_parallel_calls=fl.AUTOTUNE
        )
    )
    with ds.iterator() as it:
        assert len(list(it)) == 50
        report = it.report()
        readers = [s for s in it.stats()["stages"] if "[" in s["name"]]
    assert len(readers) == 10  # stats() keeps every one
    rows = [line.split()[0] for line in report.splitlines() if "[" in line.split(" ")[0]]
    name = readers[0]["name"].split("[")[0]
    assert rows == [f"{name}[0]", f"{name}[1]", f"{name}[9]"], report
    assert f"... 7 more of {name}[...]'s readers, 35 elements" in report
