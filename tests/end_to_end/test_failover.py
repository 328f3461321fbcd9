"""SIGKILL the stream leader of a `trainbus up --cluster 3` mid-run: the trainer trains on, no event is
lost or stored twice, the audit gate and the exporter carry on, a command is answered after the new
leader is elected, and `up` restarts the node, which rejoins and catches up. A restarted cluster
listens where it did and still holds the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from runtime.bus.server import read_state, read_state_record
from tests.conftest import wait_until
from tests.end_to_end.conftest import ctl, of_type, start_trainer, wait_events
from tests.integration.test_folder_bus import up

pytestmark = pytest.mark.slow


def status(cwd: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "status", "--json"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def events_stream(s: dict[str, Any]) -> dict[str, Any]:
    return next(x for x in s["streams"] if x["name"] == "TRAINBUS_EVENTS")


def caught_up(cwd: Path, node: str) -> bool:
    stream = events_stream(status(cwd))
    peers = {p["name"]: p for p in stream.get("followers", [])}
    everyone = {stream.get("leader"), *peers}
    return node in everyone and len(everyone) == 3 and all(p["current"] and not p["offline"] for p in peers.values())


def test_killing_the_stream_leader_mid_run_loses_nothing_and_everyone_carries_on(tmp_path: Path) -> None:
    run = "failover-run"
    with up(tmp_path, "--cluster", "3", "--service-args", "exporter=--port 0") as (_, lines):
        url = read_state(tmp_path / ".trainbus")
        assert url is not None and url.count(",") == 2 and "JetStream cluster of 3 nodes" in lines[0]
        wait_until(lambda: any("serving http" in line for line in lines), what="the exporter")
        metrics = next(line for line in lines if "serving http" in line).split()[-1]
        before = events_stream(status(tmp_path))
        assert before["replicas"] == 3 and before["leader"]
        trainer = start_trainer(
            url, "configs/tiny.yaml", run, tmp_path,
            "training.max_steps=100", "training.logging_steps=1", "training.eval_steps=50",
            "training.save_steps=50", "bus.ack_timeout=2",
        )  # fmt: skip
        try:
            wait_events(url, run, lambda ev: len(of_type(ev, "train.step")) >= 30, timeout=180)
            leader = events_stream(status(tmp_path))["leader"]
            record = read_state_record(tmp_path / ".trainbus")
            assert record is not None
            pid = next(n["pid"] for n in record["nodes"] if n["name"] == leader)
            os.kill(pid, signal.SIGKILL)
            answered = ctl(url, "save", "--run", run, "--wait", "--timeout", "30", "--wait-timeout", "60")
            assert answered.returncode == 0, answered.stderr  # a command works once a new leader is elected
            assert trainer.wait(300) == 0, trainer.output()[-3000:]
        finally:
            if trainer.process.poll() is None:
                trainer.process.kill()
        events = wait_events(
            url, run,
            lambda ev: of_type(ev, "run.finished") and len(of_type(ev, "audit.verdict")) >= len(of_type(ev, "checkpoint")),
            timeout=120,
        )  # fmt: skip
        trainer_events = [e for e in events if e.source == "trainer"]
        assert [e.seq for e in trainer_events] == list(range(1, len(trainer_events) + 1))  # none lost, none twice
        assert len({e.event_id for e in events}) == len(events)
        assert [s.step for s in of_type(trainer_events, "train.step")] == list(range(1, 101))
        assert any(c.trigger == "command" for c in of_type(events, "checkpoint"))
        verdicts = {v.checkpoint_event_id for v in of_type(events, "audit.verdict")}
        assert verdicts == {c.event_id for c in of_type(events, "checkpoint")}  # the audit gate carried on
        assert len(of_type(events, "audit.verdict")) == len(verdicts)

        def exported_step() -> bool:
            with urllib.request.urlopen(metrics, timeout=10) as response:
                text = response.read().decode()
            return bool(re.search(rf'trainbus_global_step{{run_id="{run}"}} 100\.0', text))

        wait_until(exported_step, timeout=60, what="the exporter to show the last step")  # it carried on too
        wait_until(lambda: any(f"cluster node {leader} exited; restarted it" in line for line in lines), what="up")
        wait_until(lambda: caught_up(tmp_path, leader), timeout=120, what=f"{leader} to rejoin and catch up")
    assert "still in" not in trainer.output()  # nothing left in the outbox

    with up(tmp_path, "--cluster", "3", "--no-services"):
        assert read_state(tmp_path / ".trainbus") == url  # the same addresses after a restart
        assert len(wait_events(url, run, lambda ev: len(ev) >= len(events), timeout=60)) == len(events)
