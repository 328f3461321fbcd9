"""A stream that reaches its limits mid-run drops its oldest events: the trainer's publisher is never
refused, never retries, never spills, and the newest events are all there."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.js.api import StreamState

from producers.run.publishing import PUBLISHER
from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import RunningServer, start_server
from runtime.bus.stream import ensure_stream, replay
from runtime.publish.sink import PublisherSink
from runtime.publish.sinks import PublisherStats, Stamper
from runtime.settings import BusSettings, ServerSettings, Settings, StreamSettings
from schemas import EVENTS_STREAM, TrainStep, run_events

MAX_BYTES = 64 * 1024


def run_on(
    server: RunningServer, limits: StreamSettings, run_id: str, events: int, tmp: Path, pace: float = 0.0
) -> PublisherStats:
    sink = PublisherSink(
        BusTarget([server.url], "test"), Settings(bus=BusSettings(url=server.url), stream=limits),
        outbox_path=tmp / f"{run_id}.jsonl", argv=PUBLISHER, run_id=run_id, control=False,
    ).start()  # fmt: skip
    stamper = Stamper(sink, run_id)
    for i in range(1, events + 1):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0 / i, learning_rate=1e-3, grad_norm=0.5)
        if pace:
            time.sleep(pace)
    return sink.close(timeout=60)


async def stored(server: RunningServer, run_id: str) -> tuple[list[int], StreamState]:
    nc = await connect(BusTarget([server.url], "test"), Settings(), name="test")
    try:
        js = nc.jetstream()
        seqs = [d.event.seq async for d in replay(js, run_events(run_id)) if d.event is not None]
        return seqs, (await js.stream_info(EVENTS_STREAM)).state
    finally:
        await nc.close()


async def test_a_full_stream_drops_its_oldest_events_and_never_refuses_a_publish(tmp_path: Path) -> None:
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)
    try:
        limits = StreamSettings(max_bytes=MAX_BYTES)
        stats = await asyncio.to_thread(run_on, server, limits, "full", 2000, tmp_path)  # ~10x what fits
        assert (stats.published, stats.retried, stats.dead_lettered, stats.outbox_pending) == (
            2000,
            0,
            0,
            0,
        )
        seqs, state = await stored(server, "full")
        assert state.bytes <= MAX_BYTES
        assert seqs[-1] == 2000 and seqs == list(range(seqs[0], 2001))  # the newest, contiguous
        assert seqs[0] > 1000  # the oldest went
    finally:
        server.stop()


async def test_events_older_than_max_age_go_while_the_run_goes_on(tmp_path: Path) -> None:
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)
    try:
        limits = StreamSettings(max_age_days=2 / 86400)  # two seconds; the duplicate window shrinks to fit
        nc = await connect(BusTarget([server.url], "test"), Settings(), name="test")
        await ensure_stream(nc.jetstream(), limits)
        assert (await nc.jetstream().stream_info(EVENTS_STREAM)).config.duplicate_window == 2.0
        await nc.close()
        stats = await asyncio.to_thread(run_on, server, limits, "aging", 120, tmp_path, 0.05)  # six seconds
        assert (stats.published, stats.retried, stats.dead_lettered, stats.outbox_pending) == (120, 0, 0, 0)
        seqs, _ = await stored(server, "aging")
        assert seqs[-1] == 120 and seqs == list(range(seqs[0], 121)) and seqs[0] > 1
        deadline = time.monotonic() + 30
        while (await stored(server, "aging"))[0]:  # and the rest ages out once the run is over
            assert time.monotonic() < deadline, "events older than max_age stayed"
            await asyncio.sleep(0.5)
    finally:
        server.stop()
