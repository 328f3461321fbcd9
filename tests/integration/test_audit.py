"""The audit gate as a process against a real nats-server: flags, verdicts, bucket, control, restarts."""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from consumers.audit.engine import Publish, handle, new_state
from consumers.audit.rules import load_rules
from producers.run.control_inbox import ControlChannel
from runtime.bus.connect import BusTarget, Credentials, connect, round_trip
from runtime.bus.server import RunningServer, start_server
from runtime.bus.stream import ensure_stream, replay
from runtime.cli.main import main
from runtime.publish.sinks import Stamper
from runtime.settings import BusSettings, ServerSettings, Settings
from schemas import (
    ALL_EVENTS,
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    Evaluation,
    Event,
    Pause,
    TrainStep,
    control_subject,
    event_subject,
)
from tests.publishing import OutboxPublisher, start_sink

REPO = Path(__file__).resolve().parents[2]
GOOD = {"accuracy": 0.92, "abstain_rate": 0.05, "critical_error_cost": 0.1, "ece": 0.05}
NAN = math.nan


class AuditProcess:
    """`trainbus audit` as a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, url: str, *args: str, log: Path, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        full_env.update({"NATS_URL": url, **(env or {})})
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "audit", *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=log.open("a"),
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 30) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"audit not ready; log: {self.log.read_text()[-2000:]}") from None
        assert line.startswith("trainbus audit: watching trainbus.events."), line
        return line

    def stop(self) -> str:
        """SIGTERM; what it printed after the ready line."""
        self.proc.terminate()
        assert self.proc.wait(15) == 0, self.log.read_text()[-2000:]
        self._reader.join(10)  # it ends at the end of stdout: every line is on the queue then
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return "\n".join(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def audits(tmp_path: Path) -> Iterator[Callable[..., AuditProcess]]:
    started: list[AuditProcess] = []

    def start(url: str, *args: str, env: dict[str, str] | None = None) -> AuditProcess:
        started.append(AuditProcess(url, *args, log=tmp_path / "audit.log", env=env))
        started[-1].wait_ready()
        return started[-1]

    yield start
    for audit in started:
        audit.kill()


def publisher(target: BusTarget, settings: Settings, path: Path, credentials: Credentials | None = None) -> Any:
    return OutboxPublisher(target, settings, outbox_path=path, credentials=credentials)


def step(stamper: Stamper, n: int, loss: float = 1.0) -> Event:
    return stamper.emit(TrainStep, step=n, epoch=n / 100, loss=loss, learning_rate=1e-3, grad_norm=1.0)


def ckpt(stamper: Stamper, n: int) -> Event:
    return stamper.emit(Checkpoint, step=n, path=f"/runs/x/checkpoint-{n}", sha256="a" * 64, size_bytes=10)


def evaluation(stamper: Stamper, n: int, **metrics: float) -> Event:
    return stamper.emit(Evaluation, step=n, loss=0.4, **{**GOOD, **metrics})


async def audit_events(js: JetStreamContext, subject: str) -> list[Any]:
    return [d.event async for d in replay(js, subject) if d.event is not None and d.event.source == "audit"]


async def wait_audit(
    js: JetStreamContext, run_id: str, done: Callable[[list[Any]], bool], timeout: float = 20
) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        events = await audit_events(js, event_subject(run_id, "audit.>"))
        if done(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; audit events so far: {[e.event_id for e in events]}")
        await asyncio.sleep(0.1)


async def trainbus(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`trainbus ARGS` in this process (the console script's own ``main``): exit code, stdout, stderr."""
    capsys.readouterr()
    try:
        code = await asyncio.to_thread(main, list(args))
    finally:
        structlog.reset_defaults()  # main() pointed structlog at the captured stderr, closed after the test
    out, err = capsys.readouterr()
    return code, out, err


