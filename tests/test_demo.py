"""The demo's cases check what they claim, and the printer reports them faithfully."""

from __future__ import annotations

import io

import pytest

from feedline import demo


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


def test_run_demo_prints_plain_text_and_returns_0_when_all_pass() -> None:
    out = io.StringIO()
    assert demo.run_demo(out) == 0
    text = out.getvalue()
    assert "\x1b" not in text  # no terminal escape codes
    assert text.count("FAIL") == 0
    for case in demo.CASES:
        assert case.question in text
    assert "shapes seen: (2,) x 4" in text
    assert "shapes seen: (64,) x 100" in text
    assert "shapes seen: (10,) x 10" in text
    assert "3/3 cases passed." in text


def test_run_demo_reports_a_failed_check_and_returns_1() -> None:
    out = io.StringIO()
    assert demo.run_demo(out, cases=[_fake_case(True), _fake_case(False)]) == 1
    text = out.getvalue()
    assert "PASS  the claim" in text
    assert "FAIL  the claim" in text
    assert "batch   1  shape (3,)  [7 8 9]" in text
    assert "1/2 cases passed." in text
