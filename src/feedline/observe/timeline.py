"""A time series of a running pipeline, for the live view and ``it.plot()``.

A tuned pass is recorded from its start by default: ``follow(it)`` gives the function that
AUTOTUNE's thread calls at each of its ticks, so ``it.plot()`` after the loop shows the whole
run at no thread's cost. Otherwise ``record(it)`` starts a daemon thread
(``feedline-timeline``) that samples the iterator's stages every ``interval`` seconds. A
sample holds the stages' knobs, cumulative counters (elements, work time, consumer wait) and
buffers, plus the consumer's counters. Rates come from the difference of two samples
(a ``Window``), so a sample is cheap: a few locked reads per stage, no percentiles.

The thread holds only a weak reference to the iterator, so recording never keeps a dropped
iterator (and its worker threads) alive; it stops when the iterator is closed or collected,
or on ``Timeline.stop()``. The samples stay readable afterwards.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from feedline.autotune.windows import Reading, StageWindow
from feedline.observe.stats import find_bottleneck

if TYPE_CHECKING:
    from feedline.observe.view import PassView

DEFAULT_INTERVAL = 0.1
# Past this many samples every other one is dropped and the interval doubles, so a recording
# of a long run stays small and still covers the run from its start.
MAX_SAMPLES = 2000
THREAD_NAME = "feedline-timeline"


@dataclass(frozen=True)
class StageSample:
    """One stage (all the stages made for one op, under ``repeat``) at one instant."""

    name: str
    knobs: Mapping[str, int]
    own_work: bool  # False for a prefetch: its work time is only waiting on its input
    # Cumulative since the pass started:
    elements: int
    worked: int  # elements its work time covers (a buffer's worth ahead of those delivered)
    work_wall: float
    work_cpu: float
    consumer_wait: float
    input_wall: float  # taking elements from its input (see StageMetrics)
    # Now:
    buffered_elements: int
    buffered_bytes: int
    buffer_limit: int  # elements the stage may hold with its current knobs


@dataclass(frozen=True)
class Sample:
    time: float  # seconds since the pass started
    delivered: int  # elements the consumer has received
    wait: float  # seconds the consumer has spent waiting in next()
    stages: tuple[StageSample, ...]


def take_sample(it: PassView) -> Sample:
    # Stages made again for the same op (each epoch under repeat) share its key: counters add
    # up over all of them, knobs and buffers are the latest one's.
    latest: dict[object, Any] = {}
    snapshots: dict[object, list[dict[str, float]]] = {}
    for stage in it.all_stages():
        m = stage.metrics.snapshot()
        latest[stage.key] = (stage, m)
        snapshots.setdefault(stage.key, []).append(m)
    names: dict[str, int] = {}
    stages = []
    for key, (stage, m) in latest.items():
        # Two ops can have the same name (two plain maps): number the later ones.
        names[stage.name] = names.get(stage.name, 0) + 1
        name = stage.name if names[stage.name] == 1 else f"{stage.name}#{names[stage.name]}"
        limit = getattr(stage, "buffer_limit", None)
        total = Reading.total(snapshots[key])
        stages.append(
            StageSample(
                name=name,
                knobs={k: knob.value for k, knob in stage.knobs.items()},
                own_work=stage.has_own_work,
                elements=int(total.elements),
                worked=int(total.worked),
                work_wall=total.work_wall,
                work_cpu=total.work_cpu,
                consumer_wait=total.consumer_wait,
                input_wall=total.input_wall,
                buffered_elements=int(m["buffered_elements"]),
                buffered_bytes=int(m["buffered_bytes"]),
                buffer_limit=int(limit()) if callable(limit) else 0,
            )
        )
    counters = it.consumer
    return Sample(
        time=time.perf_counter() - it.started,
        delivered=counters.delivered,
        wait=counters.wait,
        stages=tuple(stages),
    )


class SampledWindow(StageWindow[StageSample]):
    """What one stage did between two samples; knobs and buffers as at the later one."""

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def knobs(self) -> Mapping[str, int]:
        return self.stage.knobs

    @property
    def own_work(self) -> bool:
        return self.stage.own_work

    @property
    def buffered_elements(self) -> int:
        return self.stage.buffered_elements

    @property
    def buffered_bytes(self) -> int:
        return self.stage.buffered_bytes

    @property
    def buffer_limit(self) -> int:
        return self.stage.buffer_limit

    @property
    def consumer_wait_fraction(self) -> float:
        """``consumer_wait``, by the name ``stats()`` gives it."""
        return self.consumer_wait


@dataclass(frozen=True)
class Window:
    """The pipeline between two samples."""

    start: float
    end: float
    delivered: int
    rate: float  # elements per second the consumer received
    wait_fraction: float  # of the window, the consumer spent waiting for data
    stages: tuple[SampledWindow, ...]

    def bottleneck(self) -> dict[str, str]:
        """``find_bottleneck`` on this window alone, so it follows a pipeline that changes."""
        seconds = self.end - self.start
        stages = [
            {
                "name": s.name,
                "knobs": dict(s.knobs),
                "own_work": s.own_work,
                "elements": s.elements,
                "work_wall_s": s.work_wall,
                "input_wall_s": s.input_wall,
                "work_cpu_s": s.work_wall * (s.cpu_share or 0.0),
                "mean_ms": s.mean_ms,
                "cpu_share": s.cpu_share,
                "consumer_wait_fraction": s.consumer_wait_fraction,
            }
            for s in self.stages
        ]
        consumer = {
            "elements": self.delivered,
            "elapsed_s": seconds,
            "wait_s": self.wait_fraction * seconds,
            "stall_fraction": self.wait_fraction,
        }
        return find_bottleneck({"stages": stages, "consumer": consumer})


def reading(s: StageSample) -> Reading:
    return Reading(
        elements=s.elements,
        worked=s.worked,
        work_wall=s.work_wall,
        work_cpu=s.work_cpu,
        consumer_wait=s.consumer_wait,
        input_wall=s.input_wall,
    )


def between(older: Sample, newer: Sample) -> Window:
    seconds = max(newer.time - older.time, 1e-9)
    before = {s.name: reading(s) for s in older.stages}
    stages = tuple(
        SampledWindow.between(
            s, before.get(s.name, Reading()), reading(s), seconds, average_if_idle=False
        )
        for s in newer.stages
    )
    delivered = newer.delivered - older.delivered
    return Window(
        start=older.time,
        end=newer.time,
        delivered=delivered,
        rate=delivered / seconds,
        wait_fraction=min(1.0, (newer.wait - older.wait) / seconds),
        stages=stages,
    )


class Timeline:
    """Samples of one iterator, appended by the recording thread; safe to read meanwhile."""

    def __init__(self, interval: float = DEFAULT_INTERVAL, unit: str = "elements") -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.unit = unit  # what the consumer receives: "batches" or "elements"
        self.followed = False  # fed by AUTOTUNE's ticks (``follow``), not a thread of its own
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def add(self, sample: Sample) -> None:
        with self._lock:
            self._samples.append(sample)
            if len(self._samples) > MAX_SAMPLES:
                # Keep the last one: it is what the live view shows.
                self._samples = [*self._samples[:-1:2], self._samples[-1]]
                self.interval *= 2

    def windows(self, span: float = 0.5) -> list[Window]:
        """One window ending at each sample, each at least ``span`` seconds long (where the
        recording allows), so rates are smoothed over ``span``."""
        samples = self.samples()
        out = []
        first = 0
        for newer in samples[1:]:
            while first + 1 < len(samples) and newer.time - samples[first + 1].time >= span:
                first += 1
            out.append(between(samples[first], newer))
        return out

    def recent(self, span: float = 1.0) -> Window | None:
        """The last ``span`` seconds (or as much as was recorded); None before two samples."""
        with self._lock:
            if len(self._samples) < 2:
                return None
            newer = self._samples[-1]
            older = next(
                (s for s in reversed(self._samples[:-1]) if newer.time - s.time >= span),
                self._samples[0],
            )
        return between(older, newer)

    def start(self, it: PassView) -> None:
        """Sample ``it`` now and then every ``interval`` seconds until it closes or is
        collected, or ``stop()`` is called."""
        if self._thread is not None:
            raise RuntimeError("a Timeline records one pass once")
        self.add(take_sample(it))
        ref = weakref.ref(it)
        # A collected iterator stops the thread at once rather than at its next tick.
        weakref.finalize(it, self._stopping.set)
        self._thread = threading.Thread(
            target=self._record, args=(ref,), name=THREAD_NAME, daemon=True
        )
        self._thread.start()

    def _record(self, ref: weakref.ref[PassView]) -> None:
        while not self._stopping.wait(self.interval):
            it = ref()
            if it is None:
                return
            closed = it.closed
            # After close, the sample still has the final counters (closed stages keep theirs).
            self.add(take_sample(it))
            del it  # hold no reference between ticks
            if closed:
                return

    def stop(self, timeout: float = 2.0) -> None:
        """Stop recording (the samples stay); waits for the thread to end."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