async def test_flags_verdicts_bucket_and_checkpoints_command(
    nats_server: RunningServer,
    nc: NATS,
    target: BusTarget,
    settings: Settings,
    tmp_path: Path,
    audits: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = f"audit-{time.monotonic_ns()}"
    audits(nats_server.url, "--run", run)
    pub = publisher(target, settings, tmp_path / "outbox.jsonl")
    stamper = Stamper(pub, run)
    for n in range(1, 11):
        step(stamper, n)
    ev = evaluation(stamper, 10)
    healthy = ckpt(stamper, 10)
    step(stamper, 11)
    nan_step = step(stamper, 12, loss=NAN)
    broken = ckpt(stamper, 12)
    pub.close()
    js = nc.jetstream()
    events = await wait_audit(js, run, lambda e: sum(isinstance(x, AuditVerdict) for x in e) == 2)
    assert [(e.type, e.seq, e.attempt) for e in events] == [
        ("audit.verdict", 1, 1),
        ("audit.flag", 2, 1),
        ("audit.verdict", 3, 1),
    ]
    approved, flag, rejected = events
    assert approved.event_id == f"{run}.audit.verdict.{healthy.event_id}"
    assert (approved.verdict, approved.eval_event_id, approved.metrics["accuracy"]) == ("approved", ev.event_id, 0.92)
    assert flag.event_id == f"{run}.audit.non_finite.{nan_step.event_id}"
    assert (flag.rule, flag.severity, flag.step, flag.actions_taken) == (
        "non_finite",
        "critical",
        12,
        ["pause_run: no trainer answered"],
    )
    assert rejected.event_id == f"{run}.audit.verdict.{broken.event_id}" and rejected.verdict == "rejected"
    assert rejected.reasons == [
        f"non_finite (critical): loss is NaN at step 12, not cleared by step {rejected.checkpoint_step} (flag {flag.event_id})"
    ]

    kv = await js.key_value("TRAINBUS_CHECKPOINTS")
    record = json.loads((await kv.get(f"{run}.10")).value or b"")
    assert (record["path"], record["sha256"], record["verdict_event_id"]) == (
        "/runs/x/checkpoint-10",
        "a" * 64,
        approved.event_id,
    )
    best = json.loads((await kv.get(f"{run}.best")).value or b"")
    assert (best["key"], best["metric"], best["value"]) == (f"{run}.10", "accuracy", 0.92)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(f"{run}.12")

    bus = ("--set", f"bus.url={nats_server.url}")
    code, out, err = await trainbus(capsys, "checkpoints", "--run", run, "--json", *bus)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["step"], r["verdict"], r["best"]) for r in rows] == [(10, "approved", True), (12, "rejected", False)]
    assert rows[1]["reasons"] == rejected.reasons
    code, out, err = await trainbus(capsys, "checkpoints", "--run", run, "--approved", "--json", *bus)
    assert [json.loads(line)["step"] for line in out.splitlines()] == [10]
    code, out, err = await trainbus(capsys, "checkpoints", "--run", run, *bus)
    assert out.splitlines()[0].split() == ["STEP", "ATTEMPT", "TRIGGER", "VERDICT", "BEST", "ACCURACY", "PATH", "WHY"]
    assert "approved  *" in out and "rejected" in out and "non_finite (critical): loss is NaN at step 12" in out
    code, out, err = await trainbus(capsys, "checkpoints", "--run", "no-such-run", *bus)
    assert code == 2 and "no events for run 'no-such-run'" in err


