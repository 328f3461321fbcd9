"""Tolerant on read, against a real nats-server: every reader takes an event carrying fields it
does not know, and skips an event of a newer schema_version, saying so once per run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from runtime.bus.server import RunningServer
from runtime.bus.stream import ensure_stream, replay
from runtime.publish.sinks import MemorySink, Stamper
from runtime.settings import StreamSettings
from schemas import SCHEMA_VERSION, AuditFlag, Event, Heartbeat, RunStarted, TrainStep, event_subject
from tests.conftest import wait_until
from tests.integration.conftest import REPO, Exporter

NEWER = "events written by a newer trainbus are skipped"


def later_release(event: Event, **changes: Any) -> bytes:
    """``event`` as a later release writes it: a new field at the top and one inside a nested object."""
    data = json.loads(event.model_dump_json())
    data["added_later"] = {"anything": [1, 2]}
    if isinstance(data.get("hyperparameters"), dict):
        data["hyperparameters"]["new_knob"] = 3
    return json.dumps({**data, **changes}).encode()


def publish_run(url: str, run: str) -> None:
    """A run whose events all carry unknown fields, and two heartbeats of a newer contract."""
    trainer = Stamper(MemorySink(), run)
    events = [
        trainer.emit(RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d",
                     hyperparameters={"learning_rate": 1e-3}),
        trainer.emit(TrainStep, step=1, epoch=0.1, loss=1.0, learning_rate=1e-3),
        trainer.emit(TrainStep, step=2, epoch=0.2, loss=float("nan"), learning_rate=1e-3),
        trainer.emit(Heartbeat, step=2, phase="training"),
    ]  # fmt: skip
    messages = [(event_subject(run, e.type), later_release(e), e.event_id) for e in events]
    for _ in range(2):
        newer = trainer.emit(Heartbeat, step=2, phase="training")
        messages.append(
            (event_subject(run, "heartbeat"), later_release(newer, schema_version=SCHEMA_VERSION + 1), newer.event_id)
        )

    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await ensure_stream(js, StreamSettings())
        for subject, data, msg_id in messages:
            await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        await nc.close()

    asyncio.run(go())


def trainbus(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")} | {"NATS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def reports(text: str, run: str) -> int:
    return sum(1 for line in text.splitlines() if NEWER in line and run in line)


def test_events_and_runs_read_unknown_fields_and_skip_a_newer_schema(nats_server: RunningServer) -> None:
    run = f"tolerant-cli-{time.monotonic_ns()}"
    publish_run(nats_server.url, run)
    events = trainbus(nats_server.url, "events", "--run", run)
    assert events.returncode == 0, events.stderr
    rows = events.stdout.splitlines()
    assert len(rows) == 4 and "invalid" not in events.stdout
    assert "run.started" in rows[0] and "loss=nan" in rows[2] and "heartbeat" in rows[3]
    assert reports(events.stderr, run) == 1 and "Traceback" not in events.stderr
    as_json = trainbus(nats_server.url, "events", "--run", run, "--json")
    assert [json.loads(line)["seq"] for line in as_json.stdout.splitlines()] == [1, 2, 3, 4]
    runs = trainbus(nats_server.url, "runs", "--json")
    assert runs.returncode == 0, runs.stderr
    shown = {r["run_id"]: r for r in map(json.loads, runs.stdout.splitlines())}[run]
    assert (shown["state"], shown["step"], shown["hyperparameters"]["learning_rate"]) == ("running", 2, 1e-3)
    assert reports(runs.stderr, run) == 1  # its newest heartbeat is of the newer contract


def test_the_exporter_reads_unknown_fields_and_counts_newer_events_it_skips(
    nats_server: RunningServer, start_exporter: Callable[..., Exporter]
) -> None:
    run = f"tolerant-exp-{time.monotonic_ns()}"
    exporter = start_exporter()
    publish_run(nats_server.url, run)
    counted = {"run_id": run, "type": "heartbeat"}
    wait_until(lambda: exporter.value("trainbus_events_total", **counted) == 1, what="the run's heartbeat")
    assert exporter.value("trainbus_events_total", run_id=run, type="train.step") == 2
    assert exporter.value("trainbus_global_step", run_id=run) == 2
    assert exporter.value("trainbus_run_state", run_id=run, state="running") == 1
    wait_until(lambda: (exporter.value("trainbus_exporter_newer_schema_events_total") or 0) >= 2, what="the skips")
    wait_until(lambda: reports(exporter.log.read_text(), run) == 1, what="the report of the newer events")
    assert exporter.proc.poll() is None


def audit_flags(url: str, run: str) -> list[tuple[str, int | None]]:
    async def read() -> list[tuple[str, int | None]]:
        nc = await nats.connect(url)
        try:
            items = [d async for d in replay(nc.jetstream(), event_subject(run, "audit.flag"))]
        finally:
            await nc.close()
        return [(d.event.rule, d.event.step) for d in items if isinstance(d.event, AuditFlag)]

    return asyncio.run(read())


def test_the_audit_gate_judges_events_with_unknown_fields_and_skips_newer_ones(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    run = f"tolerant-audit-{time.monotonic_ns()}"
    publish_run(nats_server.url, run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")} | {"NATS_URL": nats_server.url}
    log = tmp_path / "audit.log"
    audit = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "audit", "--run", run],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    try:
        assert audit.stdout is not None
        assert audit.stdout.readline().startswith("trainbus audit: watching"), log.read_text()[-2000:]
        flags = wait_until(lambda: audit_flags(nats_server.url, run), what="the audit flag on the NaN loss")
        assert flags == [("non_finite", 2)]
        assert audit.poll() is None
    finally:
        audit.terminate()
        audit.wait(20)
    assert audit.returncode == 0, log.read_text()[-2000:]
    assert reports(log.read_text(), run) == 1
