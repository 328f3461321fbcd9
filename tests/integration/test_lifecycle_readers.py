"""`trainbus runs`, the Prometheus exporter and the dashboard show a run alike: recorded streams (a
resumed run, a stalled run, a paused and stopped run, a sweep trial) stored on a real nats-server
and read back by each reader the way it reads in production, at the same moment."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats
import pytest

from consumers.exporter.collector import RunCollector, build_registry
from consumers.exporter.state import ExporterState
from consumers.exporter.state import handle as exporter_handle
from dashboards.app.snapshot import snapshot_run
from dashboards.app.state import DashboardState
from dashboards.app.state import handle as dashboard_handle
from dashboards.app.tables import state_of
from runtime.bus.server import RunningServer
from runtime.bus.stream import replay, run_summary
from runtime.cli.main import main
from schemas import run_events
from tests.integration.recorded_streams import Clock, Stream, paused_and_stopped, publish, resumed, stalled, sweep_trial

SCENARIOS: dict[str, Callable[[str, Clock], Stream]] = {
    "resumed": resumed,
    "stalled": stalled,
    "paused-stopped": paused_and_stopped,
    "sweep-trial": sweep_trial,
}
from runtime.lifecycle import RUN_STATES  # noqa: E402


def read(url: str, streams: list[Stream], now: float) -> dict[str, dict[str, dict[str, Any]]]:
    """What each reader shows of each run at ``now``: reader -> run -> state, step, attempt, hyper-parameters."""

    async def go() -> dict[str, dict[str, dict[str, Any]]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            shown: dict[str, dict[str, dict[str, Any]]] = {"runs": {}, "exporter": {}, "dashboard": {}}
            for stream in streams:
                summary = await run_summary(js, stream.run_id, now=now)
                shown["runs"][stream.run_id] = {
                    k: summary.get(k) for k in ("state", "step", "attempt", "hyperparameters")
                }
                exporter, dashboard = ExporterState(), DashboardState()
                async for item in replay(js, run_events(stream.run_id)):
                    assert item.event is not None, item.error
                    exporter_handle(item.event, exporter)
                    dashboard_handle(item.event, dashboard, item.stream_seq)
                shown["exporter"][stream.run_id] = scraped(exporter, stream.run_id, now)
                snap = snapshot_run(dashboard.runs[stream.run_id])
                shown["dashboard"][stream.run_id] = {
                    "state": state_of(snap.summary, now), "step": snap.summary.step,
                    "attempt": snap.summary.attempt, "hyperparameters": snap.hyperparameters,
                }  # fmt: skip
            return shown
        finally:
            await nc.close()

    return asyncio.run(go())


def scraped(state: ExporterState, run_id: str, now: float) -> dict[str, Any]:
    """A scrape of /metrics at ``now``: the one state set to 1, the step, the attempt, the hyper-parameters."""
    registry = build_registry(RunCollector(state, threading.Lock(), expire_after=86400.0, clock=lambda: now))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"run_id": run_id, **labels})

    states = [name for name in RUN_STATES if value("trainbus_run_state", state=name) == 1]
    assert len(states) == 1, states
    hp = {s.labels["hyperparameter"]: s.value for m in registry.collect() for s in m.samples
          if s.name == "trainbus_hyperparameter" and s.labels["run_id"] == run_id}  # fmt: skip
    step, attempt = value("trainbus_global_step"), value("trainbus_run_attempt")
    return {"state": states[0], "step": step and int(step), "attempt": attempt and int(attempt), "hyperparameters": hp}


@pytest.fixture(scope="module")
def recorded(nats_server: RunningServer) -> tuple[list[Stream], float]:
    clock = Clock(datetime.now(UTC))
    tag = time.monotonic_ns()
    streams = [build(f"lc-{name}-{tag}", clock) for name, build in SCENARIOS.items()]
    publish(nats_server.url, streams)
    return streams, clock.now.timestamp()


def test_runs_the_exporter_and_the_dashboard_agree_on_state_step_and_attempt(
    nats_server: RunningServer, recorded: tuple[list[Stream], float]
) -> None:
    streams, now = recorded
    shown = read(nats_server.url, streams, now)
    for stream in streams:
        expected = {"state": stream.state, "step": stream.step, "attempt": stream.attempt}
        for reader, runs in shown.items():
            got = runs[stream.run_id]
            assert {k: got[k] for k in expected} == expected, (reader, stream.run_id)
            assert {k: got["hyperparameters"].get(k) for k in stream.hyperparameters} == stream.hyperparameters, (
                reader, stream.run_id,
            )  # fmt: skip


def test_runs_csv_shows_the_values_of_an_applied_set_not_those_of_the_last_step(
    nats_server: RunningServer, recorded: tuple[list[Stream], float], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("NATS_URL", nats_server.url)
    run = next(s for s in recorded[0] if s.run_id.startswith("lc-paused-stopped"))
    assert main(["runs", "--name", run.run_id, "--csv"]) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["state"], row["step"]) == ("stopped", "10")
    assert (row["hyperparameters.weight_decay"], row["hyperparameters.eval_steps"]) == ("0.1", "50")
    assert row["lr_peak"] == "0.003"


def test_last_event_is_the_trainers_and_the_help_says_which_events_count(
    nats_server: RunningServer, recorded: tuple[list[Stream], float], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("NATS_URL", nats_server.url)
    run = next(s for s in recorded[0] if s.run_id.startswith("lc-stalled"))
    assert main(["runs", "--name", run.run_id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    silent = time.time() - recorded[1] + (run.trainer_silent_for or 0)
    assert shown["state"] == "stalled" and shown["tags"] == {"status": "dead?"}
    assert silent - 1 <= shown["age_seconds"] <= silent + 60  # the tag 5 s ago and the audit flag do not count
    assert main(["runs", "--name", run.run_id]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.split()[header.split().index("LAST_EVENT")] == "10m"  # "10m ago", the trainer's silence
    with pytest.raises(SystemExit):
        main(["runs", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert "LAST_EVENT is how long ago the run's trainer last published" in helped
    assert "tags, notes, audit verdicts and predictor loads do not count" in helped
