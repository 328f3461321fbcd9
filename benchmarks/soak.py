"""`trainbus bench soak`: concurrent tiny runs with every consumer on one machine, for minutes.

Run from the repository root::

    trainbus bench soak --runs 6 --minutes 10
    trainbus bench soak --runs 2 --minutes 2 --cluster      # on a local 3-node cluster

It starts a bus (one embedded server, or ``--cluster``: three nodes), every service ``trainbus up``
starts (the audit gate, the exporter on a free port, the dashboard server once it is a
``trainbus.services`` entry, the predictor when configured), and ``--runs`` ``trainbus train``
subprocesses of the tiny config that would train far longer than the soak. Once every run has
started, for ``--minutes``, it samples every second each JetStream consumer's backlog (messages not
yet delivered or acknowledged) and every process's RSS; every ``--command-every`` seconds it sends a harmless command (``set logging_steps`` to the
value the run has) to one run. At the end it stops the runs with SIGTERM (they save, publish
``run.finished`` and flush) and checks every run's events. It prints, measured in this one run:

- consumer backlog p50/p99/max per consumer, and the exporter's own event-lag p99,
- RSS growth of each process from the end of the first minute (warm) to the end,
- commands answered / sent,
- events lost (gaps in a run's ``seq``) and stored twice: must be 0; runs that ended with events left in their outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import psutil
from nats.aio.client import Client as NATS

from benchmarks.common import log_tail, percentile
from benchmarks.failover import lost_and_twice, stored, trainer_argv
from consumers.control_client import build_command, send_command
from runtime.bus.cluster import LocalCluster, start_cluster
from runtime.bus.connect import BusTarget, connect, split_urls
from runtime.bus.server import RunningServer, start_server
from runtime.bus.stream import ensure_stream, last_event
from runtime.cli.up import service_commands, with_extra_args
from runtime.errors import ConfigError, TrainbusError
from runtime.logs import setup_logging
from runtime.settings import Settings, StreamSettings, load_config, packaged
from schemas import EVENTS_STREAM, event_subject

ISSUER = "bench-soak"
WARM_SECONDS = 60.0


def register(sub: Any) -> None:
    """Add ``soak`` to ``trainbus bench`` (entry point of the ``trainbus.benchmarks`` group)."""
    p = sub.add_parser("soak", help="concurrent runs and every consumer for minutes: lag, RSS growth, commands, loss")
    p.add_argument("--runs", type=int, default=6, help="concurrent trainers")
    p.add_argument("--minutes", type=float, default=10.0, help="how long they train")
    p.add_argument(
        "--config", default="configs/tiny.yaml", metavar="YAML", type=packaged, help="run config (default: %(default)s)"
    )
    p.add_argument("--cluster", action="store_true", help="on a local 3-node cluster instead of one server")
    p.add_argument("--command-every", type=float, default=5.0, metavar="SECONDS", help="seconds between commands")
    p.set_defaults(func=bench_soak)


@dataclass
class Samples:
    """What was sampled while the runs trained."""

    backlog: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    sent: int = 0
    answered: int = 0


def _rss(procs: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in procs.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return out


async def _sample(nc: NATS, samples: Samples, procs: dict[str, int], start: float) -> None:
    js = nc.jetstream(timeout=2)
    try:
        consumers = await js.consumers_info(EVENTS_STREAM)
    except (nats.errors.Error, TimeoutError):
        return  # a leader election: no sample this second
    for c in consumers:
        name = c.config.durable_name or "ephemeral"
        samples.backlog.setdefault(name, []).append((c.num_pending or 0) + (c.num_ack_pending or 0))
    for name, rss in _rss(procs).items():
        samples.rss.setdefault(name, []).append((time.monotonic() - start, rss))


async def _command(nc: NATS, samples: Samples, runs: list[str]) -> None:
    samples.sent += 1
    try:
        cmd = build_command("set", random.choice(runs), issued_by=ISSUER, settings=["logging_steps=10"])
        await send_command(nc, cmd, timeout=5.0)
        samples.answered += 1
    except (TrainbusError, nats.errors.Error):
        pass


async def soak(
    url: str, settings: Settings, runs: list[str], procs: dict[str, int], args: argparse.Namespace
) -> Samples:
    nc = await connect(BusTarget(split_urls(url), "bench"), settings, name="bench-soak")
    deadline = time.monotonic() + 300
    for run in runs:  # the soak starts once every trainer is live (answers commands)
        while await last_event(nc.jetstream(), event_subject(run, "run.started")) is None:
            if time.monotonic() > deadline:
                raise TrainbusError(f"run {run} did not start within 300 s")
            await asyncio.sleep(0.5)
    samples = Samples()
    start = time.monotonic()
    next_command = start + args.command_every
    try:
        while time.monotonic() - start < args.minutes * 60:
            await _sample(nc, samples, procs, start)
            if time.monotonic() >= next_command:
                next_command += args.command_every
                await _command(nc, samples, runs)
            await asyncio.sleep(1.0)
    finally:
        await nc.close()
    return samples


async def _check(url: str, settings: Settings, runs: list[str]) -> tuple[int, int, int]:
    nc = await connect(BusTarget(split_urls(url), "bench"), settings, name="bench-soak")
    try:
        events = [e for run in runs for e, _ in await stored(nc, run)]
    finally:
        await nc.close()
    lost, twice = lost_and_twice(events)
    return lost, twice, len(events)


async def _provision(url: str, settings: Settings, replicas: int) -> None:
    nc = await connect(BusTarget(split_urls(url), "bench"), settings, name="bench-soak")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                await ensure_stream(nc.jetstream(timeout=2), StreamSettings(replicas=replicas))
                return
            except TrainbusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


def _exporter_lag_p99(metrics_url: str | None) -> float | None:
    """p99 of ``trainbus_exporter_event_lag_seconds`` (publish → exporter), from its histogram buckets."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    buckets = [
        (float(le), float(v))
        for le, v in re.findall(r'trainbus_exporter_event_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', text)
    ]
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= 0.99 * total)


