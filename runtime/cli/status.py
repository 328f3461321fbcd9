"""`trainbus status`: where the bus is, its servers, and how the stream and buckets are replicated.

    trainbus status          # servers, the stream's replicas and leader, each replica's state
    trainbus status --json   # the same as one JSON object

Read-only (a viewer may run it). Servers come from the connected server's INFO (its cluster's
client URLs); replicas, leader and each follower's lag from JetStream's stream info.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from runtime.bus.connect import LOCAL, BusTarget, bus_target, connected
from runtime.bus.server import read_state_record
from runtime.cli.args import add_settings_args, settings_from
from runtime.settings import Settings, redact_url
from schemas import EVENTS_STREAM
from schemas.subjects import CHECKPOINTS_BUCKET

STREAMS = (EVENTS_STREAM, f"KV_{CHECKPOINTS_BUCKET}", "TRAINBUS_AUDIT")
"""The streams trainbus keeps: events, the checkpoint bucket, the audit gate's partitions."""


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="the bus: its servers, the stream's replicas and leader, the buckets")
    p.add_argument("--json", action="store_true", help="one JSON object")
    add_settings_args(p)
    p.set_defaults(func=cmd_status)


async def stream_status(js: JetStreamContext, name: str) -> dict[str, Any] | None:
    """Replicas, leader, each follower's state and the stored totals of stream ``name`` (None: no such stream)."""
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return None
    cluster = info.cluster
    peers = [
        {"name": p.name, "current": bool(p.current), "offline": bool(p.offline), "lag": p.lag or 0}
        for p in (cluster.replicas or [] if cluster else [])
    ]
    return {
        "name": name,
        "replicas": info.config.num_replicas or 1,
        "leader": cluster.leader if cluster else None,
        "followers": peers,
        "messages": info.state.messages,
        "bytes": info.state.bytes,
        "first_seq": info.state.first_seq,
        "last_seq": info.state.last_seq,
        "max_bytes": info.config.max_bytes,
        "max_age_seconds": info.config.max_age,
    }


async def gather(target: BusTarget, settings: Settings) -> dict[str, Any]:
    """Everything `trainbus status` shows, as plain data."""
    async with connected(target, settings, name="trainbus-status") as nc:
        info: dict[str, Any] = getattr(nc, "_server_info", None) or {}  # nats-py keeps INFO only privately
        js = nc.jetstream(timeout=3.0)
        streams = await asyncio.gather(*(stream_status(js, name) for name in STREAMS), return_exceptions=True)
    urls = [f"nats://{u}" if "://" not in u else u for u in info.get("connect_urls") or []] or list(target.servers)
    local = read_state_record(Path(settings.state_dir)) if target.origin == LOCAL else None
    nodes = {n["url"]: n for n in (local or {}).get("nodes", [])}
    return {
        "bus": {"servers": target.display, "found_via": target.origin},
        "connected": {"name": info.get("server_name"), "version": info.get("version"), "cluster": info.get("cluster")},
        "servers": [
            {"url": redact_url(u), "name": nodes.get(u, {}).get("name"), "pid": nodes.get(u, {}).get("pid")}
            for u in urls
        ],
        "streams": [_settled(name, s) for name, s in zip(STREAMS, streams, strict=True) if s is not None],
    }


def _settled(name: str, result: dict[str, Any] | BaseException) -> dict[str, Any]:
    if isinstance(result, BaseException):
        why = (
            "no answer (no leader yet?)" if isinstance(result, TimeoutError | nats.errors.TimeoutError) else str(result)
        )
        return {"name": name, "error": why}
    return result


def render(status: dict[str, Any]) -> str:
    """The human-readable report."""
    c = status["connected"]
    lines = [
        f"bus        {status['bus']['servers']} ({status['bus']['found_via']})",
        f"connected  {c['name']} (nats-server {c['version']}" + (f", cluster {c['cluster']})" if c["cluster"] else ")"),
        f"servers    {len(status['servers'])}",
    ]
    for server in status["servers"]:
        extra = ", ".join(f"{k} {server[k]}" for k in ("name", "pid") if server[k] is not None)
        lines.append(f"           {server['url']}" + (f" ({extra})" if extra else ""))
    if not status["streams"]:
        lines.append("streams    none yet: the first trainer or `trainbus up` creates them")
    for s in status["streams"]:
        if "error" in s:
            lines.append(f"stream     {s['name']}: {s['error']}")
            continue
        leader = f", leader {s['leader']}" if s["leader"] else ""
        lines.append(
            f"stream     {s['name']}: {s['replicas']} replica{'s' if s['replicas'] > 1 else ''}{leader}; {s['messages']} messages, {s['bytes']} bytes"
        )
        for peer in s["followers"]:
            state = (
                "offline"
                if peer["offline"]
                else "current"
                if peer["current"]
                else f"catching up ({peer['lag']} behind)"
            )
            lines.append(f"             {peer['name']}: {state}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with bus_target(settings) as target:
        status = asyncio.run(gather(target, settings))
    print(json.dumps(status) if args.json else render(status))
    return 0
