"""The ``trainbus`` command line.

Every command module registers its own subcommand through the ``trainbus.commands`` entry-point
group (pyproject.toml): the bus-level ones in ``runtime.cli``, the trainer's, the consumers' and the
dashboard's in their packages, so this module imports none of them. A user mistake prints one line
and exits 2; an unreachable bus exits 3; a reader of stdout that goes away ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from runtime.errors import TrainbusError
from runtime.logs import setup_logging


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(
            2, f"trainbus {self.prog.partition(' ')[2]}: {message} (see --help)\n".replace("trainbus : ", "trainbus: ")
        )


def build_parser() -> argparse.ArgumentParser:
    """The full parser: every command registered in the ``trainbus.commands`` group."""
    parser = _Parser(prog="trainbus", description="Fine-tuning runs as typed event streams on NATS JetStream.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for ep in sorted(entry_points(group="trainbus.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trainbus`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE pairs may follow options (`ctl set --run r lr=1e-5`); anything else is a mistake
        if getattr(args, "values", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
            args.values = [*args.values, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging()  # stderr, until the command sets its own level: stdout is for the command's output
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
        return code
    except BrokenPipeError:
        return reader_gone()
    except TrainbusError as exc:
        print(f"trainbus {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"trainbus {args.command}: interrupted", file=sys.stderr)
        return 130


def reader_gone() -> int:
    """The reader of stdout went away (``trainbus events … | head -3``): end quietly, as Unix tools do.

    What is still buffered goes nowhere, so the interpreter's flush at exit raises nothing either;
    the status is the shell's for a process that a SIGPIPE ended (128 + 13).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
