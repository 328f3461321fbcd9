"""The trainer's publish path against a bus that refuses, a broken outbox and an unreachable bus.

Each test reproduces a fault on a real nats-server, through a ``PublisherSink`` and its publisher
process: a poison event must not block the events after it, a refusing bus must not cost a core, a
torn outbox must not stop the sender, and a run that starts offline sends everything once the bus
appears. (A publisher process that dies: ``test_publisher_process.py``.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from runtime.bus.server import RunningServer, start_server
from runtime.bus.stream import stream_config
from runtime.logs import setup_logging
from runtime.publish.outbox import Outbox, dead_letter_path
from runtime.publish.sink import PublisherSink
from runtime.publish.sinks import Stamper
from runtime.settings import ServerSettings, StreamSettings
from schemas import EVENTS_STREAM, AuditFlag, Evaluation, RunStarted, TrainStep, event_subject
from tests.conftest import wait_until
from tests.end_to_end.conftest import events_of as stored
from tests.publishing import start_sink

HP = {"learning_rate": 1e-3}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server of its own, with a small max_payload (64 KiB) as on managed NATS."""
    running = start_server(ServerSettings(), tmp_path / "nats", extra_config="max_payload: 65536\n", lock=False)
    yield running
    running.stop()


class Logs:
    """The JSON log lines written so far (structlog writes them to stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.seen: list[dict[str, Any]] = []

    def __call__(self) -> list[dict[str, Any]]:
        err = self.capsys.readouterr().err
        self.seen += [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        return self.seen


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Logs:
    setup_logging("info", "json")
    return Logs(capsys)


def on_bus(url: str, work: Callable[[NATS], Awaitable[Any]], **auth: str) -> Any:
    async def go() -> Any:
        nc = NATS()
        await nc.connect(url, **auth)
        try:
            return await work(nc)
        finally:
            await nc.close()

    return asyncio.run(go())


def start_publisher(url: str, outbox: Path, run_id: str, **options: Any) -> PublisherSink:
    return start_sink(url, outbox, run_id, bus={"ack_timeout": 2.0, **options.pop("bus", {})}, **options)


def steps(stamper: Stamper, n: int) -> None:
    for i in range(n):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-3)


def process_cpu(sink: PublisherSink) -> float:
    """CPU seconds the sink's publisher process has used."""
    times = psutil.Process(sink.pid).cpu_times()
    return float(times.user + times.system)


def dead_letters(outbox: Path) -> list[dict[str, Any]]:
    path = dead_letter_path(outbox)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- 2. poison events ------------------------------------------------------------------