async def test_pause_run_reaches_the_runs_control_channel(
    nats_server: RunningServer, nc: NATS, target: BusTarget, settings: Settings, tmp_path: Path, audits: Any
) -> None:
    run = f"audit-pause-{time.monotonic_ns()}"
    channel = ControlChannel(run)  # the trainer's own command handling, on a real subscription

    async def respond(msg: Msg) -> None:
        await msg.respond(channel.handle(msg.data))

    await nc.subscribe(control_subject(run), cb=respond)
    await round_trip(nc)
    audits(nats_server.url, "--run", run)
    pub = publisher(target, settings, tmp_path / "outbox.jsonl")
    stamper = Stamper(pub, run)
    for n in range(1, 6):
        step(stamper, n)
    step(stamper, 6, loss=NAN)
    step(stamper, 7)
    step(stamper, 8, loss=math.inf)  # a second episode while the run is still paused
    pub.close()
    flags = await wait_audit(nc.jetstream(), run, lambda e: len(e) == 2)
    assert [f.actions_taken for f in flags] == [
        ["pause_run: accepted"],
        ["pause_run: rejected (not_applicable: the run is already paused)"],
    ]
    [command] = channel.take()
    assert isinstance(command, Pause) and command.issued_by == "audit"
    assert command.reason == "audit non_finite (critical): loss is NaN at step 6"


