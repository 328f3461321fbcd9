"""`trainbus bench NAME`: the benchmarks of the ``benchmarks`` package, found through the
``trainbus.benchmarks`` entry-point group (pyproject.toml). Each module only declares its arguments
at import; what it measures (torch, the model, a server) loads when that benchmark runs."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks that print measured figures")
    inner = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT", parser_class=type(p))
    for ep in sorted(entry_points(group="trainbus.benchmarks"), key=lambda e: e.name):
        ep.load()(inner)
