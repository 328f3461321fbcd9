"""Bus-level commands of the CLI: up, nats, schema export, bench (events and runs: ``runtime.history``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import Any

from runtime.bus import connect
from runtime.errors import TrainbusError
from runtime.liveness import STALL_AFTER_SECONDS
from runtime.logs import setup_logging
from runtime.natsserver import clear_state, read_state, start_server, write_state
from runtime.settings import Settings, load_config
from runtime.stream import ensure_stream
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


# ---- up / nats ---------------------------------------------------------------------------


def register_up(sub: Any) -> None:
    p = sub.add_parser("up", help="run the local bus and every consumer in the foreground (Ctrl-C stops all)")
    add_settings_args(p)
    p.add_argument("--no-services", action="store_true", help="start only the nats-server")
    p.set_defaults(func=cmd_up, services=True)


def register_nats(sub: Any) -> None:
    p = sub.add_parser("nats", help="run only the local nats-server with JetStream in the foreground")
    add_settings_args(p)
    p.set_defaults(func=cmd_up, services=False, no_services=True)


def service_commands() -> dict[str, list[str]]:
    """Consumers that `trainbus up` runs, from the ``trainbus.services`` entry-point group.

    A service whose function returns no command is off (the predictor, until its config names a run).
    """
    found = {ep.name: list(ep.load()()) for ep in sorted(entry_points(group="trainbus.services"), key=lambda e: e.name)}
    return {name: argv for name, argv in found.items() if argv}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    state_dir = Path(settings.state_dir)
    existing = read_state(state_dir)
    if existing:
        raise TrainbusError(f"a local bus is already running for {state_dir.resolve()} at {existing}")
    server = start_server(settings.server, state_dir / "nats")
    children: dict[str, subprocess.Popen[bytes]] = {}
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        asyncio.run(_provision(server.url, settings))
        write_state(state_dir, server.url, server.pid)
        print(
            f"trainbus: nats-server with JetStream listening at {server.url} (store {server.store_dir / 'jetstream'})",
            flush=True,
        )
        if args.services and not args.no_services:
            env = {**os.environ, "NATS_URL": server.url}
            for name, argv in service_commands().items():
                children[name] = subprocess.Popen(argv, env=env)
                print(f"trainbus: started {name} (pid {children[name].pid}): {' '.join(argv)}", flush=True)
        print("trainbus: other trainbus commands in this folder use this bus; Ctrl-C stops everything", flush=True)
        while server.process.poll() is None:
            for name, child in list(children.items()):
                if child.poll() is not None:
                    print(f"trainbus: {name} exited with {child.returncode}", file=sys.stderr, flush=True)
                    del children[name]
            time.sleep(0.5)
        raise TrainbusError(f"nats-server exited with {server.process.returncode} (log: {server.log_path})")
    except KeyboardInterrupt:
        print("\ntrainbus: stopping", flush=True)
        return 0
    finally:
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        clear_state(state_dir)
        server.stop()


async def _provision(url: str, settings: Settings) -> None:
    from runtime.bus import BusTarget

    nc = await connect(BusTarget([url], "embedded"), settings, name="trainbus-up")
    try:
        await ensure_stream(nc.jetstream(), settings.stream)
    finally:
        await nc.close()


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
