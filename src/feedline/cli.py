"""The ``feedline`` command, also run as ``python -m feedline``.

argparse only: the core depends on numpy alone, so the CLI must work on a bare install.

Each subcommand is an ``_add_*`` function, listed in ``SUBCOMMANDS``, that adds its parser and
sets ``handler``: a function taking the parsed arguments and returning the exit status.
A new subcommand is one more such function. A command that passes unknown options on to another
program (``bench``) also sets ``passthrough``; they arrive in ``args.passthrough``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import feedline
from feedline import demo
from feedline.observe.live import open_steps

if TYPE_CHECKING:
    # Generic only in the type stubs; subscripting it at runtime fails on Python 3.10.
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]


# --fast: the live part in this fraction of its time, for tests; the checks are the same.
FAST_DEMO = 0.15


def _run_demo(args: argparse.Namespace) -> int:
    phases = demo.scaled(demo.PHASES, FAST_DEMO) if args.fast else demo.PHASES
    return demo.run_demo(phases=phases, plot=None if args.no_plot else args.plot, plain=args.plain)


def _add_demo(subparsers: _SubParsers) -> None:
    questions = "\n".join(f"  {n}. {case.question}" for n, case in enumerate(demo.CASES, 1))
    phases = "\n".join(f"     - {p.name} ({p.seconds:.0f} s)" for p in demo.PHASES)
    parser = subparsers.add_parser(
        "demo",
        help='run and check the "does AUTOTUNE change my batch size?" cases, then watch '
        "AUTOTUNE work live",
        description=(
            "Build and run small pipelines live, print what they yield, and check it.\n"
            "Exits with status 1 if any check fails.\n\n"
            f"Cases:\n{questions}\n"
            f"  {len(demo.CASES) + 1}. What does AUTOTUNE change while the load changes under "
            f"it?\n{phases}\n\n"
            "The last case shows a live view (a table on a terminal with rich installed, log\n"
            "lines otherwise), then AUTOTUNE's decisions and the pipeline's report, and writes\n"
            "a plot (needs matplotlib: pip install 'feedline[viz]')."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=demo.DEFAULT_PLOT,
        metavar="PNG",
        help="where to write the plot (default: %(default)s)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="log lines instead of the live table, even on a terminal",
    )
    parser.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=_run_demo)


def _run_explain(args: argparse.Namespace) -> int:
    from feedline.explain import explain

    return explain(args.script, args.args, args.plot)


def _add_explain(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="run a Python script, then report every feedline pipeline it ran",
        description=(
            "Run SCRIPT as 'python SCRIPT ARGS...' would, then print the report of every\n"
            "feedline iterator it created that delivered data: per-stage knobs, times, waits,\n"
            "buffers, the bottleneck, and AUTOTUNE's decisions. Exits with the script's status\n"
            "(1 if it raised: its traceback is printed, then the reports of what ran)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an option of the script must not be read as a prefix of ours
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="also plot each iterator over time: PNG, then PNG-2, ... (needs feedline[viz])",
    )
    parser.add_argument("script", type=Path, help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    parser.set_defaults(handler=_run_explain)


def _benchmark_roots() -> list[Path]:
    # The working directory (a checkout), then the checkout this package is installed from
    # (pip install -e): src/feedline/cli.py -> the repository root.
    return [Path.cwd(), Path(__file__).resolve().parents[2]]


def find_benchmarks() -> Path | None:
    """The repository root holding the ``benchmarks`` package, if there is one."""
    return next((r for r in _benchmark_roots() if (r / "benchmarks" / "run.py").is_file()), None)


def _workload_count(root: Path, passthrough: Sequence[str]) -> int | None:
    """How many workloads the run will have: named by --workloads, else all of them (asked
    of the benchmarks package in a child process, which has its imports; None if it fails)."""
    for index, arg in enumerate(passthrough):
        if arg.startswith("--workloads="):
            return len([w for w in arg.split("=", 1)[1].split(",") if w.strip()])
        if arg == "--workloads" and index + 1 < len(passthrough):
            return len([w for w in passthrough[index + 1].split(",") if w.strip()])
    code = "from benchmarks.workloads import WORKLOADS; print(len(WORKLOADS))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
        )
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


# benchmarks.run starts each workload with a line "== NAME: ..." and ends with "== done ...".
WORKLOAD_LINE = "== "
DONE_LINE = "== done"


def _run_bench(args: argparse.Namespace) -> int:
    root = find_benchmarks()
    if root is None:
        print(
            "feedline bench: the benchmark suite (the benchmarks/ package) is not here. It\n"
            "lives in the feedline repository and is not installed with the package: run\n"
            "'feedline bench' (or 'make bench') in a checkout of the repository.",
            file=sys.stderr,
        )
        return 2
    total = _workload_count(root, args.passthrough)
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", *args.passthrough],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    try:
        assert process.stdout is not None
        with open_steps(total, plain=args.plain) as steps:
            for raw in process.stdout:
                line = raw.rstrip("\n")
                if line.startswith(WORKLOAD_LINE) and not line.startswith(DONE_LINE):
                    steps.step(line[len(WORKLOAD_LINE) :])
                else:
                    steps.log(line)
        return process.wait()
    finally:
        if process.poll() is None:  # interrupted: do not leave the benchmark running
            process.terminate()
            process.wait()


def _add_bench(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        usage="feedline bench [-h] [--plain] [--quick | --smoke] [BENCHMARK OPTIONS ...]",
        help="run the benchmark suite (python -m benchmarks.run) with a progress bar",
        description=(
            "Run the benchmark suite of the feedline repository, comparing feedline with\n"
            "tf.data, torch's DataLoader and Grain where installed ('make bench' installs\n"
            "them). Needs a checkout of the repository: the suite is not installed with\n"
            "the package. Every option not listed here is passed on to benchmarks.run:\n"
            "  --quick              smaller grids, 2 s per run (< 5 min)\n"
            "  --smoke              tiny sizes: checks every pair runs, not a measurement\n"
            "  --workloads A,B      only these workloads\n"
            "  --systems A,B        only these systems\n"
            "  --timeout S, --max-seconds S, --[no-]isolate, --data-dir DIR, --out STEM\n"
            "Results: benchmarks/results/latest.{json,md,png}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--plain", action="store_true", help="numbered log lines instead of a progress bar"
    )
    parser.set_defaults(handler=_run_bench, passthrough=True)


SUBCOMMANDS: tuple[Callable[[_SubParsers], None], ...] = (_add_demo, _add_explain, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    # prog is fixed so usage reads "feedline" under ``python -m feedline`` too, not "__main__.py".
    parser = argparse.ArgumentParser(
        prog="feedline",
        description="feedline: tf.data-style input pipelines in pure Python and numpy.",
        epilog="Run 'feedline COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"feedline {feedline.__version__}")
    parser.set_defaults(passthrough=False)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the command, return its status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.passthrough is True:
        args.passthrough = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        # No command is a usage error, but the full help is more useful than a one-line usage.
        parser.print_help(sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        # Ctrl-C is how a demo or a benchmark is cut short: no traceback, the usual status.
        print(f"feedline {args.command}: interrupted", file=sys.stderr)
        return 130
