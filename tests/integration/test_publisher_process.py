"""The trainer's publisher process: the training process keeps no bus thread, a SIGKILL of it loses no
event handed over, and a killed publisher process is started again or the run says it no longer publishes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from producers.run.control_inbox import ControlChannel
from producers.run.publishing import open_bus
from runtime.bus.connect import BusTarget
from runtime.bus.server import RunningServer
from runtime.logs import setup_logging
from runtime.publish.sink import PublisherSink
from runtime.publish.sinks import Stamper
from runtime.settings import BusSettings, Settings
from schemas import CommandReply, TrainStep, control_subject
from tests.conftest import wait_until
from tests.end_to_end.conftest import events_of as stored
from tests.integration.test_publisher_faults import Logs

REPO = Path(__file__).resolve().parents[2]

# a training process in miniature: open the bus as `trainbus train` does, hand events over, then die at once
KILLED_SCRIPT = """
import os, signal, sys
from pathlib import Path
from producers.run.control_inbox import ControlChannel
from producers.run.publishing import open_bus
from runtime.settings import BusSettings, Settings
from runtime.publish.sinks import Stamper
from schemas import TrainStep

url, run_id, outbox, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
sink = open_bus(run_id, Settings(bus=BusSettings(url=url)), outbox, ControlChannel(run_id))
print(sink.pid, flush=True)
stamper = Stamper(sink, run_id)
for i in range(n):
    stamper.emit(TrainStep, step=i + 1, epoch=0.0, loss=1.0, learning_rate=1e-3)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Logs:
    setup_logging("info", "json")
    return Logs(capsys)


def said(logs: Logs, start: str) -> list[dict[str, Any]]:
    """The log lines so far (the publisher process's are copied to this process's stderr) that start with ``start``."""
    return [line for line in logs() if line["event"].startswith(start)]


def steps(stamper: Stamper, first: int, n: int) -> None:
    for i in range(first, first + n):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-3)


def kill(pid: int | None) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), timeout=10, what=f"process {pid} to die")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def request(url: str, subject: str, payload: dict[str, Any]) -> CommandReply:
    async def go() -> CommandReply:
        nc = NATS()
        await nc.connect(url)
        try:
            msg = await nc.request(subject, json.dumps(payload).encode(), timeout=10)
            return CommandReply.model_validate_json(msg.data)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_the_training_process_runs_no_bus_thread_and_keeps_its_gil_switch_interval(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    threads, interval = threading.active_count(), sys.getswitchinterval()
    sink = open_bus("no-thread", Settings(bus=BusSettings(url=nats_server.url)), tmp_path / "outbox.jsonl", ControlChannel("no-thread"))  # fmt: skip
    try:
        steps(Stamper(sink, "no-thread"), 1, 20)
        assert threading.active_count() == threads  # the connection, publishing and control are the publisher process's
        assert sys.getswitchinterval() == interval
    finally:
        stats = sink.close()
    assert stats.published == 20 and stats.outbox_pending == 0
    assert [e.seq for e in stored(nats_server.url, "no-thread")] == list(range(1, 21))


def test_a_sigkill_of_the_training_process_loses_no_event_it_handed_over(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    script = subprocess.run(
        [sys.executable, "-c", KILLED_SCRIPT, nats_server.url, "killed", str(outbox), "300"],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert script.returncode == -signal.SIGKILL, script.stderr[-3000:]
    publisher = int(script.stdout.split()[0])
    wait_until(lambda: not _alive(publisher), timeout=60, what="the publisher process to send what was left and exit")
    assert [e.seq for e in stored(nats_server.url, "killed")] == list(range(1, 301))  # once each, in order
    assert not outbox.exists()  # all of it acknowledged


def test_a_killed_publisher_process_is_started_again_and_the_run_loses_nothing(
    nats_server: RunningServer, tmp_path: Path, logs: Logs
) -> None:
    url, run = nats_server.url, "publisher-killed"
    channel = ControlChannel(run)
    sink = open_bus(run, Settings(bus=BusSettings(url=url)), tmp_path / "outbox.jsonl", channel)
    stamper = Stamper(sink, run)
    try:
        steps(stamper, 1, 50)
        first = sink.pid
        kill(first)
        sent = iter(range(51, 1000))
        # publishing finds the publisher process gone (it looks once a second) and starts another
        wait_until(lambda: steps(stamper, next(sent), 1) or sink.restarts == 1, timeout=30, what="a restart")
        last = next(sent) - 1
        assert sink.pid != first
        command = {"type": "pause", "command_id": "after-restart", "run_id": run, "issued_by": "test"}
        wait_until(lambda: _answers(url, run), timeout=60, what="the new publisher process to answer commands")
        assert request(url, control_subject(run), command).status == "accepted"
        assert [c.command_id for c in channel.take(timeout=5)] == ["after-restart"]
    finally:
        stats = sink.close()
    assert stats.outbox_pending == 0 and stats.failure is None
    events = stored(url, run)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.step for e in events if e.type == "train.step"] == list(range(1, last + 1))
    assert len(said(logs, "publisher process ended; starting it again")) == 1


def _answers(url: str, run: str) -> bool:
    try:
        reply = request(url, control_subject(run), {"type": "pause", "command_id": "probe", "run_id": "other", "issued_by": "t"})  # fmt: skip
    except Exception:
        return False
    return reply.code == "wrong_run"


def test_a_publisher_process_that_keeps_dying_says_the_run_no_longer_publishes_and_keeps_every_event(
    nats_server: RunningServer, tmp_path: Path, logs: Logs
) -> None:
    url, run, outbox = nats_server.url, "publisher-gone", tmp_path / "outbox.jsonl"
    settings = Settings(bus=BusSettings(url=url))
    argv = [sys.executable, "-m", "producers.run.publisher"]
    sink = PublisherSink(BusTarget([url], "test"), settings, outbox_path=outbox, argv=argv, run_id=run, control=False, max_restarts=1).start()  # fmt: skip
    stamper = Stamper(sink, run)
    sent = iter(range(1, 1000))
    steps(stamper, next(sent), 1)
    for restarts in (1, 2):
        kill(sink.pid)
        # publishing finds it gone (it looks once a second): once it is started again, the second time not
        wait_until(lambda r=restarts: steps(stamper, next(sent), 1) or sink.restarts == r or sink.failure, timeout=30, what="the death to be seen")  # fmt: skip
    assert sink.restarts == 1 and sink.failure is not None
    lost_from = next(sent)
    steps(stamper, lost_from, 10)  # no more restarts: every event stays in the outbox
    total = lost_from + 9
    stats = sink.close()
    assert stats.failure is not None and "ended" in stats.failure
    assert len(said(logs, "this run no longer publishes")) == 1
    assert not {e.seq for e in stored(url, run)} & set(range(lost_from, total + 1))  # none went out after
    assert stats.outbox_pending >= 10
    again = PublisherSink(BusTarget([url], "test"), settings, outbox_path=outbox, argv=argv, run_id=run, control=False).start()  # fmt: skip
    assert again.close().outbox_pending == 0  # the next start sends what was kept
    assert [e.seq for e in stored(url, run)] == list(range(1, total + 1))