_timelines: weakref.WeakKeyDictionary[PassView, Timeline] = weakref.WeakKeyDictionary()
_timelines_lock = threading.Lock()


def record(it: PassView, interval: float = DEFAULT_INTERVAL) -> Timeline:
    """The timeline of ``it``: the one recording it, else (once ``it`` is closed) the last
    one, which has the whole run; otherwise a new one, started now."""
    with _timelines_lock:
        timeline = _timelines.get(it)
        if timeline is not None and (timeline.running or timeline.followed or it.closed):
            return timeline
        timeline = Timeline(interval, it.unit)
        if it.closed:
            # Nothing will happen any more: one sample has it all, and no thread is needed.
            timeline.add(take_sample(it))
        else:
            timeline.start(it)
        _timelines[it] = timeline
        return timeline


def follow(it: PassView) -> Callable[[], None]:
    """Record ``it`` from now on through the function returned, which takes one sample each
    time it is called (by AUTOTUNE's thread at each tick, and once when the pass ends); it
    holds only a weak reference to ``it``. ``record(it)`` then returns this timeline."""
    timeline = Timeline(unit=it.unit)
    timeline.followed = True
    ref = weakref.ref(it)
    with _timelines_lock:
        recording = _timelines.get(it)
        if recording is not None and recording.running:
            return lambda: None  # recorded by its own thread, as the user asked
        timeline.add(take_sample(it))
        _timelines[it] = timeline

    def sample() -> None:
        followed = ref()
        if followed is not None:
            timeline.add(take_sample(followed))

    return sample
