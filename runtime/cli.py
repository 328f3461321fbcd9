"""The ``trainbus`` command line: one table from command name to function.

Bus-level commands live in ``runtime.commands``; the trainer, the consumers and the dashboards
add theirs through the ``trainbus.commands`` entry-point group (see pyproject.toml), so this
layer never imports them. A user mistake prints one line and exits 2; an unreachable bus exits 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from runtime import commands, demo, history
from runtime.errors import TrainbusError

Register = Callable[[Any], None]

CORE: dict[str, Register] = {
    "up": commands.register_up,
    "nats": commands.register_nats,
    "events": history.register_events,
    "runs": history.register_runs,
    "tag": history.register_tag,
    "note": history.register_note,
    "schema": commands.register_schema,
    "bench": commands.register_bench,
    "demo": demo.register_demo,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(
            2, f"trainbus {self.prog.partition(' ')[2]}: {message} (see --help)\n".replace("trainbus : ", "trainbus: ")
        )


def build_parser() -> argparse.ArgumentParser:
    """The full parser: core commands plus every registered plugin command."""
    parser = _Parser(prog="trainbus", description="Fine-tuning runs as typed event streams on NATS JetStream.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for register in CORE.values():
        register(sub)
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
    try:
        return int(args.func(args) or 0)
    except TrainbusError as exc:
        print(f"trainbus {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"trainbus {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
