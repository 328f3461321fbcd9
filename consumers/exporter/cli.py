"""`trainbus exporter`: every run's events in, Prometheus metrics out on ``/metrics``.

    trainbus exporter                 # http://127.0.0.1:9464/metrics
    trainbus exporter --port 0        # a free port; the first stdout line says which

On every start it replays the whole ``TRAINBUS_EVENTS`` stream, then follows live events, so a
restart rebuilds the same counters; counting is idempotent by event_id. A run whose trainer
went silent shows as ``stalled`` after ``--stall-after`` seconds; any run drops out of
``/metrics`` ``--expire-after`` seconds after its last event. The audit rules of ``--rules``
(the audit gate's file) give the ``trainbus_audit_flags_total`` series that exist at 0.
`trainbus up` and `make demo` run it as a service (see ``service``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import sys
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIServer

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, start_http_server

from consumers.audit.cli import default_rules
from consumers.audit.rules import AuditConfig, load_rules
from consumers.exporter.collector import RunCollector, build_registry
from consumers.exporter.state import ExporterState, count_invalid, count_newer, expire, handle
from runtime.bus.connect import BusTarget, bus_target, connect
from runtime.bus.consume import consume
from runtime.bus.stream import Delivered, ensure_stream
from runtime.cli.args import add_settings_args, add_stall_after_arg, seconds_arg, settings_from
from runtime.errors import ConfigError
from runtime.lifecycle import STALL_AFTER_SECONDS
from runtime.logs import get_logger
from runtime.settings import Settings
from schemas import EVENTS_STREAM

DEFAULT_PORT = 9464
DEFAULT_EXPIRE_AFTER = 3600.0


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535; 0 picks a free one)")
    return port


def register_exporter(sub: Any) -> None:
    p = sub.add_parser("exporter", help="serve every run's metrics for Prometheus on /metrics")
    p.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT}; 0: any free port)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a remote Prometheus)"
    )
    p.add_argument(
        "--expire-after",
        type=seconds_arg,
        default=DEFAULT_EXPIRE_AFTER,
        metavar="SECONDS",
        help=f"drop a run from /metrics this long after its last event (default {DEFAULT_EXPIRE_AFTER:.0f})",
    )
    add_stall_after_arg(p)
    p.add_argument(
        "--rules", default=None, metavar="YAML", help="the audit gate's rules file (default: configs/audit.yaml)"
    )
    add_settings_args(p)
    p.set_defaults(func=cmd_exporter)


def service() -> list[str]:
    """The command `trainbus up` runs for this consumer."""
    return [sys.executable, "-m", "runtime.cli", "exporter"]


class Exporter:
    """The state, the lock shared with the HTTP thread, and the handlers the consumer loop calls."""

    def __init__(
        self,
        expire_after: float = DEFAULT_EXPIRE_AFTER,
        stall_after: float = STALL_AFTER_SECONDS,
        rules: AuditConfig | None = None,
    ) -> None:
        self.state = ExporterState()
        self.lock = threading.Lock()
        self.expire_after = expire_after
        audit_rules = [(name, rule.severity) for name, rule in rules.rules.enabled().items()] if rules else []
        self.collector = RunCollector(
            self.state, self.lock, expire_after=expire_after, stall_after=stall_after, audit_rules=audit_rules
        )
        self.registry: CollectorRegistry = build_registry(self.collector)
        self.backlog_end = 0
        self.log = get_logger(component="exporter")

    def start_replay(self, backlog_end: int) -> None:
        """Events up to stream sequence ``backlog_end`` are history: their lag is not observed."""
        self.backlog_end = backlog_end
        if backlog_end == 0:
            self._caught_up(0)

    def _caught_up(self, seq: int) -> None:
        if not self.state.caught_up:
            self.state.caught_up = True
            self.log.info("replayed the stream; following live events", stream_seq=seq, runs=len(self.state.runs))

    async def on_event(self, item: Delivered) -> None:
        if item.event is None:
            return
        seen_at = time.time()
        with self.lock:
            handle(item.event, self.state)
            if item.stream_seq > self.backlog_end:
                self.state.lag.observe(seen_at - item.event.time.timestamp())
            if item.stream_seq >= self.backlog_end:
                self._caught_up(item.stream_seq)

    def on_invalid(self, item: Delivered) -> None:
        with self.lock:
            count_invalid(self.state)
            if item.stream_seq >= self.backlog_end:
                self._caught_up(item.stream_seq)

    def on_newer(self, item: Delivered) -> None:
        with self.lock:
            count_newer(self.state)
            if item.stream_seq >= self.backlog_end:
                self._caught_up(item.stream_seq)

    def prune(self, now: float | None = None) -> list[str]:
        """Expire runs silent for ``expire_after`` now (scrapes do too); returns the run ids dropped."""
        with self.lock:
            gone = expire(self.state, time.time() if now is None else now, self.expire_after)
        if gone:
            self.log.info("runs without events expired", runs=gone)
        return gone


def serve_http(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``registry`` on ``http://host:port/metrics`` in a daemon thread."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: address already in use") from None
        raise ConfigError(f"--host {host} --port {port}: cannot listen: {exc.strerror or exc}") from None
    return server


def metrics_url(host: str, port: int) -> str:
    """The URL to scrape (an any-address bind is shown as 127.0.0.1)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
    return f"http://{shown}:{port}/metrics"


async def _backlog_end(js: JetStreamContext, settings: Settings) -> int:
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        await ensure_stream(js, settings.stream)
        return 0
    # An empty stream (all aged out) has nothing to replay even when its last_seq is not 0.
    return int(info.state.last_seq or 0) if info.state.messages else 0


async def follow(target: BusTarget, settings: Settings, exporter: Exporter, stop: asyncio.Event) -> None:
    """Replay the stream into ``exporter``, then follow it until ``stop``; a broken consumer replays again."""
    log = exporter.log
    nc = await connect(target, settings, name="trainbus-exporter", log=log)
    log.info("exporter connected", servers=target.display)
    pruner = asyncio.ensure_future(_prune_every(exporter, stop, min(60.0, exporter.expire_after)))
    try:
        js = nc.jetstream()
        while not stop.is_set():
            try:
                exporter.start_replay(await _backlog_end(js, settings))
                await consume(
                    js,
                    exporter.on_event,
                    durable=None,
                    stop=stop,
                    on_invalid=exporter.on_invalid,
                    on_newer=exporter.on_newer,
                )
            except (nats.errors.Error, TimeoutError) as exc:
                # Replaying again is safe: events already counted are recognised by event_id.
                log.warning("consumer failed; replaying the stream again", error=str(exc) or type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        pruner.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)


async def _prune_every(exporter: Exporter, stop: asyncio.Event, seconds: float) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        exporter.prune()


async def _main(target: BusTarget, settings: Settings, exporter: Exporter) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await follow(target, settings, exporter, stop)


def cmd_exporter(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    rules = load_rules(args.rules or default_rules())
    exporter = Exporter(expire_after=args.expire_after, stall_after=args.stall_after, rules=rules)
    server = serve_http(exporter.registry, args.host, args.port)
    url = metrics_url(args.host, server.server_port)
    print(f"trainbus exporter: serving {url}", flush=True)
    exporter.log.debug("exporter serving", url=url, expire_after=args.expire_after)  # stdout already says it
    try:
        with bus_target(settings) as target:
            asyncio.run(_main(target, settings, exporter))
    finally:
        server.shutdown()
        server.server_close()
    return 0