def bench_soak(args: argparse.Namespace) -> int:
    """Run the soak and print its figures."""
    if args.runs < 1 or args.minutes <= 0:
        raise ConfigError("--runs must be at least 1 and --minutes above 0")
    if not Path(args.config).is_file():
        raise ConfigError(f"--config: {args.config} is not a file")
    settings = load_config(Settings)
    setup_logging(settings.log.level, settings.log.format)
    stamp = time.strftime("%H%M%S")
    runs = [f"soak-{stamp}-{i}" for i in range(args.runs)]
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-soak-") as tmp:
        work = Path(tmp)
        bus: RunningServer | LocalCluster = (
            start_cluster(settings.server, work / "cluster", 3)
            if args.cluster
            else start_server(settings.server, work / "nats")
        )
        children: dict[str, subprocess.Popen[bytes]] = {}
        try:
            asyncio.run(_provision(bus.url, settings, 3 if args.cluster else 1))
            env = {**os.environ, "NATS_URL": bus.url, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            services = with_extra_args(
                service_commands(), ["exporter=--port 0"] if "exporter" in service_commands() else []
            )
            for name, argv in services.items():
                children[name] = subprocess.Popen(
                    argv, env=env, stdout=(work / f"{name}.out").open("wb"), stderr=(work / f"{name}.log").open("wb")
                )
            for run in runs:
                argv = trainer_argv(
                    args.config,
                    run,
                    work / run,
                    "training.max_steps=1000000",
                    "training.save_steps=200",
                    "training.eval_steps=200",
                )
                children[run] = subprocess.Popen(
                    argv, env=env, stdout=(work / f"{run}.log").open("wb"), stderr=subprocess.STDOUT
                )
            servers = {
                f"nats-server {i + 1}": pid
                for i, pid in enumerate(bus.pids if isinstance(bus, LocalCluster) else [bus.pid])
            }
            procs = {**{name: p.pid for name, p in children.items()}, **servers}
            samples = asyncio.run(soak(bus.url, settings, runs, procs, args))
            for run in runs:
                if children[run].poll() is not None:
                    raise TrainbusError(
                        f"run {run} exited early with {children[run].returncode}: {log_tail(work / f'{run}.log')}"
                    )
                children[run].send_signal(signal.SIGTERM)
            codes = {run: children[run].wait(300) for run in runs}
            metrics = next((line.split()[-1] for line in _lines(work / "exporter.out") if "serving http" in line), None)
            exporter_p99 = _exporter_lag_p99(metrics)
            lost, twice, total = asyncio.run(_check(bus.url, settings, runs))
            left = [run for run in runs if "still in" in (work / f"{run}.log").read_text(errors="replace")]
        finally:
            for child in children.values():
                if child.poll() is None:
                    child.terminate()
                    try:
                        child.wait(30)
                    except subprocess.TimeoutExpired:
                        child.kill()
            bus.stop()
    _report(args, samples, exporter_p99, lost, twice, total, codes, left)
    return 0


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def _report(
    args: argparse.Namespace,
    s: Samples,
    exporter_p99: float | None,
    lost: int,
    twice: int,
    total: int,
    codes: dict[str, int],
    left: list[str],
) -> None:
    where = "a local 3-node cluster" if args.cluster else "one embedded server"
    print(
        f"soak: {args.runs} runs of {args.config} for {args.minutes:g} min on {where}, with {', '.join(sorted({n for n in s.rss if not n.startswith(('soak-', 'nats-server'))}) or ['no consumers'])}"
    )
    print("  consumer backlog (messages not yet delivered or acked), sampled every second:")
    for name, values in sorted(s.backlog.items()):
        print(
            f"    {name:<24} p50 {percentile(values, 0.5):>6}  p99 {percentile(values, 0.99):>6}  max {max(values):>6}"
        )
    if exporter_p99 is not None:
        print(f"    exporter event lag p99 (publish → /metrics state) <= {exporter_p99:g} s")
    print(f"  RSS growth from {WARM_SECONDS:.0f} s to the end:")
    for name, points in sorted(s.rss.items()):
        warm = [rss for t, rss in points if t >= WARM_SECONDS] or [rss for _, rss in points]
        print(
            f"    {name:<24} {warm[0] / 2**20:8.1f} MiB → {points[-1][1] / 2**20:8.1f} MiB  ({(points[-1][1] - warm[0]) / 2**20:+.1f} MiB)"
        )
    print(f"  commands answered / sent     {s.answered} / {s.sent}")
    print(
        f"  events lost / stored twice   {lost} / {twice}   (of {total}; trainers exited {sorted(set(codes.values()))})"
    )
    print(f"  runs with events left in their outbox: {', '.join(left) if left else 'none'}")
