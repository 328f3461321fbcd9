"""`trainbus bench publisher`: the bus's CPU per event, and freshness, with and without coalescing.

    trainbus bench publisher                         # 13 and 80 events/s, window 0 and the default
    trainbus bench publisher --rates 80 --seconds 60

A training run hands ``train.step`` events (and a ``run.state``, which goes at once, every second) to
a ``PublisherSink`` at a steady rate; its publisher process sends them to an embedded nats-server
while a JetStream consumer reads them. For each rate, side by side: ``publish.window_ms`` 0 (every
event sent as soon as it is seen) and the default window. After a warm-up, the CPU time of the
publisher process and of nats-server is read from ``/proc`` over the measured seconds and divided by
the events handed over in them (idle costs included: that is what a run pays). Freshness is the delay
from hand-over to the consumer, per event class. CPU time is robust to a loaded machine; the
freshness percentiles are not, so the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bus import TARGETS_MS
from benchmarks.common import percentile, trainer_sink
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.publish.sink import WINDOW_S
from runtime.publish.sinks import Stamper
from runtime.settings import Settings
from schemas import EVENTS_STREAM, RunState, TrainStep, parse_event
from schemas.subjects import run_events

WARM_UP_S = 3.0
CPU_TARGETS_MS = {13: 0.5, 80: 0.25}
"""Per-event CPU targets (publisher process + nats-server) by rate."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Case:
    """One rate and window: CPU per event of each process, and freshness per event class."""

    rate: float
    window: float
    events: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)
    fresh: dict[str, list[float]] = field(default_factory=lambda: {"train.step": [], "run.state": []})


async def measure(
    target: BusTarget, settings: Settings, server_pid: int, case: Case, seconds: float, work: Path
) -> None:
    """Hand events over at ``case.rate`` for warm-up + ``seconds``; fill ``case``."""
    run_id = f"bench-cpu-{int(case.rate)}-{int(case.window * 1000)}"
    nc = await connect(target, settings, name="bench-publisher")
    sent: dict[int, float] = {}

    async def on_event(msg: Any) -> None:
        now = time.time()
        event = parse_event(msg.data)
        if event.seq in sent:
            case.fresh[event.type].append((now - sent[event.seq]) * 1000)

    await nc.jetstream().subscribe(
        run_events(run_id), stream=EVENTS_STREAM, cb=on_event, ordered_consumer=True, deliver_policy=None
    )
    sink = trainer_sink(target, settings, work / f"{run_id}.jsonl", run_id, window=case.window)
    assert sink.pid is not None
    stamper = Stamper(sink, run_id)
    pids = {"publisher process": sink.pid, "nats-server": server_pid}
    every = max(1, int(case.rate))
    t0 = time.perf_counter()
    i = first = 0
    before: dict[str, float] = {}
    while (now := time.perf_counter()) < t0 + WARM_UP_S + seconds:
        if not before and now >= t0 + WARM_UP_S:
            before, first = {name: cpu_seconds(pid) for name, pid in pids.items()}, i
        await asyncio.sleep(max(0.0, t0 + i / case.rate - time.perf_counter()))
        i += 1
        seq = stamper.seq + 1
        if i % every == 0:
            stamper.emit(RunState, state="running", step=i, reason="bench")
        else:
            stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-4)
        if before:
            sent[seq] = time.time()
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    case.events = i - first
    case.cpu_ms = {name: (after[name] - before[name]) * 1000 / case.events for name in pids}
    await asyncio.sleep(0.5)  # the last window
    await asyncio.to_thread(sink.close)
    await nc.close()


def register(sub: Any) -> None:
    p = sub.add_parser("publisher", help="bus CPU per event (publisher process + nats-server) and freshness, window 0 vs default")  # fmt: skip
    p.add_argument("--rates", default="13,80", help="events/s to measure, comma-separated (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per case, after a warm-up")
    p.add_argument("--window-ms", type=float, default=WINDOW_S * 1000, help="the coalescing window to compare with 0")
    p.set_defaults(func=bench_publisher)


def bench_publisher(args: argparse.Namespace) -> int:
    """Run every rate with window 0 and with ``--window-ms``; print the table."""
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    settings = Settings()
    cases = [Case(rate, window) for rate in rates for window in (0.0, args.window_ms / 1000)]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-publisher-") as tmp:
        work = Path(tmp)
        server = start_server(settings.server, work / "nats")
        try:
            target = BusTarget([server.url], "embedded")
            asyncio.run(_provision(target, settings))
            print(f"embedded nats-server (GOMAXPROCS {settings.server.cores or 'all'}); load average before: {load}")
            for case in cases:
                asyncio.run(measure(target, settings, server.pid, case, args.seconds, work))
                _print(case)
        finally:
            server.stop()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


async def _provision(target: BusTarget, settings: Settings) -> None:
    nc = await connect(target, settings, name="bench")
    await ensure_stream(nc.jetstream(), settings.stream)
    await nc.close()


def _print(case: Case) -> None:
    total = sum(case.cpu_ms.values())
    target = CPU_TARGETS_MS.get(round(case.rate))
    cpu = "  ".join(f"{name} {ms:.3f}" for name, ms in case.cpu_ms.items())
    fresh = "  ".join(
        f"{kind} p50 {percentile(v, 0.5):.1f} p99 {percentile(v, 0.99):.1f} ms" for kind, v in case.fresh.items() if v
    )
    print(
        f"{case.rate:>5g} events/s  window {case.window * 1000:>4g} ms  CPU ms/event: {cpu}  total {total:.3f}"
        + (f" (target <= {target:g})" if target and case.window else "")
        + f"  | freshness {fresh}  (n={case.events}; targets p99 {TARGETS_MS['train.step']:g} / {TARGETS_MS['run.state']:g} ms)"
    )
