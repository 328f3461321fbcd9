"""The folder's bus as a user meets it: `up` keeps its port across restarts and says each thing once,
a publisher follows the bus when it has to move, a second shell steers a run whose trainer started
its own embedded bus, and `trainbus outbox flush` sends what runs left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from producers.run.control_inbox import ControlChannel
from producers.run.publishing import PUBLISHER, open_bus
from runtime.bus.connect import LOCAL, resolve_target
from runtime.bus.server import RunningServer, read_state, start_server
from runtime.publish.outbox import Outbox, record_of
from runtime.publish.sink import PublisherSink
from runtime.publish.sinks import Stamper
from runtime.settings import BusSettings, Settings
from schemas import TrainStep
from tests.conftest import wait_until
from tests.end_to_end.conftest import events_of

REPO = Path(__file__).resolve().parents[2]


def trainbus(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout, check=False
    )  # fmt: skip


@contextmanager
def up(cwd: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`trainbus up ARGS` in ``cwd``, once it printed its "Ctrl-C" line; its stdout lines (growing); SIGINT on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "up", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(line.rstrip("\n") for line in proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: any("Ctrl-C stops everything" in line for line in lines) or proc.poll() is not None, what="up"
        )
        assert proc.poll() is None, f"up ended early: {proc.stderr.read() if proc.stderr else ''}"
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(30)
        reader.join(10)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_up_keeps_its_port_across_restarts_and_prints_the_exporter_url_once(tmp_path: Path) -> None:
    with up(tmp_path, "--service-args", "exporter=--port 0") as (proc, lines):
        first = read_state(tmp_path / ".trainbus")
        assert first is not None and f"listening at {first}" in lines[0]
        wait_until(lambda: any("serving http" in line for line in lines), what="the exporter")
    assert proc.stderr is not None
    output = "\n".join(lines) + proc.stderr.read()
    assert output.count("/metrics") == 1, output  # the exporter's URL, once
    assert read_state(tmp_path / ".trainbus") is None
    with up(tmp_path, "--no-services") as (_, lines):
        assert read_state(tmp_path / ".trainbus") == first  # the same address: clients reconnect by themselves
        assert f"listening at {first}" in lines[0]


def test_up_with_an_unknown_service_in_service_args_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = trainbus("up", "--service-args", "exportr=--port 0", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("trainbus up: --service-args 'exportr=--port 0': expected NAME=ARGS with NAME one of ")
    assert not (tmp_path / ".trainbus").exists()  # refused before any server started


async def test_a_publisher_follows_the_folders_bus_when_its_port_was_taken(tmp_path: Path) -> None:
    state = tmp_path / ".trainbus"
    settings = Settings(state_dir=str(state), bus=BusSettings(ack_timeout=1.0))
    first = start_server(settings.server, state / "nats")
    first.advertise(state)
    target = resolve_target(settings)
    assert target.origin == LOCAL and target.servers == [first.url]
    publisher = PublisherSink(
        target, settings, outbox_path=tmp_path / "outbox.jsonl", argv=PUBLISHER, run_id="follow", control=False
    ).start()
    stamper = Stamper(publisher, "follow")
    for i in range(1, 51):
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-3)
    await asyncio.to_thread(
        wait_until, lambda: len(events_of(first.url, "follow")) == 50, timeout=30, what="the first 50 events"
    )
    first.stop()  # `up` stopped ...
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", first.port))  # ... and something else took its port meanwhile
    blocker.listen()
    for i in range(51, 101):  # the run goes on while the bus is away
        stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-3)
    second = start_server(settings.server, state / "nats")  # `up` again: same store, a new port
    try:
        second.advertise(state)
        assert second.moved_from == first.port and second.url != first.url
        for i in range(101, 121):
            stamper.emit(TrainStep, step=i, epoch=0.0, loss=1.0, learning_rate=1e-3)
        stats = await asyncio.to_thread(publisher.close, 60)
        assert stats.outbox_pending == 0
        assert [e.seq for e in await asyncio.to_thread(events_of, second.url, "follow")] == list(range(1, 121))
    finally:
        blocker.close()
        second.stop()


def test_a_second_shell_steers_a_run_whose_trainer_started_an_embedded_bus(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path / ".trainbus"))
    channel = ControlChannel("embedded-run")
    publisher = open_bus("embedded-run", settings, tmp_path / "outbox.jsonl", channel)  # as `trainbus train` does
    try:
        assert publisher.target.server is not None  # no bus anywhere: it started its own
        out = trainbus("ctl", "pause", "--run", "embedded-run", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("pause accepted at step 0")
        assert "embedded" not in out.stderr and "in use" not in out.stderr  # it found the trainer's server
    finally:
        publisher.close()
    assert read_state(tmp_path / ".trainbus") is None  # the server stopped with its run and unrecorded itself


def offline_outbox(path: Path, run_id: str, steps: range) -> None:
    """A run that trained with the bus down: every event left in its outbox."""
    box = Outbox(path)
    box.append([record_of(TrainStep(event_id=f"{run_id}.1.{i}", run_id=run_id, seq=i, step=i, epoch=0.0, loss=1.0, learning_rate=1e-3)) for i in steps])  # fmt: skip
    box.close()


def test_outbox_flush_sends_what_runs_left_behind_once(tmp_path: Path, nats_server: RunningServer) -> None:
    url = nats_server.url
    runs = tmp_path / "runs"
    offline_outbox(runs / "left-a" / "outbox.jsonl", "left-a", range(1, 82))  # `trainbus train`'s outbox
    offline_outbox(runs / "outbox-left-b.jsonl", "left-b", range(1, 11))  # the callback's, in a user's script
    out = trainbus("outbox", "flush", "left-a", cwd=tmp_path, NATS_URL=url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{Path('runs/left-a/outbox.jsonl')}: 81 events: 81 sent, 0 already stored, 0 left\n"
    assert [e.seq for e in events_of(url, "left-a")] == list(range(1, 82))
    assert events_of(url, "left-b") == []  # only the run asked for
    out = trainbus("outbox", "flush", cwd=tmp_path, NATS_URL=url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{Path('runs/outbox-left-b.jsonl')}: 10 events: 10 sent, 0 already stored, 0 left\n"
    assert [e.seq for e in events_of(url, "left-b")] == list(range(1, 11))
    again = trainbus("outbox", "flush", cwd=tmp_path, NATS_URL=url)
    assert (again.returncode, again.stdout) == (0, "no outbox with events under runs/: nothing left to send\n")
    sent = trainbus("outbox", "flush", "left-a", cwd=tmp_path, NATS_URL=url)  # everything was sent: not an error
    assert (sent.returncode, sent.stdout, sent.stderr) == (0, "run left-a: nothing left to send\n", "")
    missing = trainbus("outbox", "flush", "nope", cwd=tmp_path, NATS_URL=url)
    assert (missing.returncode, missing.stderr) == (
        2,
        "trainbus outbox: no run 'nope' under runs/ (neither runs/nope/ nor an outbox of it)\n",
    )


def test_outbox_flush_on_a_terminal_writes_console_lines_not_json(tmp_path: Path, nats_server: RunningServer) -> None:
    offline_outbox(tmp_path / "runs" / "tty" / "outbox.jsonl", "tty", range(1, 4))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    primary, terminal = os.openpty()  # stderr on a terminal, as in a shell
    try:
        out = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "outbox", "flush", "tty"], cwd=tmp_path,
            env={**env, "NATS_URL": nats_server.url}, stdout=subprocess.PIPE, stderr=terminal, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        os.close(terminal)
        err = _read_all(primary)
    finally:
        os.close(primary)
    assert out.returncode == 0 and out.stdout.endswith("3 events: 3 sent, 0 already stored, 0 left\n")
    lines = [line for line in err.splitlines() if line.strip()]
    assert any("events waiting in the outbox" in line for line in lines), err  # a log line, as the console writes it
    assert not [line for line in lines if line.lstrip().startswith("{")], err


def _read_all(fd: int) -> str:
    data = b""
    with contextlib.suppress(OSError):  # EIO once the other end is closed and drained
        while chunk := os.read(fd, 65536):
            data += chunk
    return data.decode(errors="replace")


def test_outbox_flush_leaves_an_outbox_its_trainer_still_holds(tmp_path: Path, nats_server: RunningServer) -> None:
    url = nats_server.url
    path = tmp_path / "runs" / "busy" / "outbox.jsonl"
    offline_outbox(path, "busy", range(1, 6))
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; f = open({str(path)!r}, 'ab'); print('open', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        out = trainbus("outbox", "flush", cwd=tmp_path, NATS_URL=url)
        assert out.returncode == 0, out.stderr
        assert (
            out.stdout
            == f"{Path('runs/busy/outbox.jsonl')}: skipped, open in process {holder.pid} (its trainer sends it)\n"
        )
        assert events_of(url, "busy") == []
    finally:
        holder.kill()
        holder.wait()
