"""`trainbus bench exporter`: freshness of /metrics, from an event's publish to its value on a scrape.

    trainbus bench exporter [--rate 100] [--seconds 5]

Starts an embedded nats-server in a temp dir and `trainbus exporter --port 0` as a subprocess,
publishes ``train.step`` events at a fixed rate through the trainer's publisher, and polls
/metrics until ``trainbus_global_step`` shows each step. A step's freshness is the time from
``emit`` to the end of the first scrape that shows it, so it includes the publisher's batching,
JetStream, the exporter's consumer and one scrape. Prints p50/p99; the target is p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import percentile, trainer_sink
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.publish.sinks import Stamper
from runtime.settings import Settings
from schemas import TrainStep

RUN_ID = "bench-exporter"
_STEP = re.compile(rb'^trainbus_global_step\{run_id="' + RUN_ID.encode() + rb'"\} (\S+)$', re.M)


def register(sub: Any) -> None:
    """Add ``exporter`` to `trainbus bench` (the ``trainbus.benchmarks`` entry-point group)."""
    p = sub.add_parser("exporter", help="freshness of the Prometheus exporter: publish -> value on /metrics (p50/p99)")
    p.add_argument("--rate", type=int, default=100, help="train.step events per second (default 100)")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to publish (default 5)")
    p.set_defaults(func=bench_exporter)


class Poller:
    """Scrapes /metrics in a loop; records (end time, step shown or -1) and how long each scrape took."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, int]] = []
        self.durations: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)

    def scrape(self) -> int:
        start = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=5) as response:
            body = response.read()
        end = time.perf_counter()
        found = _STEP.search(body)
        step = int(float(found.group(1))) if found else -1
        self.durations.append((end - start) * 1000)
        self.seen.append((end, step))
        return step

    def _run(self) -> None:
        while not self.stop.is_set():
            self.scrape()
            time.sleep(0.001)


def _start_exporter(url: str, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "exporter", "--port", "0", "--set", f"bus.url={url}"],
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=(workdir / "exporter.log").open("w"),
        text=True,
    )
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], 30)[0]:
        proc.kill()
        raise RuntimeError(f"the exporter did not start (log: {workdir / 'exporter.log'})")
    return proc, proc.stdout.readline().split()[-1]


def _freshness(poller: Poller, sent: dict[int, float]) -> list[float]:
    """For each published step, ms from its publish to the end of the first scrape showing it."""
    out: list[float] = []
    seen = iter(poller.seen)
    shown_at, shown = next(seen, (0.0, 0))
    for step in sorted(sent):
        while shown < step:
            shown_at, shown = next(seen, (float("inf"), 1 << 62))
        if shown_at != float("inf"):
            out.append((shown_at - sent[step]) * 1000)
    return out


def bench_exporter(args: argparse.Namespace) -> int:
    """Run the freshness benchmark and print its figures."""
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-exporter-") as tmp:
        workdir = Path(tmp)
        server = start_server(settings.server, workdir / "nats")
        proc: subprocess.Popen[str] | None = None
        try:
            target = BusTarget([server.url], "embedded")

            async def provision() -> None:
                nc = await connect(target, settings, name="bench")
                await ensure_stream(nc.jetstream(), settings.stream)
                await nc.close()

            asyncio.run(provision())
            proc, url = _start_exporter(server.url, workdir)
            print(f"embedded nats-server {server.url}; exporter subprocess serving {url}")
            poller = Poller(url)
            publisher = trainer_sink(target, settings, workdir / "outbox.jsonl", RUN_ID)
            stamper = Stamper(publisher, RUN_ID)
            stamper.emit(TrainStep, step=0, epoch=0.0, loss=1.0, learning_rate=1e-4)
            deadline = time.monotonic() + 30
            while poller.scrape() < 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            poller.seen.clear()
            poller.durations.clear()
            poller.thread.start()
            total = int(args.rate * args.seconds)
            sent: dict[int, float] = {}
            t0 = time.perf_counter()
            for i in range(1, total + 1):
                delay = t0 + i / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent[i] = time.perf_counter()
                stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-4)
            deadline = time.monotonic() + 10
            while (not poller.seen or poller.seen[-1][1] < total) and time.monotonic() < deadline:
                time.sleep(0.01)
            poller.stop.set()
            poller.thread.join(5)
            publisher.close()
            values = _freshness(poller, sent)
            if not values:
                raise RuntimeError("no step showed up on /metrics")
            print(
                f"freshness   publish -> /metrics at {args.rate}/s: p50 {statistics.median(values):.2f} ms  "
                f"p99 {percentile(values, 0.99):.2f} ms  max {max(values):.2f} ms  (n={len(values)} of {total})"
            )
            print(
                f"            one scrape of /metrics: p50 {statistics.median(poller.durations):.2f} ms "
                f"({len(poller.durations)} scrapes; the resolution of the figures above)"
            )
            print("            target: p99 <= 50 ms")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
            server.stop()
    return 0
