"""The trainer's publish path against a real nats-server: exactly once, in order, nothing lost."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from nats.aio.client import Client as NATS

from runtime.bus.connect import BusTarget
from runtime.bus.server import start_server
from runtime.bus.stream import replay
from runtime.publish.sinks import Stamper
from runtime.publish.threaded import NatsPublisher
from runtime.settings import BusSettings, ServerSettings, Settings
from schemas import TrainStep, run_events
from tests.conftest import wait_until


async def stored_seqs(nc: NATS, run_id: str) -> list[int]:
    return [d.event.seq async for d in replay(nc.jetstream(), run_events(run_id)) if d.event is not None]


def emit(stamper: Stamper, n: int) -> None:
    for i in range(n):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0 / (i + 1), learning_rate=1e-3)


async def test_every_event_reaches_the_stream_once_in_order(
    target: BusTarget, settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    publisher = NatsPublisher(target, settings, outbox_path=tmp_path / "outbox.jsonl", batch_size=64).start()
    emit(Stamper(publisher, "pub-order"), 1000)
    assert await asyncio.to_thread(publisher.flush, 30)
    stats = publisher.close()
    assert stats.published == 1000 and stats.outbox_pending == 0
    assert await stored_seqs(nc, "pub-order") == list(range(1, 1001))
    assert not (tmp_path / "outbox.jsonl").exists()


async def test_resending_the_same_ids_is_deduplicated(
    target: BusTarget, settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    for attempt in range(2):  # the same events twice, e.g. an outbox re-sent after a crash
        publisher = NatsPublisher(target, settings, outbox_path=tmp_path / f"o{attempt}.jsonl").start()
        emit(Stamper(publisher, "pub-dedupe"), 50)
        stats = publisher.close()
    assert stats.duplicates == 50
    assert await stored_seqs(nc, "pub-dedupe") == list(range(1, 51))


def test_outage_spills_to_outbox_and_recovers_in_order(tmp_path: Path) -> None:
    """The server dies mid-stream; publish() never blocks; after restart all events land once."""
    store = tmp_path / "store"
    server = start_server(ServerSettings(), store, lock=False)
    port = int(server.url.rsplit(":", 1)[1])
    settings = Settings(bus=BusSettings(url=server.url, ack_timeout=0.5))
    target = BusTarget([server.url], "test")
    publisher = NatsPublisher(
        target, settings, outbox_path=tmp_path / "outbox.jsonl", memory_limit=100, batch_size=50
    ).start()
    stamper = Stamper(publisher, "pub-outage")
    emit(stamper, 200)
    assert publisher.flush(10)
    server.stop()
    worst = 0.0
    for i in range(500):  # while the bus is down
        t0 = time.perf_counter()
        stamper.emit(TrainStep, step=1000 + i, epoch=0.0, loss=0.5, learning_rate=1e-3)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05, f"publish blocked for {worst:.3f}s while the bus was down"
    wait_until(lambda: publisher.stats.spilled > 0, timeout=10, what="events beyond the memory limit to spill")
    assert (tmp_path / "outbox.jsonl").stat().st_size > 0
    server = start_server(ServerSettings(port=port), store, lock=False)
    try:
        emit(stamper, 10)
        assert publisher.flush(30)
        stats = publisher.close(timeout=30)
        assert stats.outbox_pending == 0

        async def check() -> list[int]:
            conn = NATS()
            await conn.connect(server.url)
            seqs = await stored_seqs(conn, "pub-outage")
            await conn.close()
            return seqs

        assert asyncio.run(check()) == list(range(1, 711))
    finally:
        server.stop()


def test_close_with_bus_gone_keeps_everything_in_outbox(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = start_server(ServerSettings(), store, lock=False)
    settings = Settings(bus=BusSettings(url=server.url, ack_timeout=0.3))
    publisher = NatsPublisher(BusTarget([server.url], "test"), settings, outbox_path=tmp_path / "outbox.jsonl").start()
    stamper = Stamper(publisher, "pub-close")
    server.stop()
    emit(stamper, 30)
    stats = publisher.close(timeout=1.0)
    assert stats.outbox_pending == 30
    lines = (tmp_path / "outbox.jsonl").read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == [f"pub-close.1.{i}" for i in range(1, 31)]
    assert threading.active_count() < 50
