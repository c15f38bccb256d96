"""The demo's cases check what they claim, and the printer reports them faithfully."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from feedline import demo
from feedline.observe.live import View
from feedline.observe.timeline import Timeline
from tests.test_observe import EXPECTED_PNG_SIZE, png_size


def test_batch_then_prefetch_keeps_batches_of_two() -> None:
    result = demo.batch_then_prefetch()
    assert result.passed, result.checks
    assert all(check.passed for check in result.checks)
    assert result.batches == 4
    assert result.shapes == {(2,): 4}


@pytest.mark.timeout(120)
def test_slow_consumer_sees_100_batches_of_64() -> None:
    result = demo.slow_consumer()
    assert result.passed, result.checks
    assert result.batches == 100
    assert result.shapes == {(64,): 100}
    # 100 steps of at least 10 ms each (a little slack for clock rounding).
    assert result.seconds >= 0.99
    assert 0.0 <= result.waited <= result.seconds


def test_variable_after_build_keeps_batches_of_ten() -> None:
    result = demo.variable_after_build()
    assert result.passed, result.checks
    assert result.batches == 10
    assert result.shapes == {(10,): 10}
    assert any("(5,) x 20" in check.detail for check in result.checks)


def test_observer_hears_every_batch_in_order() -> None:
    seen: list[demo.Batch] = []
    result = demo.batch_then_prefetch(seen.append)
    assert [b.index for b in seen] == [0, 1, 2, 3]
    assert [b.values for b in seen] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert all(b.shape == (2,) for b in seen)
    assert result.batches == len(seen)


def test_preview_elides_long_batches() -> None:
    assert demo.preview([1, 2]) == "[1 2]"
    assert demo.preview(list(range(64))) == "[0 1 2 ... 61 62 63]"


def _fake_case(passed: bool) -> demo.Case:
    def run(observer: demo.Observer | None) -> demo.CaseResult:
        if observer is not None:
            observer(demo.Batch(0, (3,), (7, 8, 9), 0.0))
        return demo.CaseResult(
            checks=(demo.Check("the claim", passed, "what was seen"),),
            batches=1,
            shapes={(3,): 1},
            seconds=0.0,
            waited=0.0,
        )

    return demo.Case("A question?", "ds = ...", "Because.", run, show_every=1)


# The live case at a twentieth of its length: about a second, same checks.
SHORT = demo.scaled(demo.PHASES, 0.05)


@pytest.mark.timeout(120)
def test_run_demo_prints_plain_text_and_returns_0_when_all_pass(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = io.StringIO()
    assert demo.run_demo(out, phases=SHORT, plot=tmp_path / "demo.png") == 0
    text = out.getvalue()
    assert "\x1b" not in text  # no terminal escape codes
    assert text.count("FAIL") == 0
    for case in demo.CASES:
        assert case.question in text
    assert "shapes seen: (2,) x 4" in text
    assert "shapes seen: (64,) x 100" in text
    assert "shapes seen: (10,) x 10" in text
    assert "[4/4] What does AUTOTUNE change while the load changes under it?" in text
    assert "What AUTOTUNE did, phase by phase:" in text
    assert "feedline pipeline report" in text
    assert "PASS  every batch has 32 elements" in text
    assert f"Plot of buffers, parallelism, throughput and consumer wait: {tmp_path}" in text
    assert png_size(tmp_path / "demo.png") == EXPECTED_PNG_SIZE
    assert "4/4 cases passed." in text


def test_run_demo_reports_a_failed_check_and_returns_1() -> None:
    out = io.StringIO()
    assert demo.run_demo(out, cases=[_fake_case(True), _fake_case(False)], phases=()) == 1
    text = out.getvalue()
    assert "PASS  the claim" in text
    assert "FAIL  the claim" in text
    assert "batch   1  shape (3,)  [7 8 9]" in text
    assert "1/2 cases passed." in text


class RecordingView(View):
    def __init__(self, timeline: Timeline, total: float) -> None:
        super().__init__(timeline, "test", total, "s")
        self.updates: list[tuple[float, str]] = []

    def update(self, done: float, label: str) -> None:
        super().update(done, label)
        self.updates.append((done, label))


@pytest.mark.timeout(60)
def test_changing_load_checks_every_batch_and_tells_the_view() -> None:
    views: list[RecordingView] = []

    def watch(timeline: Timeline, total: float) -> View:
        views.append(RecordingView(timeline, total))
        return views[-1]

    result = demo.changing_load(SHORT, watch)
    assert result.passed, result.checks
    assert result.batches > 0
    assert result.stats["consumer"]["elements"] == result.batches
    assert [name for _, name in result.marks] == [p.name for p in SHORT]
    assert [when for when, _ in result.marks] == sorted(when for when, _ in result.marks)
    assert {d["knob"] for d in result.stats["autotune"]["history"]} <= demo.TUNED_KNOBS
    (view,) = views
    assert view.total == pytest.approx(sum(p.seconds for p in SHORT))
    assert {label for _, label in view.updates} == {p.name for p in SHORT} | {"done"}
    assert not result.timeline.running
    assert len(result.timeline.samples()) >= 3


def test_history_by_phase_chains_each_knob() -> None:
    def decision(t: float, knob: str, old: int, new: int) -> dict[str, object]:
        return {"time": t, "stage": "map", "knob": knob, "old": old, "new": new, "reason": ""}

    history = [decision(0.5, "parallelism", 1, 2), decision(0.7, "parallelism", 2, 4)]
    history += [decision(1.0 + i / 10, "buffer_size", i + 1, i + 2) for i in range(9)]
    result = demo.LiveResult(
        checks=(),
        batches=0,
        stats={"autotune": {"history": history}},
        timeline=Timeline(),
        marks=((0.0, "first"), (1.0, "second"), (3.0, "third")),
    )
    assert demo.history_by_phase(result) == [
        "    0.0 s  first:",
        "           map.parallelism: 1 -> 2 -> 4",
        "    1.0 s  second:",
        "           map.buffer_size: 1 -> 2 -> 3 -> ... (9 changes) ... -> 8 -> 9 -> 10",
        "    3.0 s  third:",
        "           (no change)",
    ]


def test_scaled_shortens_phases_only() -> None:
    (phase,) = demo.scaled([demo.Phase("p", 10.0, 0.04, 0.002)], 0.1)
    assert phase == demo.Phase("p", 1.0, 0.04, 0.002)


@pytest.mark.timeout(60)
def test_without_matplotlib_the_demo_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = io.StringIO()
    assert demo.run_demo(out, cases=(), phases=SHORT, plot=tmp_path / "demo.png") == 0
    assert "No plot: the plot needs matplotlib: pip install 'feedline[viz]'" in out.getvalue()
    assert not (tmp_path / "demo.png").exists()
