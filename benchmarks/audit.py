"""`trainbus bench audit`: latency from a train.step publish to the audit.flag it causes.

Starts an embedded nats-server in a temporary folder and the real `trainbus audit` process on it,
then publishes train.step events at a fixed rate through the trainer's publisher, every other
one with a NaN loss (so each opens a new non_finite episode), and times publish -> flag received.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from benchmarks.common import percentile, trainer_sink
from runtime.bus.connect import BusTarget, connect, round_trip
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.errors import TrainbusError
from runtime.publish.sinks import Stamper
from runtime.settings import Settings, packaged
from schemas import AuditFlag, TrainStep, event_subject, parse_event

RUN = "bench-audit"


def register(inner: Any) -> None:
    """Add ``audit`` to `trainbus bench` (the ``trainbus.benchmarks`` entry point)."""
    b = inner.add_parser("audit", help="publish -> audit.flag latency of the audit gate on an embedded server")
    b.add_argument("--rate", type=int, default=100, help="train.step events/s (every other one has a NaN loss)")
    b.add_argument("--seconds", type=float, default=10.0, help="duration of the run")
    b.add_argument("--rules", default="configs/audit.yaml", type=packaged, help="rules file the audit process uses")
    b.set_defaults(func=bench_audit)


def _start_audit(url: str, rules: str, workdir: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "runtime.cli", "audit", "--rules", rules, "--set", f"bus.url={url}"]
    cmd += ["--set", f"state_dir={workdir / 'state'}", "--set", "log.level=error"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = threading.Event()

    def wait_for_line() -> None:  # "trainbus audit: watching …" once it is caught up
        if proc.stdout is not None and proc.stdout.readline():
            ready.set()

    threading.Thread(target=wait_for_line, daemon=True).start()
    if not ready.wait(60) or proc.poll() is not None:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise TrainbusError(f"trainbus audit did not start: {err.strip()[-500:]}")
    return proc


async def _measure(target: BusTarget, settings: Settings, rate: int, seconds: float, workdir: Path) -> list[float]:
    nc = await connect(target, settings, name="bench-audit")
    await ensure_stream(nc.jetstream(), settings.stream)
    sent: dict[str, float] = {}
    latencies: list[float] = []

    async def on_flag(msg: Msg) -> None:
        now = time.perf_counter()
        flag = parse_event(msg.data)
        if isinstance(flag, AuditFlag) and flag.judged_event_id in sent:
            latencies.append((now - sent[flag.judged_event_id]) * 1000)

    await nc.subscribe(event_subject(RUN, "audit.flag"), cb=on_flag)
    await round_trip(nc)
    publisher = trainer_sink(target, settings, workdir / "outbox.jsonl", RUN)
    stamper = Stamper(publisher, RUN)
    total = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        loss = math.nan if i % 2 else 1.0
        if i % 2:
            sent[f"{RUN}.1.{i + 1}"] = time.perf_counter()
        stamper.emit(TrainStep, step=i + 1, epoch=0.0, loss=loss, learning_rate=1e-3, grad_norm=1.0)
    deadline = time.monotonic() + 10
    while len(latencies) < len(sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    publisher.close()
    await nc.close()
    if len(latencies) < len(sent):
        print(f"warning: {len(sent) - len(latencies)} of {len(sent)} flags did not arrive within 10 s")
    return latencies


def bench_audit(args: argparse.Namespace) -> int:
    """Run the audit latency benchmark and print its figures."""
    if not Path(args.rules).is_file():
        raise TrainbusError(f"--rules {args.rules}: no such file (run from the project folder or pass --rules)")
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-audit-") as tmp:
        workdir = Path(tmp)
        server = start_server(settings.server, workdir / "nats", lock=False)
        audit: subprocess.Popen[str] | None = None
        try:
            target = BusTarget([server.url], "embedded")
            audit = _start_audit(server.url, args.rules, workdir)
            print(f"embedded nats-server {server.url}; trainbus audit --rules {args.rules} (pid {audit.pid})")
            values = asyncio.run(_measure(target, settings, args.rate, args.seconds, workdir))
            if not values:
                raise TrainbusError("no audit.flag arrived")
            print(
                f"latency     train.step publish -> audit.flag received at {args.rate} events/s "
                f"({args.rate // 2} flags/s): p50 {statistics.median(values):.2f} ms  "
                f"p99 {percentile(values, 0.99):.2f} ms  max {max(values):.2f} ms  (n={len(values)})"
            )
            print("            target: p99 <= 20 ms")
        finally:
            if audit is not None:
                audit.terminate()
                try:
                    audit.wait(10)
                except subprocess.TimeoutExpired:
                    audit.kill()
            server.stop()
    return 0
