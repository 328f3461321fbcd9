"""The `trainbus` CLI against a real nats-server: events, runs, up, errors and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.bus.connect import BusTarget
from runtime.bus.server import RunningServer, read_state
from runtime.publish.sinks import Stamper
from runtime.settings import Settings
from schemas import Heartbeat, RunStarted, RunState, TrainStep
from tests.publishing import OutboxPublisher

HP = {"learning_rate": 1e-3, "max_grad_norm": 1.0}


def trainbus(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def published_run(target: BusTarget, settings: Settings, tmp_path: Path) -> Iterator[str]:
    run_id = f"cli-{time.monotonic_ns()}"
    publisher = OutboxPublisher(target, settings, outbox_path=tmp_path / "outbox.jsonl")
    stamper = Stamper(publisher, run_id)
    stamper.emit(
        RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d", hyperparameters=HP
    )
    for step in (1, 2, 3):
        stamper.emit(
            TrainStep, step=step, epoch=step / 10, loss=float("nan") if step == 3 else 1.0 / step, learning_rate=1e-3
        )
    stamper.emit(Heartbeat, step=3, phase="training")
    stamper.emit(RunState, state="paused", step=3, reason="operator")
    publisher.close()
    yield run_id


def test_events_replays_a_run_as_json_lines_and_table(
    nats_server: RunningServer, published_run: str, tmp_path: Path
) -> None:
    env = {"NATS_URL": nats_server.url}
    out = trainbus("events", "--run", published_run, "--json", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[3]["loss"] == "NaN"
    table = trainbus("events", "--run", published_run, cwd=tmp_path, env=env)
    assert table.returncode == 0
    assert "train.step" in table.stdout and "loss=nan" in table.stdout and "state=paused" in table.stdout


def test_events_follow_prints_live_events(
    nats_server: RunningServer, target: BusTarget, settings: Settings, tmp_path: Path
) -> None:
    run_id = f"follow-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["NATS_URL"] = nats_server.url
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "events", "--run", run_id, "--follow", "--json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # no wait for the follower: it replays from the start, so an event sent first still arrives
        publisher = OutboxPublisher(target, settings, outbox_path=tmp_path / "o.jsonl")
        Stamper(publisher, run_id).emit(TrainStep, step=1, epoch=0, loss=0.5, learning_rate=1e-3)
        publisher.close()
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line)["run_id"] == run_id
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("form", ["table", "--json"])
def test_events_into_head_ends_quietly_when_head_has_read_enough(
    nats_server: RunningServer, target: BusTarget, settings: Settings, tmp_path: Path, form: str
) -> None:
    run_id = f"piped-{time.monotonic_ns()}"
    publisher = OutboxPublisher(target, settings, outbox_path=tmp_path / "o.jsonl")
    stamper = Stamper(publisher, run_id)
    for step in range(2000):  # far more than a pipe holds: the writer meets the closed pipe
        stamper.emit(Heartbeat, step=step, phase="training")
    publisher.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")} | {"NATS_URL": nats_server.url}
    flags = "--json" if form == "--json" else ""
    out = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m runtime.cli events --run {run_id} {flags} | head -3; exit ${{PIPESTATUS[0]}}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert len(out.stdout.splitlines()) == 3
    assert out.stderr == ""  # no BrokenPipeError traceback, no never-retrieved CancelledError
    assert out.returncode == 141  # what a shell reports for a writer its reader left (128 + SIGPIPE)


def test_runs_lists_latest_state(nats_server: RunningServer, published_run: str, tmp_path: Path) -> None:
    out = trainbus("runs", "--json", cwd=tmp_path, env={"NATS_URL": nats_server.url})
    assert out.returncode == 0, out.stderr
    runs = {r["run_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert runs[published_run]["state"] == "paused"
    assert runs[published_run]["step"] == 3
    assert runs[published_run]["hyperparameters"]["learning_rate"] == 1e-3


def test_unknown_run_and_bad_run_id_exit_2(nats_server: RunningServer, published_run: str, tmp_path: Path) -> None:
    env = {"NATS_URL": nats_server.url}
    missing = trainbus("events", "--run", "no-such-run", cwd=tmp_path, env=env)
    assert missing.returncode == 2
    assert "no events for run 'no-such-run'" in missing.stderr and published_run in missing.stderr
    bad = trainbus("events", "--run", "bad.id", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "invalid run id" in bad.stderr and "Traceback" not in bad.stderr


def test_unreachable_bus_exits_3_naming_url_and_trainbus_up(tmp_path: Path) -> None:
    out = trainbus("runs", "--set", "bus.connect_timeout=1", cwd=tmp_path, env={"NATS_URL": "nats://127.0.0.1:1"})
    assert out.returncode == 3
    assert "nats://127.0.0.1:1" in out.stderr and "trainbus up" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("bus:\n  urll: x\n")
    out = trainbus("runs", "--config", "s.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "trainbus runs: s.yaml:2: bus.urll: unknown key (did you mean url?)"


def test_embedded_bus_for_the_command_when_none_is_running(tmp_path: Path) -> None:
    out = trainbus("runs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "started an embedded nats-server" in out.stderr
    assert "no runs yet" in out.stdout
    assert read_state(tmp_path / ".trainbus") is None  # it was only for the command's lifetime


def test_up_is_found_by_other_commands_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "up", "--no-services"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening at nats://127.0.0.1:" in line
        url = read_state(tmp_path / ".trainbus")
        assert url is not None and url in line
        runs = trainbus("runs", cwd=tmp_path)
        assert runs.returncode == 0 and "embedded" not in runs.stderr
        twice = trainbus("up", cwd=tmp_path)
        assert twice.returncode == 1 and "already running" in twice.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert proc.returncode == 0
    assert read_state(tmp_path / ".trainbus") is None
    assert not (tmp_path / ".trainbus" / "bus.json").exists()
