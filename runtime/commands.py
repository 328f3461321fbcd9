"""Bus-level commands of the CLI: up, nats, status, outbox, schema export, bench (events and runs: ``runtime.history``)."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from runtime.errors import TrainbusError
from runtime.liveness import STALL_AFTER_SECONDS
from runtime.logs import setup_logging
from runtime.settings import Settings, load_config
from schemas import check_run_id
from schemas.export import json_schemas

Sub = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_settings_args(
    p: argparse.ArgumentParser, config_help: str = "settings YAML (bus, stream, server, log)"
) -> None:
    """``--config`` and repeatable ``--set key=value`` on a subcommand."""
    p.add_argument("--config", metavar="YAML", help=config_help)
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override a setting, e.g. bus.url=nats://host:4222",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """Load ``Settings`` from the command's ``--config``/``--set`` and set up logging."""
    settings = load_config(Settings, getattr(args, "config", None), getattr(args, "overrides", []))
    setup_logging(settings.log.level, settings.log.format)
    return settings


def run_id_arg(value: str) -> str:
    """argparse ``type=`` for a run id: a bad one is a usage error naming the rule."""
    try:
        return check_run_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds_arg(value: str) -> float:
    """argparse ``type=`` for a positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds


def add_stall_after_arg(p: argparse.ArgumentParser) -> None:
    """``--stall-after SECONDS``: when a live run whose trainer went silent is shown as stalled."""
    p.add_argument(
        "--stall-after",
        type=seconds_arg,
        default=STALL_AFTER_SECONDS,
        metavar="SECONDS",
        help=f"show a live run as stalled after this long without a trainer event (default {STALL_AFTER_SECONDS:.0f})",
    )


# ---- up / nats / status / outbox ---------------------------------------------------------


def register_up(sub: Any) -> None:
    p = sub.add_parser("up", help="run the local bus and every consumer in the foreground (Ctrl-C stops all)")
    add_settings_args(p)
    add_cluster_arg(p)
    p.add_argument("--no-services", action="store_true", help="start only the nats-server")
    p.add_argument(
        "--service-args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="extra arguments for one consumer, e.g. exporter='--port 9465' (repeatable)",
    )
    p.set_defaults(func=_cmd_up)


def register_nats(sub: Any) -> None:
    p = sub.add_parser("nats", help="run only the local nats-server with JetStream in the foreground")
    add_settings_args(p)
    add_cluster_arg(p)
    p.set_defaults(func=_cmd_up, no_services=True, service_args=[])


def add_cluster_arg(p: argparse.ArgumentParser) -> None:
    """``--cluster N``: N JetStream nodes on loopback instead of one server."""
    p.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="run a local JetStream cluster of N nodes (at least 3) instead of one server",
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from runtime.up import cmd_up  # runtime.up uses this module's helpers

    return cmd_up(args)


def register_status(sub: Any) -> None:
    p = sub.add_parser("status", help="the bus: its servers, the stream's replicas and leader, the buckets")
    p.add_argument("--json", action="store_true", help="one JSON object")
    add_settings_args(p)
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from runtime.status import cmd_status

    return cmd_status(args)


def register_outbox(sub: Any) -> None:
    p = sub.add_parser("outbox", help="events a run could not send yet")
    inner = p.add_subparsers(dest="outbox_command", required=True, metavar="ACTION", parser_class=type(p))
    f = inner.add_parser("flush", help="send the outboxes runs left behind (all runs, or RUN)")
    f.add_argument("run", nargs="?", type=run_id_arg, help="only this run")
    f.add_argument(
        "--dir", default="runs", metavar="DIR", help="where the runs are (training.output_dir; default runs)"
    )
    add_settings_args(f)
    f.set_defaults(func=_cmd_outbox_flush)


def _cmd_outbox_flush(args: argparse.Namespace) -> int:
    from runtime.outboxes import cmd_outbox_flush

    return cmd_outbox_flush(args)


def service_commands() -> dict[str, list[str]]:
    """Consumers that `trainbus up` runs, from the ``trainbus.services`` entry-point group.

    A service whose function returns no command is off (the predictor, until its config names a run).
    """
    found = {ep.name: list(ep.load()()) for ep in sorted(entry_points(group="trainbus.services"), key=lambda e: e.name)}
    return {name: argv for name, argv in found.items() if argv}


# ---- schema / bench ----------------------------------------------------------------------


def register_schema(sub: Any) -> None:
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


def register_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks that print measured figures")
    inner = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT", parser_class=type(p))
    b = inner.add_parser("bus", help="acked events/s through the trainer's publisher; publish→subscriber latency")
    b.add_argument("--events", type=int, default=50_000, help="events for the throughput run")
    b.add_argument("--rate", type=int, default=1_000, help="events/s for the latency run")
    b.add_argument("--seconds", type=float, default=5.0, help="duration of the latency run")
    b.set_defaults(func=_bench_bus)
    for ep in sorted(entry_points(group="trainbus.benchmarks"), key=lambda e: e.name):
        ep.load()(inner)


def _bench_bus(args: argparse.Namespace) -> int:
    from runtime.bench import bench_bus

    return bench_bus(args)
