"""A trainer killed with ``kill -9`` is shown as stalled, with the age of its last event, in
`trainbus runs` and on the exporter's /metrics; resuming the run replaces the stalled attempt."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runtime.bus.server import RunningServer
from tests.conftest import wait_until
from tests.end_to_end.conftest import REPO, ctl, of_type, start_trainer, trainbus_env, wait_events
from tests.integration.conftest import Exporter, start_exporter

__all__ = ["start_exporter"]  # the fixture, shared with the integration tests

RUN = "killed-run"
STALL_AFTER = "5"  # seconds; heartbeats come every 0.5 s while the trainer lives
STEPS = [
    "training.max_steps=40",
    "training.eval_steps=null",
    "training.save_steps=null",
    "publish.heartbeat_seconds=0.5",
]


def runs(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "runs", "--stall-after", STALL_AFTER, *args],
        cwd=REPO, env=trainbus_env(url), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def shown(url: str) -> dict[str, Any]:
    out = runs(url, "--json")
    assert out.returncode == 0, out.stderr
    return {r["run_id"]: r for r in map(json.loads, out.stdout.splitlines())}.get(RUN, {})


@pytest.mark.slow
def test_a_killed_trainer_is_stalled_with_its_age_until_a_resume_replaces_it(
    nats_server: RunningServer, tmp_path: Path, start_exporter: Callable[..., Exporter]
) -> None:
    url = nats_server.url
    exporter = start_exporter("--stall-after", STALL_AFTER)
    trainer = start_trainer(url, "configs/tiny.yaml", RUN, tmp_path, *STEPS)
    try:
        wait_events(url, RUN, lambda ev: of_type(ev, "train.step") or of_type(ev, "heartbeat"), timeout=120)
        # pause, so that it is still training when killed, and save, so that it can be resumed
        for action in ("pause", "save"):
            out = ctl(url, action, "--run", RUN, "--wait")
            assert out.returncode == 0, out.stderr
        wait_until(lambda: shown(url).get("state") == "paused", what="`trainbus runs` to show the paused run")
        trainer.process.kill()  # SIGKILL: no run.finished, no last words
        assert trainer.wait(30) == -9
    finally:
        if trainer.process.poll() is None:
            trainer.process.kill()

    stalled = wait_until(lambda: (r := shown(url)).get("state") == "stalled" and r, what="the run to show stalled")
    assert stalled["attempt"] == 1 and stalled["age_seconds"] > float(STALL_AFTER)
    table = runs(url)
    row = next(line for line in table.stdout.splitlines() if line.startswith(RUN))
    assert "stalled" in row and " ago" in row
    wait_until(lambda: exporter.value("trainbus_run_state", run_id=RUN, state="stalled") == 1, what="/metrics")
    assert exporter.value("trainbus_run_state", run_id=RUN, state="paused") == 0

    resumed = start_trainer(url, "configs/tiny.yaml", RUN, tmp_path, *STEPS, resume=True)
    try:
        assert resumed.wait(240) == 0, resumed.output()[-2000:]
    finally:
        if resumed.process.poll() is None:
            resumed.process.kill()
    after = wait_until(lambda: (r := shown(url)).get("state") == "completed" and r, what="the resumed run")
    assert after["attempt"] == 2
    wait_until(lambda: exporter.value("trainbus_run_state", run_id=RUN, state="completed") == 1, what="/metrics")
    assert exporter.value("trainbus_run_state", run_id=RUN, state="stalled") == 0
    assert exporter.value("trainbus_run_attempt", run_id=RUN) == 2
