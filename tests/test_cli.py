"""The command line, run as a user would: in a separate process."""

from __future__ import annotations

import subprocess
import sys

import pytest

import feedline
from feedline.demo import CASES

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feedline", *args],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def test_help_lists_demo() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: feedline")
    assert "demo" in proc.stdout


def test_no_command_prints_help_and_fails() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage: feedline" in proc.stderr
    assert "demo" in proc.stderr


def test_demo_help_lists_its_cases() -> None:
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: feedline demo" in proc.stdout
    for case in CASES:
        assert case.question in proc.stdout


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"feedline {feedline.__version__}"


def test_unknown_command_fails_with_a_message() -> None:
    proc = run_cli("frobnicate")
    assert proc.returncode != 0
    assert "invalid choice: 'frobnicate'" in proc.stderr
    assert proc.stdout == ""


def test_demo_runs_and_prints_each_verdict() -> None:
    proc = run_cli("demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # stdout is a pipe here, so the output must be plain text.
    assert "\x1b" not in out
    for number, case in enumerate(CASES, start=1):
        assert f"[{number}/{len(CASES)}] {case.question}" in out
    assert "PASS  every batch has shape (2,)" in out
    assert "PASS  every batch has shape (64,)" in out
    assert "PASS  every batch has shape (10,)" in out
    assert "FAIL" not in out
    assert f"{len(CASES)}/{len(CASES)} cases passed." in out
    assert proc.stderr == ""
