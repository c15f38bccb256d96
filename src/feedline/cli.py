"""The ``feedline`` command, also run as ``python -m feedline``.

argparse only: the core depends on numpy alone, so the CLI must work on a bare install.

Each subcommand is an ``_add_*`` function, listed in ``SUBCOMMANDS``, that adds its parser and
sets ``handler``: a function taking the parsed arguments and returning the exit status.
A new subcommand is one more such function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import feedline
from feedline import demo

if TYPE_CHECKING:
    # Generic only in the type stubs; subscripting it at runtime fails on Python 3.10.
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]


def _run_demo(_args: argparse.Namespace) -> int:
    return demo.run_demo()


def _add_demo(subparsers: _SubParsers) -> None:
    questions = "\n".join(f"  {n}. {case.question}" for n, case in enumerate(demo.CASES, 1))
    parser = subparsers.add_parser(
        "demo",
        help='run and check the "does AUTOTUNE change my batch size?" cases',
        description=(
            "Build and run small pipelines live, print what they yield, and check it.\n"
            "Exits with status 1 if any check fails.\n\n"
            f"Cases:\n{questions}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=_run_demo)


SUBCOMMANDS: tuple[Callable[[_SubParsers], None], ...] = (_add_demo,)


def build_parser() -> argparse.ArgumentParser:
    # prog is fixed so usage reads "feedline" under ``python -m feedline`` too, not "__main__.py".
    parser = argparse.ArgumentParser(
        prog="feedline",
        description="feedline: tf.data-style input pipelines in pure Python and numpy.",
        epilog="Run 'feedline COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"feedline {feedline.__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the command, return its status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # No command is a usage error, but the full help is more useful than a one-line usage.
        parser.print_help(sys.stderr)
        return 2
    handler: Handler = args.handler
    return handler(args)
