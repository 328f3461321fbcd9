"""`trainbus train` and `trainbus audit` when the bus is there but useless, or not there (issue 16: 9, 10).

A server without JetStream is one clear line and exit 3, not a traceback; an unreachable bus
stops `trainbus train` at once (exit 3) unless it may start offline (`--offline-ok`), when
every event waits in the run's outbox.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.bus.server import find_binary
from runtime.cli.main import main
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def no_jetstream(tmp_path: Path) -> Iterator[str]:
    """A plain nats-server, JetStream not enabled (as a default `nats-server` or many managed ones)."""
    port = free_port()
    log = (tmp_path / "plain-nats.log").open("w")
    process = subprocess.Popen(
        [find_binary(), "-a", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_until(lambda: listening(port), what="the plain nats-server to listen")
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("trainbus")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_on_a_server_without_jetstream_is_one_line_and_exit_3(
    workdir: Path, no_jetstream: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NATS_URL", no_jetstream)
    assert main(["train", "configs/tiny.yaml", "--set", "training.max_steps=2"]) == 3
    line = one_line(capsys.readouterr().err)
    assert "JetStream" in line and no_jetstream in line


def test_audit_on_a_server_without_jetstream_is_one_line_and_exit_3(
    workdir: Path, no_jetstream: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NATS_URL", no_jetstream)
    assert main(["audit"]) == 3
    line = one_line(capsys.readouterr().err)
    assert "JetStream" in line


def test_train_offline_ok_trains_with_the_bus_down_and_keeps_every_event(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    args = ["--set", "training.max_steps=4", "--set", "training.logging_steps=1", "--set", "training.eval_steps=null"]
    code = main(["train", "configs/tiny.yaml", "--run-id", "offline-run", "--set", "bus.connect_timeout=1", *args, "--offline-ok"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    outbox = workdir / "runs/offline-run/outbox.jsonl"
    events = [json.loads(line.split("\t")[2]) for line in outbox.read_text().splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run.started" and events[-1]["type"] == "run.finished"
    assert [e["step"] for e in events if e["type"] == "train.step"] == [1, 2, 3, 4]
    assert f"{len(events)} events still in runs/offline-run/outbox.jsonl" in out
