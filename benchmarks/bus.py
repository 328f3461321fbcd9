"""`trainbus bench bus`: throughput and freshness of the trainer's publish path on an embedded server.

The path measured is the one a training run's events take: a ``PublisherSink`` appends them to the
run's outbox and its publisher process sends them to JetStream (pipelined, acked, coalesced within
``publish.window_ms``). Side by side in one run: that path against one-at-a-time ``js.publish``, and
the delay from handing an event over to a JetStream consumer receiving it, per event class.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import percentile, trainer_sink
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import start_server
from runtime.bus.stream import ensure_stream
from runtime.publish.sink import WINDOW_S
from runtime.publish.sinks import Stamper
from runtime.settings import Settings
from schemas import EVENTS_STREAM, RunState, TrainStep, event_subject, parse_event
from schemas.subjects import run_events

TARGETS_MS = {"train.step": 50.0, "run.state": 5.0}
"""p99 freshness targets: an event that may wait, and one that goes at once."""


def _throughput(target: BusTarget, settings: Settings, n: int, workdir: Path) -> float:
    sink = trainer_sink(target, settings, workdir / "outbox.jsonl", "bench-throughput")
    stamper = Stamper(sink, "bench-throughput")
    start = time.perf_counter()
    for i in range(n):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-4, grad_norm=0.5)
    stats = sink.close(timeout=120)  # returns once the publisher process has every event acknowledged
    elapsed = time.perf_counter() - start
    if stats.published != n:
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


async def freshness(
    target: BusTarget, settings: Settings, rate: float, seconds: float, workdir: Path, *, window: float, run_id: str
) -> dict[str, list[float]]:
    """Milliseconds from handing each event to a ``PublisherSink`` to a JetStream consumer's callback, by type.

    ``rate`` ``train.step`` events/s, and a ``run.state`` (goes at once) once a second.
    """
    nc = await connect(target, settings, name="bench-freshness")
    sent: dict[int, float] = {}
    seen: dict[str, list[float]] = {"train.step": [], "run.state": []}

    async def on_event(msg: Any) -> None:
        now = time.perf_counter()
        event = parse_event(msg.data)
        if event.seq in sent:
            seen[event.type].append((now - sent[event.seq]) * 1000)

    await nc.jetstream().subscribe(
        run_events(run_id), stream=EVENTS_STREAM, cb=on_event, ordered_consumer=True, deliver_policy=None
    )
    sink = trainer_sink(target, settings, workdir / f"{run_id}.outbox.jsonl", run_id, window=window)
    stamper = Stamper(sink, run_id)
    total, every = int(rate * seconds), max(1, int(rate))
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[stamper.seq + 1] = time.perf_counter()
        if i % every == every - 1:
            stamper.emit(RunState, state="running", step=i, reason="bench")
        else:
            stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-4)
    deadline = time.monotonic() + 10
    while sum(map(len, seen.values())) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(sink.close)
    await nc.close()
    return seen


def register(sub: Any) -> None:
    b = sub.add_parser("bus", help="acked events/s through the trainer's publish path; hand-over→consumer freshness")
    b.add_argument("--events", type=int, default=50_000, help="events for the throughput run")
    b.add_argument("--rate", type=int, default=1_000, help="events/s for the freshness run")
    b.add_argument("--seconds", type=float, default=5.0, help="duration of the freshness run")
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
            print(f"throughput  trainer's path (PublisherSink, acked): {pipelined:>10,.0f} events/s  ({args.events:,} events)")  # fmt: skip
            print(f"            one-at-a-time js.publish (acked):       {sequential:>10,.0f} events/s  ({n_seq:,} events)")  # fmt: skip
            print(f"            ratio:                                  {pipelined / sequential:>10.1f}x")
            seen = asyncio.run(
                freshness(target, settings, args.rate, args.seconds, workdir, window=WINDOW_S, run_id="bench-fresh")
            )
            for kind, values in seen.items():
                if values:
                    print(
                        f"freshness   hand-over -> JetStream consumer, {kind:<10} at {args.rate}/s: "
                        f"p50 {statistics.median(values):.2f} ms  p99 {percentile(values, 0.99):.2f} ms  "
                        f"max {max(values):.2f} ms  (n={len(values)}; target p99 <= {TARGETS_MS[kind]:g} ms)"
                    )
        finally:
            server.stop()
    return 0
