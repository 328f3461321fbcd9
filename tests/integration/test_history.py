"""Managing runs against a real nats-server: `events` and `runs` filters and CSV, `tag`, `note`,
`runs rm`; one line and exit 3 on a server without JetStream; `checkpoints` says what it skips."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import nats.js.errors
import pytest

from runtime.bus.connect import BusTarget
from runtime.bus.server import RunningServer
from runtime.cli.main import main
from runtime.publish.sinks import Stamper
from runtime.settings import Settings
from schemas import Checkpoint, Evaluation, Heartbeat, RunFinished, RunStarted, TrainStep
from tests.integration.test_cli_bus_faults import no_jetstream as no_jetstream  # a fixture
from tests.publishing import OutboxPublisher

HP = {"learning_rate": 1e-3, "max_grad_norm": 1.0}
HOURS_AGO = datetime.now(UTC) - timedelta(hours=3)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def bus(nats_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    return nats_server.url


def publish_run(target: BusTarget, settings: Settings, tmp_path: Path, run_id: str, *, finished: bool = True) -> None:
    publisher = OutboxPublisher(target, settings, outbox_path=tmp_path / f"{run_id}.jsonl")
    stamper = Stamper(publisher, run_id)
    stamper.emit(RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d",
                 hyperparameters=HP, max_steps=20, time=HOURS_AGO)  # fmt: skip
    for step in (5, 10):
        stamper.emit(TrainStep, step=step, epoch=step / 20, loss=2.0 / step, learning_rate=1e-3, samples_per_second=8.0)
    stamper.emit(Heartbeat, step=13, phase="training")  # the run is past its last logged step
    stamper.emit(Evaluation, step=10, loss=0.3, accuracy=0.9, num_samples=10)
    stamper.emit(Checkpoint, step=10, path=f"/runs/{run_id}/checkpoint-10", sha256="a" * 64, size_bytes=10)
    if finished:
        stamper.emit(RunFinished, status="completed", step=13)
    publisher.close()


@pytest.fixture
def run_id(target: BusTarget, settings: Settings, tmp_path: Path, nc: object) -> Iterator[str]:
    run = f"hist-{time.monotonic_ns()}"
    publish_run(target, settings, tmp_path, run)
    yield run


def test_events_filters_and_csv_for_a_spreadsheet(bus: str, run_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "events", "--run", run_id, "--type", "train.step", "--csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["type"], int(r["step"]), float(r["loss"])) for r in rows] == [
        ("train.step", 5, 0.4),
        ("train.step", 10, 0.2),
    ]
    assert rows[0]["samples_per_second"] == "8.0" and rows[0]["run_id"] == run_id
    code, out, _ = run_cli(capsys, "events", "--run", run_id, "--no-heartbeats", "--json")
    assert [json.loads(line)["type"] for line in out.splitlines()] == [
        "run.started", "train.step", "train.step", "eval", "checkpoint", "run.finished",
    ]  # fmt: skip
    code, out, _ = run_cli(capsys, "events", "--run", run_id, "--since", "1h", "--type", "run.started,eval")
    assert code == 0 and "eval" in out and "run.started" not in out  # started 3 hours ago
    with pytest.raises(SystemExit) as exited:
        main(["events", "--run", run_id, "--type", "train.stepz"])
    assert exited.value.code == 2 and "train.stepz: unknown event type (known: run.started" in capsys.readouterr().err


def test_runs_filters_csv_and_the_runs_own_step(bus: str, run_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "runs", "--name", f"{run_id[:8]}*", "--state", "completed", "--json")
    assert code == 0, err
    [run] = [json.loads(line) for line in out.splitlines() if json.loads(line)["run_id"] == run_id]
    assert (run["step"], run["loss_step"], run["loss"]) == (13, 10, 0.2)  # STEP: the run's, LOSS: the last logged
    code, out, _ = run_cli(capsys, "runs", "--name", run_id, "--state", "running,stalled")
    assert out.strip() == "no runs match"
    code, out, _ = run_cli(capsys, "runs", "--name", run_id, "--csv")
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert (row["run_id"], row["state"], row["step"], row["hyperparameters.learning_rate"]) == (
        run_id, "completed", "13", "0.001",
    )  # fmt: skip
    code, out, _ = run_cli(
        capsys, "runs", "--name", run_id, "--since", (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    )
    assert out.strip() == "no runs match"


def test_tag_and_note_are_events_of_the_run(bus: str, run_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "tag", run_id, "team=risk", "dataset=v2")[0] == 0
    code, out, err = run_cli(capsys, "tag", run_id, "dataset=")
    assert code == 0 and out.strip() == f"removed tag dataset from run {run_id}"
    code, out, err = run_cli(capsys, "note", run_id, "loss plateaued; try a lower lr")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "events", "--run", run_id, "--type", "run.tag,run.note", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["seq"], e["source"]) for e in events] == [
        ("run.tag", 1, "user"), ("run.tag", 2, "user"), ("run.note", 3, "user"),
    ]  # fmt: skip
    assert events[2]["text"] == "loss plateaued; try a lower lr"
    code, out, _ = run_cli(capsys, "runs", "--name", run_id, "--json")
    assert json.loads(out)["tags"] == {"team": "risk"}  # dataset= removed it
    code, out, _ = run_cli(capsys, "runs", "--name", run_id)
    assert out.splitlines()[0].split()[-1] == "TAGS" and out.splitlines()[1].endswith("team=risk")
    code, _, err = run_cli(capsys, "tag", "no-such-run", "a=b")
    assert code == 2 and err.strip() == "trainbus tag: no run 'no-such-run' in the stream (see `trainbus runs`)"


def test_runs_rm_purges_the_runs_subjects_and_bucket_entries(
    bus: str, run_id: str, target: BusTarget, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def bucket() -> None:
        conn = await nats.connect(bus)
        try:  # the session's audit gate may have made it already, with its own settings
            kv = await conn.jetstream().key_value("TRAINBUS_CHECKPOINTS")
        except nats.js.errors.NotFoundError:
            kv = await conn.jetstream().create_key_value(bucket="TRAINBUS_CHECKPOINTS")
        await kv.put(f"{run_id}.10", b"{}")
        await kv.put(f"{run_id}.best", b"{}")
        await kv.put("other-run.10", b"{}")
        await conn.close()

    asyncio.run(bucket())
    code, _, err = run_cli(capsys, "runs", "rm", run_id)
    assert code == 2 and "add --yes" in err  # no terminal to ask on
    code, out, err = run_cli(capsys, "runs", "rm", run_id, "--yes")
    assert code == 0, err
    assert out.strip() == (
        f"removed run {run_id}: 7 events from TRAINBUS_EVENTS (subjects trainbus.events.{run_id}.>) and 2 entries "
        "from TRAINBUS_CHECKPOINTS; its checkpoint folders on disk are left as they are"
    )
    code, _, err = run_cli(capsys, "events", "--run", run_id)
    assert code == 2 and f"no events for run {run_id!r}" in err
    live = f"live-{time.monotonic_ns()}"
    publish_run(target, settings, tmp_path, live, finished=False)
    code, _, err = run_cli(capsys, "runs", "rm", live, "--yes")
    assert code == 2 and f"run {live} is running: stop it first" in err


def test_events_and_runs_on_a_server_without_jetstream_are_one_line_and_exit_3(
    no_jetstream: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NATS_URL", no_jetstream)
    for args in (["events", "--run", "r1"], ["runs"], ["runs", "rm", "r1", "--yes"], ["tag", "r1", "a=b"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 3, (args, err)
        assert err.strip().splitlines() == [f"trainbus {args[0]}: JetStream is not enabled on this NATS server: "
                                            "start nats-server with -js (or a jetstream {} block), or use `trainbus up`"]  # fmt: skip


def test_checkpoints_says_it_skipped_events_of_a_newer_trainbus(
    bus: str, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def newer() -> None:
        conn = await nats.connect(bus)
        event = {"type": "checkpoint", "event_id": f"{run_id}.2.1", "run_id": run_id, "attempt": 2, "seq": 1,
                 "schema_version": 99, "step": 20, "path": "/x", "sha256": "b" * 64, "size_bytes": 1}  # fmt: skip
        subject = f"trainbus.events.{run_id}.checkpoint"
        await conn.jetstream().publish(subject, json.dumps(event).encode(), headers={"Nats-Msg-Id": event["event_id"]})
        await conn.close()

    asyncio.run(newer())
    code, out, err = run_cli(capsys, "checkpoints", "--run", run_id, "--json")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in out.splitlines()] == [10]
    assert "events written by a newer trainbus are skipped; upgrade trainbus to read them" in err