async def test_invalid_events_are_counted_and_acked_and_never_wedge(
    nats_server: RunningServer, nc: NATS, target: BusTarget, settings: Settings, tmp_path: Path, audits: Any
) -> None:
    run = f"audit-bad-{time.monotonic_ns()}"
    audit = audits(nats_server.url, "--run", run)
    js = nc.jetstream()
    await js.publish(event_subject(run, "train.step"), b"not json")
    await js.publish(event_subject(run, "train.step"), json.dumps({"type": "train.step", "run_id": run}).encode())
    pub = publisher(target, settings, tmp_path / "outbox.jsonl")
    step(Stamper(pub, run), 1, loss=NAN)
    pub.close()
    [flag] = await wait_audit(js, run, lambda e: len(e) == 1)
    assert flag.rule == "non_finite"
    deadline = time.monotonic() + 10
    while True:
        info = await js.consumer_info("TRAINBUS_EVENTS", f"trainbus-audit-{run}")
        if (info.num_pending == 0 and info.num_ack_pending == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert (info.num_pending, info.num_ack_pending, info.delivered.stream_seq > 0) == (0, 0, True)
    summary = audit.stop()
    assert "2 invalid skipped" in summary and "published 1 flags" in summary
    assert "invalid event skipped" in audit.log.read_text()


def _publish_history(
    target: BusTarget,
    settings: Settings,
    outbox: Path,
    stop: threading.Event,
    runs: tuple[str, ...] = ("restart-a", "restart-b"),
) -> None:
    """Runs (two by default), with NaN episodes, evals and checkpoints, at a steady pace until ``stop``,
    each through a trainer's publish path (a ``PublisherSink`` and its publisher process)."""
    sinks = [start_sink(target.servers[0], outbox.with_name(f"{run}.{outbox.name}"), run) for run in runs]
    stampers = [Stamper(sink, run) for sink, run in zip(sinks, runs, strict=True)]
    n = 0
    while not stop.is_set() and n < 5000:
        n += 1
        for i, stamper in enumerate(stampers):
            step(stamper, n, loss=NAN if n % 9 == 4 + i else 1.0)
            if n % 10 == 0:
                evaluation(stamper, n, accuracy=0.9 if n % 20 else 0.7)
            if n % 10 == 5 + i:
                ckpt(stamper, n)
        time.sleep(0.02)
    for sink in sinks:
        sink.close()


async def test_killed_and_restarted_auditor_misses_nothing_and_duplicates_nothing(
    tmp_path: Path, audits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(ServerSettings(), tmp_path / "nats", lock=False)  # its own stream: the default durable
    try:
        settings = Settings(state_dir=str(tmp_path / "state"), bus=BusSettings(url=server.url))
        target = BusTarget([server.url], "test")
        nc = await connect(target, settings, name="test")
        js = nc.jetstream()
        await ensure_stream(js, settings.stream)
        audit = audits(server.url)
        stop = threading.Event()
        thread = threading.Thread(target=_publish_history, args=(target, settings, tmp_path / "out.jsonl", stop))
        thread.start()
        try:
            for _ in range(2):  # kill -9 mid-stream, twice, each time after it published a few audit events
                seen = len(await audit_events(js, "trainbus.events.*.audit.>"))
                await wait_audit_count(js, seen + 3)
                audit.kill()
                audit = audits(server.url)  # events keep coming while it is down and starting
            # enough history for the comparison to mean something, however fast the restarts were
            await wait_audit_count(js, max(45, len(await audit_events(js, "trainbus.events.*.audit.>")) + 3))
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 30)

        monkeypatch.chdir(REPO)
        state, expected = new_state(load_rules("configs/audit.yaml")), dict[str, Any]()
        async for item in replay(js, ALL_EVENTS):  # one uninterrupted pass of the engine
            if item.event is not None and item.event.source != "audit":
                state, outputs = handle(item.event, state)
                expected.update({o.event.event_id: o.event for o in outputs if isinstance(o, Publish)})
        assert len(expected) > 40
        deadline = time.monotonic() + 30
        while len(stored := await audit_events(js, "trainbus.events.*.audit.>")) < len(expected):
            assert time.monotonic() < deadline, f"missed: {sorted(set(expected) - {e.event_id for e in stored})}"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # nothing more may arrive
        stored = await audit_events(js, "trainbus.events.*.audit.>")
        assert sorted(e.event_id for e in stored) == sorted(expected)
        for event in stored:
            want = expected[event.event_id]
            if isinstance(event, AuditFlag):
                assert (event.rule, event.step, event.judged_event_id) == (want.rule, want.step, want.judged_event_id)
            else:
                assert (event.verdict, event.reasons) == (want.verdict, want.reasons)
        seqs: dict[tuple[str, int], list[int]] = {}
        for event in stored:
            seqs.setdefault((event.run_id, event.attempt), []).append(event.seq)
        assert {k: sorted(v) for k, v in seqs.items()} == {k: list(range(1, len(v) + 1)) for k, v in seqs.items()}
        checkpoints = Counter([d.event.run_id async for d in replay(js, "trainbus.events.*.checkpoint") if d.event])
        verdicts = Counter(e.run_id for e in stored if isinstance(e, AuditVerdict))
        assert verdicts == checkpoints
        await nc.close()
    finally:
        server.stop()


async def wait_audit_count(js: JetStreamContext, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(await audit_events(js, "trainbus.events.*.audit.>")) < n:
        assert time.monotonic() < deadline, f"fewer than {n} audit events"
        await asyncio.sleep(0.05)


async def test_runs_as_the_auditor_role(
    secured_server: RunningServer, role_passwords: dict[str, str], tmp_path: Path, audits: Any
) -> None:
    admin = Credentials(user="admin", password=role_passwords["admin"])
    settings = Settings(state_dir=str(tmp_path / "state"), bus=BusSettings(url=secured_server.url))
    target = BusTarget([secured_server.url], "test")
    nc = await connect(target, settings, name="admin", credentials=admin)
    js = nc.jetstream()
    await ensure_stream(js, settings.stream)
    run = f"audit-role-{time.monotonic_ns()}"
    audits(secured_server.url, "--run", run, env={"NATS_USER": "auditor", "NATS_PASSWORD": role_passwords["auditor"]})
    trainer = Credentials(user="trainer", password=role_passwords["trainer"])
    pub = publisher(target, settings, tmp_path / "outbox.jsonl", credentials=trainer)
    stamper = Stamper(pub, run)
    evaluation(stamper, 1)
    ckpt(stamper, 1)
    step(stamper, 2, loss=NAN)
    pub.close()
    events = await wait_audit(js, run, lambda e: len(e) == 2)
    assert [e.type for e in events] == ["audit.verdict", "audit.flag"]
    assert events[1].actions_taken == ["pause_run: no trainer answered"]
    kv = await js.key_value("TRAINBUS_CHECKPOINTS")
    assert json.loads((await kv.get(f"{run}.1")).value or b"")["step"] == 1
    await nc.close()
