"""`trainbus sweep --queue` against a real nats-server with no agent: each trial is a job carrying the
config's text, the sampled values and its sweep tag; a trial waiting for a slot is not failed for
its silence, a restarted driver adopts it without queueing it again, and when the trial is stopped
while it still waits, its job leaves the queue. No trainer runs here: tests/end_to_end/
test_sweep_queue.py runs queued trials on an agent."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats.js.errors
import optuna
import pytest
from nats.aio.client import Client as NATS

from runtime.bus.server import RunningServer, start_server
from runtime.launch.jobs import JobStore
from runtime.settings import ServerSettings
from schemas import AuditFlag, event_subject
from schemas.jobs import JobRecord
from schemas.subjects import QUEUE_STREAM
from tests.conftest import REPO, wait_until
from tests.end_to_end.conftest import trainbus_env

NAME = "sq"
STALL = 2.0
"""The drivers' --stall-after: a trial adopted from a driver that started its process would fail after it."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of this module's own: no agent of another test may take its jobs."""
    running = start_server(ServerSettings(), tmp_path_factory.mktemp("sweep-queue"), lock=False)
    yield running
    running.stop()


def driver(url: str, tmp: Path, out: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "runtime.cli", "sweep", "configs/tiny.yaml", "--space",
            "tests/end_to_end/sweep_space.yaml", "--trials", "1", "--queue", "--name", NAME,
            "--stall-after", str(STALL), "--set", f"state_dir={tmp / 'state'}", "--set", "training.max_steps=7"]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, env=trainbus_env(url), stdout=out.open("w"), stderr=subprocess.STDOUT, text=True)  # fmt: skip


async def _read(url: str) -> tuple[list[JobRecord], int]:
    nc = NATS()
    await nc.connect(url)
    try:
        js = nc.jetstream()
        try:
            records = await (await JobStore.open(js)).all()
        except nats.js.errors.BucketNotFoundError:  # the driver has not provisioned the queue yet
            return [], 0
        return records, (await js.stream_info(QUEUE_STREAM)).state.messages
    finally:
        await nc.close()


def jobs(url: str) -> list[JobRecord]:
    return asyncio.run(_read(url))[0]


def queued_messages(url: str) -> int:
    return asyncio.run(_read(url))[1]


async def _flag(url: str, run_id: str) -> None:
    """What the audit gate publishes when a critical rule fires: the driver stops the trial."""
    flag = AuditFlag(event_id=f"{run_id}.audit.test.1", run_id=run_id, seq=1, source="audit", rule="test_rule",
                     severity="critical", message="stop this trial", judged_event_id=f"{run_id}.1.1")  # fmt: skip
    nc = NATS()
    await nc.connect(url)
    try:
        await nc.jetstream().publish(event_subject(run_id, flag.type), flag.model_dump_json().encode())
    finally:
        await nc.close()


def test_a_waiting_trial_is_adopted_by_a_restarted_driver_and_a_stop_takes_its_job_out_of_the_queue(
    server: RunningServer, tmp_path: Path
) -> None:
    first_out, second_out = tmp_path / "first.out", tmp_path / "second.out"
    first = driver(server.url, tmp_path, first_out)
    try:
        queued = wait_until(lambda: jobs(server.url), timeout=60, what="the trial's job")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    (job,) = queued
    spec = job.spec
    assert (spec.run_id, spec.sweep and (spec.sweep.name, spec.sweep.trial)) == (f"{NAME}-t0", (NAME, 0))
    assert spec.config_yaml == (REPO / "configs/tiny.yaml").read_text()  # an agent elsewhere needs no copy
    assert spec.overrides[-2:] == ["training.max_steps=7", "training.learning_rate=0.01"]  # sampled values last
    assert job.state == "queued" and spec.submitted_by == f"sweep:{NAME}"
    assert f"trial 0 (run {NAME}-t0): queued as job {spec.job_id}: training.learning_rate=0.01" in first_out.read_text()

    second = driver(server.url, tmp_path, second_out)
    try:
        wait_until(
            lambda: "its driver is gone" in second_out.read_text(), timeout=60, what="the second driver to adopt"
        )
        time.sleep(3 * STALL)  # longer than --stall-after: a job waiting for a slot is no silent trainer
        assert second.poll() is None, second_out.read_text()
        asyncio.run(_flag(server.url, f"{NAME}-t0"))
        assert second.wait(60) == 1  # no trial completed
    finally:
        if second.poll() is None:
            second.kill()
    said = second_out.read_text()
    assert "queued as job" not in said  # adopted, not queued again
    assert re.search(rf"critical audit flag test_rule: stop this trial; its job {spec.job_id} left the queue", said), (
        said
    )
    (cancelled,) = jobs(server.url)
    assert (cancelled.state, cancelled.reason) == ("cancelled", "cancelled while waiting")
    assert queued_messages(server.url) == 0  # no agent will ever get it
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{tmp_path / 'state' / 'sweeps.db'}")
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["job_id"] == spec.job_id
    assert trial.user_attrs["reason"].startswith("critical audit flag test_rule")
