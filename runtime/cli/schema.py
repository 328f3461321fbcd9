"""`trainbus schema export DIR`: the JSON Schema of every event and command, for clients in other languages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runtime.errors import TrainbusError
from schemas.export import json_schemas


def register(sub: Any) -> None:
    p = sub.add_parser("schema", help="the event and command contract")
    inner = p.add_subparsers(dest="schema_command", required=True, metavar="ACTION")
    e = inner.add_parser("export", help="write one JSON Schema per event and command type, plus both unions")
    e.add_argument("dir", type=Path, help="output folder (created)")
    e.set_defaults(func=cmd_schema_export)


def cmd_schema_export(args: argparse.Namespace) -> int:
    out: Path = args.dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        schemas = json_schemas()
        for name, schema in schemas.items():
            (out / name).write_text(json.dumps(schema, indent=2) + "\n")
    except OSError as exc:
        raise TrainbusError(f"{out}: cannot write: {exc.strerror}") from None
    print(f"wrote {len(schemas)} JSON Schemas to {out}")
    return 0
