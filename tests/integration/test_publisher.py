"""The trainer's publish path (a ``PublisherSink`` and its publisher process) against a real nats-server:
exactly once, in order, nothing lost, what people wait on at once, the rest coalesced."""

from __future__ import annotations

import time
from pathlib import Path

from runtime.bus.server import RunningServer, start_server
from runtime.publish.sinks import Stamper
from runtime.settings import ServerSettings
from schemas import Checkpoint, CommandResult, RunStarted, RunState, TrainStep
from tests.conftest import wait_until
from tests.end_to_end.conftest import events_of as stored
from tests.publishing import start_sink


def emit(stamper: Stamper, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0 / (i + 1), learning_rate=1e-3)


def started(stamper: Stamper) -> None:
    stamper.emit(RunStarted, config={}, config_hash="h", model="m", adapter="lora", data_fingerprint="d", hyperparameters={"learning_rate": 1e-3})  # fmt: skip


def test_every_event_reaches_the_stream_once_in_order_across_batches(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    """Steps coalesced in windows, with events that go at once in between: one order, each once."""
    url = nats_server.url
    sink = start_sink(url, tmp_path / "outbox.jsonl", "pub-order", batch_size=64, window=0.005)
    stamper = Stamper(sink, "pub-order")
    for i in range(600):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-3)
        if i % 37 == 0:
            stamper.emit(RunState, state="running", step=i, reason="")  # rings: goes at once with what waited
        if i % 100 == 0:
            time.sleep(0.02)  # a pause longer than the window: the next step goes at once
    total = stamper.seq
    stats = sink.close()
    assert stats.published == total and stats.outbox_pending == 0
    assert [e.seq for e in stored(url, "pub-order")] == list(range(1, total + 1))
    assert not (tmp_path / "outbox.jsonl").exists()


def test_what_people_wait_on_goes_at_once_and_takes_the_waiting_steps_along(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    """With a window far longer than the test, only an event that goes at once can send the steps before it."""
    url = nats_server.url
    sink = start_sink(url, tmp_path / "outbox.jsonl", "pub-now", window=600.0)
    stamper = Stamper(sink, "pub-now")
    try:
        started(stamper)
        wait_until(lambda: len(stored(url, "pub-now")) == 1, timeout=30, what="run.started to go at once")
        emit(stamper, 5, first=1)
        time.sleep(2.0)
        assert len(stored(url, "pub-now")) == 1, "train.step did not wait for its window"
        stamper.emit(Checkpoint, step=5, path="/x/checkpoint-5", sha256="a" * 64, size_bytes=1)
        wait_until(lambda: len(stored(url, "pub-now")) == 7, timeout=30, what="the checkpoint to go at once")
        stamper.emit(CommandResult, command_id="c", command="pause", status="accepted", step=5)
        wait_until(lambda: len(stored(url, "pub-now")) == 8, timeout=30, what="the command result to go at once")
        stamper.emit(TrainStep, step=6, epoch=0.0, loss=float("nan"), learning_rate=1e-3)  # the audit gate flags it
        wait_until(lambda: len(stored(url, "pub-now")) == 9, timeout=30, what="a NaN loss to go at once")
        emit(stamper, 2, first=7)
    finally:
        stats = sink.close()  # closing sends what waits
    assert stats.outbox_pending == 0
    events = stored(url, "pub-now")
    assert [e.seq for e in events] == list(range(1, 12))
    assert [e.type for e in events] == ["run.started", *["train.step"] * 5, "checkpoint", "command.result", *["train.step"] * 3]  # fmt: skip


def test_resending_the_same_ids_is_deduplicated(nats_server: RunningServer, tmp_path: Path) -> None:
    url = nats_server.url
    for attempt in range(2):  # the same events twice, e.g. an outbox re-sent after a crash
        sink = start_sink(url, tmp_path / f"o{attempt}.jsonl", "pub-dedupe")
        emit(Stamper(sink, "pub-dedupe"), 50)
        stats = sink.close()
    assert stats.duplicates == 50
    assert [e.seq for e in stored(url, "pub-dedupe")] == list(range(1, 51))


def test_outage_keeps_events_in_the_outbox_and_recovers_in_order(tmp_path: Path) -> None:
    """The server dies mid-stream; publish() never blocks; after restart all events land once."""
    store = tmp_path / "store"
    server = start_server(ServerSettings(), store, lock=False)
    port = server.port
    outbox = tmp_path / "outbox.jsonl"
    sink = start_sink(server.url, outbox, "pub-outage", batch_size=50, bus={"ack_timeout": 0.5})
    stamper = Stamper(sink, "pub-outage")
    emit(stamper, 200)
    wait_until(lambda: len(stored(server.url, "pub-outage")) == 200, timeout=30, what="the first 200 events")
    server.stop()
    worst = 0.0
    for i in range(500):  # while the bus is down
        t0 = time.perf_counter()
        stamper.emit(TrainStep, step=1000 + i, epoch=0.0, loss=0.5, learning_rate=1e-3)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05, f"publish blocked for {worst:.3f}s while the bus was down"
    assert outbox.read_bytes().count(b"\n") >= 500  # every event of the outage is in the outbox
    server = start_server(ServerSettings(port=port), store, lock=False)
    try:
        emit(stamper, 10)
        stats = sink.close(timeout=30)
        assert stats.outbox_pending == 0
        assert [e.seq for e in stored(server.url, "pub-outage")] == list(range(1, 711))
    finally:
        server.stop()


def test_close_with_bus_gone_keeps_everything_in_outbox(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = start_server(ServerSettings(), store, lock=False)
    outbox = tmp_path / "outbox.jsonl"
    sink = start_sink(server.url, outbox, "pub-close", bus={"ack_timeout": 0.3})
    stamper = Stamper(sink, "pub-close")
    server.stop()
    emit(stamper, 30)
    stats = sink.close(timeout=1.0)
    assert stats.outbox_pending == 30
    lines = outbox.read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == [f"pub-close.1.{i}" for i in range(1, 31)]
