"""`trainbus exporter` against a real nats-server: values on /metrics, restart safety, bad input."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runtime.bus.connect import BusTarget
from runtime.bus.server import RunningServer
from runtime.publish.sinks import Stamper
from runtime.settings import Settings
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Event,
    Heartbeat,
    RunFinished,
    RunStarted,
    TrainStep,
    event_subject,
)
from tests.conftest import require_tool, wait_until
from tests.integration.conftest import Exporter, publish_raw
from tests.publishing import OutboxPublisher

REPO = Path(__file__).resolve().parents[2]
HP = {"learning_rate": 1e-3}
SHA = "b" * 64
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def publisher(target: BusTarget, settings: Settings, tmp_path: Path) -> Iterator[OutboxPublisher]:
    pub = OutboxPublisher(target, settings, outbox_path=tmp_path / "outbox.jsonl")
    yield pub
    pub.close()


STARTED = {"config": {}, "config_hash": "h", "model": "tiny", "adapter": "lora", "data_fingerprint": "d"}


def run_started(stamper: Stamper, **extra: Any) -> Event:
    return stamper.emit(RunStarted, **STARTED, hyperparameters=HP, **extra)


def test_metrics_show_a_runs_live_events_and_pass_promtool(
    start_exporter: Callable[..., Exporter], publisher: OutboxPublisher, nats_server: RunningServer
) -> None:
    run = f"exp-{time.monotonic_ns()}"
    trainer, audit = Stamper(publisher, run), Stamper(publisher, run, source="audit")
    run_started(trainer)
    assert publisher.flush()
    exporter = start_exporter()
    invalid_before = exporter.value("trainbus_exporter_invalid_events_total") or 0
    for step in (10, 20, 30):
        loss = float("nan") if step == 30 else 1.0 / step
        trainer.emit(TrainStep, step=step, epoch=step / 100, loss=loss, learning_rate=1e-3, grad_norm=0.5)
    trainer.emit(Evaluation, step=20, loss=0.3, accuracy=0.92, macro_f1=0.9, abstain_rate=0.1, ece=0.02)
    first = trainer.emit(Checkpoint, step=20, path="/c/20", sha256=SHA, size_bytes=1000)
    trainer.emit(Checkpoint, step=30, path="/c/30", sha256=SHA, size_bytes=2000)
    audit.emit(
        AuditVerdict,
        checkpoint_event_id=first.event_id,
        checkpoint_step=20,
        checkpoint_path="/c/20",
        verdict="rejected",
    )
    audit.emit(AuditFlag, rule="nan_loss", severity="critical", step=30, message="NaN", judged_event_id="x")
    trainer.emit(CommandResult, command_id="c1", command="pause", status="applied", step=30)
    assert publisher.flush()
    publish_raw(nats_server.url, event_subject(run, "train.step"), b'{"type": "train.step", "loss": "lots"}', "bad-1")
    trainer.emit(Heartbeat, step=30, phase="training")
    assert publisher.flush()

    wait_until(lambda: exporter.value("trainbus_events_total", run_id=run, type="heartbeat") == 1, what="the heartbeat")
    m = exporter.samples()

    def v(name: str, **labels: str) -> float | None:
        return m.get((name, tuple(sorted({"run_id": run, **labels}.items()))))

    shown_loss = v("trainbus_train_loss")
    assert shown_loss is not None and math.isnan(shown_loss)
    assert v("trainbus_global_step") == 30
    assert v("trainbus_grad_norm") == 0.5
    assert v("trainbus_eval_accuracy_ratio") == 0.92
    assert v("trainbus_run_state", state="running") == 1
    assert [v("trainbus_checkpoints", verdict=x) for x in ("pending", "approved", "rejected")] == [1, 0, 1]
    assert v("trainbus_audit_flags_total", rule="nan_loss", severity="critical") == 1
    assert v("trainbus_commands_total", command="pause", result="applied") == 1
    assert v("trainbus_events_total", type="train.step") == 3
    assert time.time() - (v("trainbus_last_event_timestamp_seconds") or 0) < 60
    assert m[("trainbus_exporter_invalid_events_total", ())] == invalid_before + 1
    assert m[("trainbus_exporter_event_lag_seconds_count", ())] >= 9  # live events, not the replay

    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=exporter.text(), capture_output=True, text=True)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr


def test_killing_and_restarting_the_exporter_neither_loses_nor_doubles_counts(
    start_exporter: Callable[..., Exporter], publisher: OutboxPublisher, nats_server: RunningServer
) -> None:
    run = f"restart-{time.monotonic_ns()}"
    trainer, audit = Stamper(publisher, run), Stamper(publisher, run, source="audit")

    def steps(first: int) -> Event:
        for step in range(first, first + 5):
            last = trainer.emit(TrainStep, step=step, epoch=0.0, loss=1.0, learning_rate=1e-3)
        audit.emit(AuditFlag, rule="loss_spike", severity="warning", message="m", judged_event_id="x")
        trainer.emit(CommandResult, command_id=f"c{first}", command="set", status="applied")
        return last

    run_started(trainer)
    last = steps(1)
    assert publisher.flush()
    before = start_exporter()
    counted = {"run_id": run, "type": "train.step"}
    wait_until(lambda: before.value("trainbus_events_total", **counted) == 5, what="the first five steps")
    dupes_before = before.value("trainbus_exporter_duplicate_events_total") or 0
    # the same event again under a new message id (an outbox resend after the dedupe window)
    publish_raw(nats_server.url, event_subject(run, "train.step"), last.model_dump_json().encode(), "resent-1")
    wait_until(lambda: before.value("trainbus_events_total", run_id=run, type="command.result") == 1, what="phase 1")
    wait_until(
        lambda: (before.value("trainbus_exporter_duplicate_events_total") or 0) > dupes_before, what="the resend"
    )
    seen = before.samples()
    assert before.value("trainbus_events_total", **counted) == 5

    before.proc.send_signal(signal.SIGKILL)
    before.proc.wait(10)
    steps(6)
    trainer.emit(RunFinished, status="completed", step=10)
    assert publisher.flush()

    after = start_exporter()
    wait_until(lambda: after.value("trainbus_events_total", run_id=run, type="run.finished") == 1, what="phase 2")
    now = after.samples()
    counters = {key: value for key, value in seen.items() if key[0].endswith("_total") and ("run_id", run) in key[1]}
    assert counters, "no counters of the run before the restart"
    went_back = {key: (value, now.get(key)) for key, value in counters.items() if (now.get(key) or 0) < value}
    assert not went_back
    assert after.value("trainbus_events_total", **counted) == 10
    assert after.value("trainbus_audit_flags_total", run_id=run, rule="loss_spike", severity="warning") == 2
    assert after.value("trainbus_commands_total", run_id=run, command="set", result="applied") == 2
    assert (after.value("trainbus_exporter_duplicate_events_total") or 0) >= dupes_before + 1
    assert after.value("trainbus_run_state", run_id=run, state="completed") == 1


def test_silent_runs_show_stalled_then_leave_metrics_finished_or_not(
    start_exporter: Callable[..., Exporter], publisher: OutboxPublisher
) -> None:
    tag = time.monotonic_ns()
    done, dead, quiet, live = (f"{name}-{tag}" for name in ("done", "dead", "quiet", "live"))
    hours_ago = datetime.now(UTC) - timedelta(hours=2)
    finished, killed = Stamper(publisher, done), Stamper(publisher, dead)
    run_started(finished, time=hours_ago)
    finished.emit(RunFinished, status="completed", step=1, time=hours_ago)
    run_started(killed, time=hours_ago)  # kill -9: no run.finished, ever
    killed.emit(Heartbeat, step=3, phase="training", time=hours_ago)
    run_started(Stamper(publisher, quiet), time=datetime.now(UTC) - timedelta(minutes=20))
    run_started(Stamper(publisher, live))
    assert publisher.flush()
    exporter = start_exporter("--expire-after", "3600", "--stall-after", "600")
    wait_until(lambda: exporter.value("trainbus_run_state", run_id=live, state="running") == 1, what="the live run")
    text = exporter.text()
    assert f'run_id="{done}"' not in text and f'run_id="{dead}"' not in text
    assert exporter.value("trainbus_run_state", run_id=quiet, state="stalled") == 1
    assert exporter.value("trainbus_run_state", run_id=quiet, state="running") == 0
    assert exporter.value("trainbus_run_state", run_id=live, state="stalled") == 0
    assert (exporter.value("trainbus_exporter_expired_runs_total") or 0) >= 2


def test_a_port_in_use_exits_2_with_one_line(nats_server: RunningServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        out = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "exporter", "--port", str(port), "--set", f"bus.url={nats_server.url}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == f"trainbus exporter: --port {port}: address already in use"
    assert out.stdout == ""
