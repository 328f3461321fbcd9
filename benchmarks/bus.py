"""`trainbus bench bus`: throughput and latency of the trainer's publish path on an embedded server.

Figures are measured side by side in one run: the pipelined publisher against one-at-a-time
``js.publish``, and delivery latency to a core subscriber and to a JetStream consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import percentile
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.publish.sinks import Stamper
from runtime.publish.threaded import NatsPublisher
from runtime.settings import Settings
from schemas import EVENTS_STREAM, TrainStep, event_subject, parse_event
from schemas.subjects import run_events


def _throughput(target: BusTarget, settings: Settings, n: int, workdir: Path) -> float:
    publisher = NatsPublisher(target, settings, outbox_path=workdir / "outbox.jsonl", name="bench-throughput").start()
    stamper = Stamper(publisher, "bench-throughput")
    start = time.perf_counter()
    for i in range(n):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-4, grad_norm=0.5)
    ok = publisher.flush(timeout=120)
    elapsed = time.perf_counter() - start
    stats = publisher.close()
    if not ok or stats.published != n:
        raise RuntimeError(f"throughput run incomplete: {stats}")
    return n / elapsed


async def _sequential(target: BusTarget, settings: Settings, n: int) -> float:
    nc = await connect(target, settings, name="bench-sequential")
    js = nc.jetstream()
    subject = event_subject("bench-seq", "train.step")
    payload = (
        TrainStep(event_id="x", run_id="bench-seq", seq=1, step=1, epoch=0, loss=1, learning_rate=1e-4)
        .model_dump_json()
        .encode()
    )
    start = time.perf_counter()
    for i in range(n):
        await js.publish(subject, payload, headers={"Nats-Msg-Id": f"bench-seq.{i}"})
    elapsed = time.perf_counter() - start
    await nc.close()
    return n / elapsed


async def _latency(
    target: BusTarget, settings: Settings, rate: int, seconds: float, workdir: Path
) -> tuple[list[float], list[float]]:
    nc = await connect(target, settings, name="bench-latency")
    js = nc.jetstream()
    sent: dict[int, float] = {}
    core: list[float] = []
    jet: list[float] = []

    async def on_core(msg: object) -> None:
        now = time.perf_counter()
        seq = parse_event(msg.data).seq  # type: ignore[attr-defined]
        core.append((now - sent[seq]) * 1000)

    async def on_js(msg: object) -> None:
        now = time.perf_counter()
        seq = parse_event(msg.data).seq  # type: ignore[attr-defined]
        jet.append((now - sent[seq]) * 1000)

    await nc.subscribe(run_events("bench-latency"), cb=on_core)
    await js.subscribe(
        run_events("bench-latency"), stream=EVENTS_STREAM, cb=on_js, ordered_consumer=True, deliver_policy=None
    )
    publisher = NatsPublisher(
        target, settings, outbox_path=workdir / "outbox-latency.jsonl", name="bench-latency"
    ).start()
    stamper = Stamper(publisher, "bench-latency")
    total = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i + 1] = time.perf_counter()
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-4)
    deadline = time.monotonic() + 10
    while (len(core) < total or len(jet) < total) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    publisher.close()
    await nc.close()
    return core, jet


def register(sub: Any) -> None:
    b = sub.add_parser("bus", help="acked events/s through the trainer's publisher; publish→subscriber latency")
    b.add_argument("--events", type=int, default=50_000, help="events for the throughput run")
    b.add_argument("--rate", type=int, default=1_000, help="events/s for the latency run")
    b.add_argument("--seconds", type=float, default=5.0, help="duration of the latency run")
    b.set_defaults(func=bench_bus)


def bench_bus(args: argparse.Namespace) -> int:
    """Run the bus benchmark and print its figures."""
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-") as tmp:
        workdir = Path(tmp)
        server = start_server(settings.server, workdir / "nats")
        try:
            target = BusTarget([server.url], "embedded")

            async def provision() -> None:
                nc = await connect(target, settings, name="bench")
                await ensure_stream(nc.jetstream(), settings.stream)
                await nc.close()

            asyncio.run(provision())
            n_seq = max(1000, args.events // 10)
            print(f"embedded nats-server {server.url}; stream {EVENTS_STREAM} (file storage)")
            pipelined = _throughput(target, settings, args.events, workdir)
            sequential = asyncio.run(_sequential(target, settings, n_seq))
            print(
                f"throughput  trainer publisher (pipelined, acked):  {pipelined:>10,.0f} events/s  ({args.events:,} events)"
            )
            print(
                f"            one-at-a-time js.publish (acked):      {sequential:>10,.0f} events/s  ({n_seq:,} events)"
            )
            print(
                f"            ratio pipelined/sequential:            {pipelined / sequential:>10.1f}x   target: >= 20,000 events/s"
            )
            core, jet = asyncio.run(_latency(target, settings, args.rate, args.seconds, workdir))
            for name, values in (("core subscriber", core), ("JetStream consumer", jet)):
                print(
                    f"latency     publish -> {name:<19} at {args.rate}/s: p50 {statistics.median(values):.2f} ms  "
                    f"p99 {percentile(values, 0.99):.2f} ms  max {max(values):.2f} ms  (n={len(values)})"
                )
            print("            target: p99 <= 5 ms at 1,000 events/s")
        finally:
            server.stop()
    return 0