def test_an_event_over_max_payload_is_set_aside_and_later_events_flow(
    server: RunningServer, tmp_path: Path, logs: Logs
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    publisher = start_publisher(server.url, outbox, "poison")
    stamper = Stamper(publisher, "poison")
    huge_config = {f"key{i}": "x" * 100 for i in range(2000)}  # ~230 KB: 3.5 times the server's max_payload
    stamper.emit(RunStarted, config=huge_config, config_hash="h", model="m", adapter="lora", data_fingerprint="d", hyperparameters=HP)  # fmt: skip
    steps(stamper, 3)
    labels = [f"LABEL_{i}" for i in range(8000)]  # nothing in an eval can be trimmed: it cannot be sent
    stamper.emit(Evaluation, step=3, loss=0.5, labels=labels, num_samples=1)
    steps(stamper, 11)
    stats = publisher.close(timeout=60)
    events = stored(server.url, "poison")
    assert [e.seq for e in events] == [1, 2, 3, 4, *range(6, 17)]  # all but the eval, once each, in order
    started = events[0]
    assert isinstance(started, RunStarted) and "trimmed" in json.dumps(started.config)  # a visible marker
    assert stats.dead_lettered == 1 and stats.trimmed == 1 and stats.outbox_pending == 0
    aside = dead_letters(outbox)
    assert [a["event_id"] for a in aside] == ["poison.1.1", "poison.1.5"]  # the untrimmed original, the eval
    assert json.loads(aside[0]["event"])["config"] == huge_config
    assert "max_payload" in aside[1]["reason"]
    said = [line for line in logs() if line.get("event_id") == "poison.1.5"]
    assert len(said) == 1 and said[0]["set_aside_in"] == str(dead_letter_path(outbox))


def test_a_poison_event_in_the_outbox_of_an_earlier_attempt_does_not_block_the_rest(
    server: RunningServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    big = Evaluation(event_id="restart.1.2", run_id="restart", seq=2, step=1, loss=0.1, labels=["L"] * 20000)
    small = [TrainStep(event_id=f"restart.1.{i}", run_id="restart", seq=i, step=i, epoch=0, loss=1, learning_rate=1e-3) for i in (1, 3, 4)]  # fmt: skip
    box = Outbox(outbox)
    box.append([(event_subject("restart", e.type), e.event_id, e.model_dump_json().encode()) for e in (small[0], big, *small[1:])])  # fmt: skip
    box.close()
    publisher = start_publisher(server.url, outbox, "restart")
    try:
        wait_until(lambda: len(stored(server.url, "restart")) == 3, timeout=60, what="the outbox to drain")
    finally:
        stats = publisher.close(timeout=5)
    assert [e.seq for e in stored(server.url, "restart")] == [1, 3, 4]
    assert stats.outbox_pending == 0 and [a["event_id"] for a in dead_letters(outbox)] == ["restart.1.2"]


def test_an_event_the_user_may_not_publish_is_set_aside(
    secured_server: RunningServer, role_passwords: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    monkeypatch.setenv("NATS_USER", "trainer")  # the publisher process connects as the trainer
    monkeypatch.setenv("NATS_PASSWORD", role_passwords["trainer"])
    publisher = start_publisher(secured_server.url, outbox, "denied", bus={"ack_timeout": 5.0})
    stamper = Stamper(publisher, "denied")
    steps(stamper, 2)
    stamper.emit(AuditFlag, rule="r", severity="info", step=1, message="a trainer may not publish audit events", judged_event_id="x")  # fmt: skip
    steps(stamper, 5)
    stats = publisher.close(timeout=60)
    events = stored(secured_server.url, "denied", user="admin", password=role_passwords["admin"])
    assert [e.seq for e in events] == [1, 2, *range(4, 9)]
    assert stats.dead_lettered == 1 and "ermission" in dead_letters(outbox)[0]["reason"]


def test_no_stream_and_not_allowed_to_create_it_sets_events_aside(server: RunningServer, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    publisher = start_publisher(server.url, outbox, "nostream", provision_stream=False)
    steps(Stamper(publisher, "nostream"), 3)
    stats = publisher.close(timeout=60)
    assert stats.dead_lettered == 3 and stats.outbox_pending == 0
    assert all(EVENTS_STREAM in a["reason"] for a in dead_letters(outbox))


def test_a_batch_with_a_refused_message_in_the_middle_keeps_stream_order(server: RunningServer, tmp_path: Path) -> None:
    """The stream's own max_msg_size refuses message i while i+1 is stored: i must not land after i+1."""

    async def small_messages(nc: NATS) -> None:
        config = stream_config(StreamSettings())
        config.max_msg_size = 4096
        await nc.jetstream().add_stream(config=config)

    on_bus(server.url, small_messages)
    outbox = tmp_path / "outbox.jsonl"
    publisher = start_publisher(server.url, outbox, "order")
    stamper = Stamper(publisher, "order")
    steps(stamper, 2)
    stamper.emit(Evaluation, step=2, loss=0.5, labels=[f"L{i}" for i in range(1000)])  # ~10 KB: over the stream's limit
    steps(stamper, 2)
    stats = publisher.close(timeout=60)
    seqs = [e.seq for e in stored(server.url, "order")]
    assert seqs == sorted(seqs) == [1, 2, 4, 5] and stats.dead_lettered == 1


# ---- 3. a refusing bus -----------------------------------------------------------------


def test_a_deleted_stream_is_recreated_without_a_busy_loop(server: RunningServer, tmp_path: Path, logs: Logs) -> None:
    publisher = start_publisher(server.url, tmp_path / "outbox.jsonl", "deleted")
    stamper = Stamper(publisher, "deleted")
    steps(stamper, 5)
    wait_until(lambda: len(stored(server.url, "deleted")) == 5, timeout=30, what="the first events")

    async def delete(nc: NATS) -> None:
        await nc.jetstream().delete_stream(EVENTS_STREAM)

    on_bus(server.url, delete)
    cpu_before, until = process_cpu(publisher), time.monotonic() + 3.0
    while time.monotonic() < until:  # three seconds of a training loop that logs every 20 ms
        steps(stamper, 1)
        time.sleep(0.02)
    cpu = process_cpu(publisher) - cpu_before
    publisher.close(timeout=60)
    assert cpu < 0.75, f"the publisher process used {cpu:.2f} s of CPU in 3 s"
    events = stored(server.url, "deleted")
    assert [e.seq for e in events] == list(range(6, 6 + len(events)))  # the new stream has every later event
    assert len([line for line in logs() if "re-created" in line["event"]]) == 1


def test_a_refusing_stream_is_retried_with_backoff_logged_once(
    server: RunningServer, tmp_path: Path, logs: Logs
) -> None:
    """A stream at its message limit (discard new) refuses every publish until an operator acts."""

    async def limit(nc: NATS, max_msgs: int) -> None:
        config = stream_config(StreamSettings())
        config.max_msgs, config.discard = max_msgs, api.DiscardPolicy.NEW
        js = nc.jetstream()
        await (js.update_stream(config=config) if max_msgs < 0 else js.add_stream(config=config))

    on_bus(server.url, lambda nc: limit(nc, 5))
    publisher = start_publisher(server.url, tmp_path / "outbox.jsonl", "refused")
    stamper = Stamper(publisher, "refused")
    steps(stamper, 20)
    wait_until(lambda: len(stored(server.url, "refused")) == 5, timeout=30, what="the stream to fill up")
    cpu_before = process_cpu(publisher)
    time.sleep(3.0)  # the measurement window: the stream refuses all along
    cpu = process_cpu(publisher) - cpu_before
    on_bus(server.url, lambda nc: limit(nc, -1))  # the operator lifts the limit
    wait_until(lambda: len(stored(server.url, "refused")) == 20, timeout=60, what="the rest once the stream accepts it")
    stats = publisher.close(timeout=60)
    assert cpu < 0.5, f"the publisher process used {cpu:.2f} s of CPU in 3 s"
    assert [e.seq for e in stored(server.url, "refused")] == list(range(1, 21))
    assert stats.dead_lettered == 0
    lines = logs()
    assert len([line for line in lines if line["event"].startswith("publish refused")]) == 1
    assert len([line for line in lines if line["event"].startswith("publishing again")]) == 1


# ---- 4. a torn outbox ---------------------------------------------------------------


def test_an_outbox_with_a_torn_last_line_does_not_stop_the_publisher(server: RunningServer, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    first = TrainStep(event_id="torn.1.1", run_id="torn", seq=1, step=1, epoch=0, loss=1, learning_rate=1e-3)
    outbox.write_bytes(f"{event_subject('torn', 'train.step')}\ttorn.1.1\t{first.model_dump_json()}\n".encode() + b"trainbus.ev")  # fmt: skip
    publisher = start_publisher(server.url, outbox, "torn")
    stamper = Stamper(publisher, "torn")
    stamper.seq = 1
    steps(stamper, 10)
    stats = publisher.close(timeout=60)
    assert [e.seq for e in stored(server.url, "torn")] == list(range(1, 12))
    assert stats.outbox_pending == 0 and not outbox.exists()


# ---- 10. starting offline --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_offline_start_sends_the_outbox_once_the_bus_appears(tmp_path: Path, logs: Logs) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    outbox = tmp_path / "outbox.jsonl"
    publisher = start_publisher(url, outbox, "offline", offline_ok=True, bus={"connect_timeout": 1.0})
    stamper = Stamper(publisher, "offline")
    steps(stamper, 30)
    assert outbox.read_bytes().count(b"\n") == 30  # each event is in the outbox before publish returns
    server = start_server(ServerSettings(port=port), tmp_path / "nats", lock=False)
    try:
        steps(stamper, 5)
        stats = publisher.close(timeout=60)
        assert [e.seq for e in stored(server.url, "offline")] == list(range(1, 36))
    finally:
        server.stop()
    assert stats.outbox_pending == 0
    lines = logs()
    assert len([line for line in lines if line["event"].startswith("bus unreachable")]) == 1
    assert len([line for line in lines if line["event"].startswith("connected to the bus")]) == 1
