"""`trainbus up` and `trainbus nats`: the folder's bus (one server, or a local cluster) and its consumers.

The bus keeps its port across restarts (``runtime.bus.server``), is recorded in
``<state_dir>/bus.json`` for the other commands of the folder, and is provisioned as admin: the
events stream, the checkpoint bucket, the launch queue (its stream, consumers, job and agent
buckets) and the checkpoint files' object store, with 3 replicas on a cluster. With a roles config
(``server.config_file=configs/nats/roles.conf``) each consumer runs under its own role, with the
password from ``TRAINBUS_<ROLE>_PASSWORD``; ``up`` itself provisions as ``admin``
(``TRAINBUS_ADMIN_PASSWORD``) unless ``NATS_USER``/``NATS_TOKEN``/… name someone else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import nats.errors
import nats.js.errors

from runtime.bus.cluster import LocalCluster, start_cluster
from runtime.bus.connect import BusTarget, Credentials, connect, resolve_target, split_urls
from runtime.bus.objects import checkpoint_store
from runtime.bus.server import RunningServer, clear_state, read_state, start_server, write_state
from runtime.bus.stream import auto_replicas, cluster_size, ensure_bucket, ensure_stream
from runtime.cli.args import add_cluster_arg, add_settings_args, settings_from
from runtime.errors import BusUnavailable, ConfigError, TrainbusError
from runtime.launch.queue import ensure_queue
from runtime.settings import Settings, StreamSettings
from schemas.subjects import CHECKPOINTS_BUCKET

SERVICE_ROLES = {
    "audit": "auditor",
    "exporter": "viewer",
    "predict": "predictor",
    "dashboard": "operator",
    "agent": "agent",
}
"""The role each service `up` starts runs as on a server with roles (the dashboard sends commands and
submits jobs too; the agent's trainers connect as trainer); any other service: viewer (read-only)."""
CREDENTIAL_VARIABLES = ("NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS", "NATS_NKEY")
READY_TIMEOUT = 30.0
"""Seconds a new cluster gets to elect its JetStream leader."""


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
    p.set_defaults(func=cmd_up)


def register_nats(sub: Any) -> None:
    p = sub.add_parser("nats", help="run only the local nats-server with JetStream in the foreground")
    add_settings_args(p)
    add_cluster_arg(p)
    p.set_defaults(func=cmd_up, no_services=True, service_args=[])


def register_provision(sub: Any) -> None:
    help = "as admin, create the streams and buckets on a bus you run yourself (up does it for its own)"
    p = sub.add_parser("provision", help=help)
    add_settings_args(p)
    p.set_defaults(func=cmd_provision)


def cmd_provision(args: argparse.Namespace) -> int:
    """What `up` creates, on the bus ``NATS_URL`` (or ``bus.url``, or the folder's bus) names; never
    starts a server (one that stops with the command would keep nothing)."""
    settings = settings_from(args)
    target = resolve_target(settings, announce=False, start=False)
    replicas = asyncio.run(provision(target, settings))
    print(
        f"trainbus: provisioned {target.display}: the events stream, the checkpoint bucket, the launch queue and "
        f"the checkpoint files, with {replicas} replica{'s' if replicas > 1 else ''}"
    )
    return 0


def service_commands() -> dict[str, list[str]]:
    """Consumers that `trainbus up` runs, from the ``trainbus.services`` entry-point group.

    A service whose function returns no command is off (the predictor, until its config names a run).
    """
    found = {ep.name: list(ep.load()()) for ep in sorted(entry_points(group="trainbus.services"), key=lambda e: e.name)}
    return {name: argv for name, argv in found.items() if argv}


def role_password(role: str, environ: Mapping[str, str]) -> str | None:
    """``TRAINBUS_<ROLE>_PASSWORD``, when set."""
    return environ.get(f"TRAINBUS_{role.upper()}_PASSWORD") or None


def admin_credentials(environ: Mapping[str, str]) -> Credentials:
    """Who `up` provisions as: the NATS_* variables when they name someone, else ``admin`` when its password is set."""
    if any(environ.get(var) for var in CREDENTIAL_VARIABLES):
        return Credentials.from_env(environ)
    password = role_password("admin", environ)
    return Credentials(user="admin", password=password) if password else Credentials()


def service_env(name: str, url: str, environ: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The environment of service ``name`` on the bus at ``url``, and the role it runs as (None: as `up`'s user)."""
    env = {**environ, "NATS_URL": url}
    role = SERVICE_ROLES.get(name, "viewer")
    password = role_password(role, environ)
    if password is None:
        return env, None
    for var in CREDENTIAL_VARIABLES:
        env.pop(var, None)
    env.update(NATS_USER=role, NATS_PASSWORD=password)
    return env, role


def with_extra_args(services: dict[str, list[str]], items: list[str]) -> dict[str, list[str]]:
    """``services`` with each ``NAME=ARGS`` of ``--service-args`` appended to that service's command."""
    out = {name: list(argv) for name, argv in services.items()}
    for item in items:
        name, sep, extra = item.partition("=")
        if not sep or name not in out:
            raise ConfigError(
                f"--service-args {item!r}: expected NAME=ARGS with NAME one of {', '.join(out) or '(none)'}"
            )
        out[name] += shlex.split(extra)
    return out


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    state_dir = Path(settings.state_dir)
    existing = read_state(state_dir)
    if existing:
        raise TrainbusError(f"a local bus is already running for {state_dir.resolve()} at {existing}")
    size = args.cluster or 0
    services = {} if args.no_services else with_extra_args(service_commands(), args.service_args)
    bus: RunningServer | LocalCluster = (
        start_cluster(settings.server, state_dir / "cluster", size)
        if size
        else start_server(settings.server, state_dir / "nats")
    )
    children: dict[str, subprocess.Popen[bytes]] = {}
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        replicas = asyncio.run(provision(BusTarget(split_urls(bus.url), "trainbus up"), settings, cluster=size > 0))
        _record(state_dir, bus)
        _announce(bus, replicas)
        if not args.no_services:
            for name, argv in services.items():
                env, role = service_env(name, bus.url, os.environ)
                children[name] = subprocess.Popen(argv, env=env)
                who = f" as {role}" if role else ""
                print(f"trainbus: started {name}{who} (pid {children[name].pid}): {' '.join(argv)}", flush=True)
        print("trainbus: other trainbus commands in this folder use this bus; Ctrl-C stops everything", flush=True)
        _supervise(bus, children, state_dir)
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
        bus.stop()


def _record(state_dir: Path, bus: RunningServer | LocalCluster) -> None:
    if isinstance(bus, LocalCluster):
        write_state(state_dir, bus.url, bus.pids, nodes=bus.describe())
    else:
        write_state(state_dir, bus.url, [bus.pid])


def _announce(bus: RunningServer | LocalCluster, replicas: int) -> None:
    if isinstance(bus, LocalCluster):
        print(
            f"trainbus: JetStream cluster of {len(bus.nodes)} nodes listening at {bus.url} "
            f"(stream and buckets with {replicas} replicas; stores under {bus.nodes[0].store_dir.parent})",
            flush=True,
        )
        moved = bus.moved
    else:
        print(
            f"trainbus: nats-server with JetStream listening at {bus.url} (store {bus.store_dir / 'jetstream'})",
            flush=True,
        )
        moved = bus.moved_from is not None
    if moved:
        print(
            "trainbus: the bus's remembered port was taken, so it listens on a new one; "
            "trainers and consumers started from this folder follow it",
            file=sys.stderr,
            flush=True,
        )


def _supervise(
    bus: RunningServer | LocalCluster, children: dict[str, subprocess.Popen[bytes]], state_dir: Path
) -> NoReturn:
    """Until Ctrl-C: report consumers that exit; restart a cluster node that dies (it rejoins and
    catches up); a lone server that dies ends `up`."""
    while True:
        if isinstance(bus, LocalCluster):
            for name in bus.revive():
                _record(state_dir, bus)
                print(f"trainbus: cluster node {name} exited; restarted it (it catches up from the others)", flush=True)
        elif bus.process.poll() is not None:
            raise TrainbusError(f"nats-server exited with {bus.process.returncode} (log: {bus.log_path})")
        for name, child in list(children.items()):
            if child.poll() is not None:
                print(f"trainbus: {name} exited with {child.returncode}", file=sys.stderr, flush=True)
                del children[name]
        time.sleep(0.5)


async def provision(target: BusTarget, settings: Settings, *, cluster: bool | None = None) -> int:
    """Create, as admin, what the other users may only use: the events stream, the checkpoint
    bucket, the launch queue and the checkpoint files' object store; returns their replicas (3 on a
    cluster unless ``stream.replicas`` says otherwise). ``cluster``: whether `up` started a cluster
    (its size is known, not guessed from INFO); None for a bus `up` did not start, whose INFO says."""
    nc = await connect(target, settings, name="trainbus-up", credentials=admin_credentials(os.environ))
    try:
        if cluster is None:
            cluster = cluster_size(nc) > 1
            replicas = settings.stream.replicas or auto_replicas(nc, None)
        else:
            replicas = settings.stream.replicas or (3 if cluster else 1)
        js = nc.jetstream(timeout=2.0)
        if cluster:
            await _jetstream_ready(js)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                await _create(js, settings.stream.model_copy(update={"replicas": replicas}))
                return replicas
            except BusUnavailable:
                # a node that has not joined yet makes R3 "insufficient resources"; a restarted
                # cluster answers for a stream only once that stream has elected its leader again
                if not cluster or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _create(js: nats.js.JetStreamContext, limits: StreamSettings) -> None:
    """Each stream and bucket where missing, with ``limits.replicas``."""
    replicas = limits.replicas or 1
    await ensure_stream(js, limits)
    await ensure_bucket(js, CHECKPOINTS_BUCKET, replicas, history=5, description="checkpoints the trainbus audit gate approved")  # fmt: skip
    await ensure_queue(js, limits)
    await checkpoint_store(js, limits.objects_max_bytes, replicas)


async def _jetstream_ready(js: nats.js.JetStreamContext) -> None:
    """Wait until the new cluster has elected its JetStream meta leader (requests time out until then)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            await js.account_info()
            return
        except (
            TimeoutError,
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.ServiceUnavailableError,
        ):
            if time.monotonic() > deadline:
                raise BusUnavailable(f"the cluster elected no JetStream leader within {READY_TIMEOUT:.0f}s") from None
            await asyncio.sleep(0.2)
