"""The command line, run as a user would: in a separate process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import feedline
from feedline import cli
from feedline.demo import CASES
from tests.test_observe import EXPECTED_PNG_SIZE, png_size

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


def test_demo_runs_and_prints_each_verdict(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    proc = run_cli("demo", "--fast", "--plot", str(plot))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # stdout is a pipe here, so the output must be plain text.
    assert "\x1b" not in out
    parts = len(CASES) + 1
    for number, case in enumerate(CASES, start=1):
        assert f"[{number}/{parts}] {case.question}" in out
    assert "PASS  every batch has shape (2,)" in out
    assert "PASS  every batch has shape (64,)" in out
    assert "PASS  every batch has shape (10,)" in out
    assert "PASS  every batch has 32 elements" in out
    assert "PASS  AUTOTUNE changed only parallelism, buffer sizes and executors" in out
    assert "bottleneck: " in out  # the live lines and the report
    assert "FAIL" not in out
    assert f"{parts}/{parts} cases passed." in out
    assert proc.stderr == ""
    assert png_size(plot) == EXPECTED_PNG_SIZE


@pytest.mark.parametrize("command", ["demo", "explain", "bench"])
def test_every_command_has_help(command: str) -> None:
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: feedline {command}")


def test_an_unknown_option_fails_with_a_message() -> None:
    proc = run_cli("demo", "--frobnicate")
    assert proc.returncode == 2
    assert "unrecognized arguments: --frobnicate" in proc.stderr


SCRIPT = """\
import sys
import time
import feedline as fl

ds = fl.Dataset.range(400).map(lambda x: x * 2, num_parallel_calls=fl.AUTOTUNE).batch(8)
for batch in ds.prefetch(fl.AUTOTUNE):
    time.sleep(0.01)  # a training step, long enough to be sampled over time
print("script argv:", sys.argv[1:])
if "--fail" in sys.argv:
    raise RuntimeError("loss is NaN")
if "--exit" in sys.argv:
    sys.exit(3)
"""


def write_script(tmp_path: Path) -> Path:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return script


def test_explain_runs_the_script_then_reports_its_pipeline(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    proc = run_cli("explain", str(script), "--epochs", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "script argv: ['--epochs', '3']" in out
    assert "== feedline explain: 1 iterator created" in out
    assert f"-- iterator 1, created at {script}:6" in out
    assert "consumer: 50 elements" in out
    assert "map(<lambda>)" in out
    assert "bottleneck: " in out
    assert out.index("script argv") < out.index("feedline pipeline report")


def test_explain_of_a_failing_script_shows_its_traceback_then_the_report(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    proc = run_cli("explain", str(script), "--fail")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert f'File "{script}", line 10, in <module>' in proc.stderr
    assert "RuntimeError: loss is NaN" in proc.stderr
    assert "runpy" not in proc.stderr  # explain's own frames are left out
    assert "consumer: 50 elements" in proc.stdout


def test_explain_passes_on_the_scripts_exit_status(tmp_path: Path) -> None:
    proc = run_cli("explain", str(write_script(tmp_path)), "--exit")
    assert proc.returncode == 3
    assert "feedline pipeline report" in proc.stdout


def test_explain_plots_each_iterator(tmp_path: Path) -> None:
    plot = tmp_path / "out.png"
    proc = run_cli("explain", "--plot", str(plot), str(write_script(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"plot: {plot}" in proc.stdout
    assert png_size(plot) == EXPECTED_PNG_SIZE


def test_explain_of_a_missing_script_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    proc = run_cli("explain", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"feedline explain: no such script: {missing}"
    assert proc.stdout == ""


def test_explain_needs_a_script() -> None:
    proc = run_cli("explain")
    assert proc.returncode == 2
    assert "the following arguments are required: script" in proc.stderr


def test_bench_without_the_benchmarks_package_says_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_benchmark_roots", lambda: [tmp_path])
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "the benchmark suite (the benchmarks/ package) is not here" in err
    assert "checkout of the repository" in err


FAKE_RUN = """\
import sys
print("== a: 10 elements (quick)", flush=True)
print("   args:", sys.argv[1:], flush=True)
print("== b: 10 elements (quick)", flush=True)
print("== done in 0 s", flush=True)
sys.exit(3)
"""


def test_bench_runs_the_suite_with_its_options_and_numbers_workloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stand-in for the repository's benchmarks package: the real one runs for minutes.
    package = tmp_path / "benchmarks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "workloads.py").write_text("WORKLOADS = {'a': 1, 'b': 2}\n")
    (package / "run.py").write_text(FAKE_RUN)
    monkeypatch.setattr(cli, "_benchmark_roots", lambda: [tmp_path])
    assert cli.main(["bench", "--quick", "--systems", "feedline"]) == 3
    assert capsys.readouterr().out.splitlines() == [
        "[1/2] a: 10 elements (quick)",
        "   args: ['--quick', '--systems', 'feedline']",
        "[2/2] b: 10 elements (quick)",
        "== done in 0 s",
    ]


def test_bench_counts_the_workloads_it_was_given(tmp_path: Path) -> None:
    assert cli._workload_count(tmp_path, ["--quick", "--workloads", "a,b,c"]) == 3
    assert cli._workload_count(tmp_path, ["--workloads=a"]) == 1
    assert cli._workload_count(tmp_path, []) is None  # no benchmarks package to ask
