"""A real tiny run trains with the audit gate live: a learning-rate blow-up is flagged, the run paused,
a checkpoint saved while paused rejected, earlier ones approved. (The healthy default run, every
checkpoint judged, is in test_training.py with the other tests of that run.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from runtime.bus.server import RunningServer
from runtime.bus.stream import replay
from schemas import AuditFlag, AuditVerdict, Checkpoint, Event, RunFinished, RunState, run_events

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOGGING_STEPS = 2
# The blow-up test judges training health only: at step 20 the tiny model still abstains on
# everything, which the shipped rules (rightly) reject; here the quality rules only flag.
BLOW_UP_RULES = """\
# trainbus audit --rules <this file>   (written by tests/end_to_end/test_audit_e2e.py)
labels_file: {labels}
rules:
  non_finite: {{severity: critical, actions: [flag, reject_checkpoint, pause_run]}}
  loss_spike: {{severity: critical, actions: [flag, reject_checkpoint, pause_run], factor: 3, window: 5, min_increase: 0.5}}
  grad_norm_explosion: {{severity: warning, actions: [flag, reject_checkpoint], threshold: 100}}
  accuracy_floor: {{severity: warning, actions: [flag], min_accuracy: 0.8}}
  abstain_rate: {{severity: warning, actions: [flag]}}
  run_stalled: {{severity: warning, actions: [flag], seconds: 60}}
"""


def clean_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    env["NATS_URL"] = url
    # one torch thread: on 2 shared cores, intra-op threads spinning against other processes make
    # each step ~20x slower (measured: a 40-step run took 57 s with default threads, 26 s with one)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def trainbus(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(url), capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(name: str, *args: str, url: str) -> subprocess.Popen[str]:
        log = (tmp_path / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", *args],
            cwd=REPO,
            env=clean_env(url),
            stdout=subprocess.PIPE if name == "audit" else log,
            stderr=log,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start_audit(start: Callable[..., subprocess.Popen[str]], url: str, *args: str) -> subprocess.Popen[str]:
    audit = start("audit", "audit", *args, url=url)
    assert audit.stdout is not None
    line = audit.stdout.readline()  # the tests start the run only once the gate watches
    assert line.startswith("trainbus audit: watching"), line
    return audit


def train_args(run: str, out: Path, max_steps: int) -> list[str]:
    sets = [
        f"training.max_steps={max_steps}",
        "training.save_steps=20",
        "training.eval_steps=20",
        f"training.logging_steps={LOGGING_STEPS}",
        f"training.output_dir={out}",
        "data.max_eval_samples=16",  # evaluation dominates wall time on 2 cores
    ]
    return ["train", "configs/tiny.yaml", "--run-id", run, *[a for s in sets for a in ("--set", s)]]


async def events_of(nc: NATS, run: str) -> list[Event]:
    return [d.event async for d in replay(nc.jetstream(), run_events(run)) if d.event is not None]


async def wait_for(
    nc: NATS, run: str, done: Callable[[list[Event]], Any], what: str, trainer: subprocess.Popen[str], timeout: float
) -> Any:
    """Poll the run's stored events until ``done`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        events = await events_of(nc, run)
        if result := done(events):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; trainer exit code {trainer.poll()}")
        await asyncio.sleep(0.2)


def of(events: list[Event], cls: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


async def test_blow_up_is_flagged_paused_and_its_checkpoint_rejected(
    nats_server: RunningServer, nc: NATS, tmp_path: Path, processes: Any
) -> None:
    url, run = nats_server.url, f"e2e-audit-{time.strftime('%H%M%S')}-{os.getpid()}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(BLOW_UP_RULES.format(labels=REPO / "configs/labels.yaml"))
    start_audit(processes, url, "--rules", str(rules), "--run", run)
    trainer = processes("trainer", *train_args(run, tmp_path / "runs", 300), url=url)

    def approved(events: list[Event]) -> list[AuditVerdict]:
        return [v for v in of(events, AuditVerdict) if v.verdict == "approved"]

    first = (await wait_for(nc, run, approved, "an approved checkpoint", trainer, 120))[0]
    out = await asyncio.to_thread(trainbus, "ctl", "set", "--run", run, "learning_rate=5", "--wait", url=url)
    assert out.returncode == 0, out.stderr

    def paused(events: list[Event]) -> tuple[AuditFlag, RunState] | None:
        states = [s for s in of(events, RunState) if s.state == "paused"]
        critical = [f for f in of(events, AuditFlag) if f.severity == "critical"]
        return (critical[0], states[0]) if states and critical else None

    flag, pause = await wait_for(nc, run, paused, "the run to be paused", trainer, 60)
    print(f"set at step ~{first.checkpoint_step}; {flag.rule} flagged at step {flag.step}; paused at step {pause.step}")
    assert flag.rule in ("loss_spike", "non_finite") and flag.actions_taken == ["pause_run: accepted"]
    assert flag.step is not None and pause.step <= flag.step + 2 * LOGGING_STEPS, (flag.step, pause.step)
    assert pause.reason.startswith(f"audit {flag.rule} (critical)")

    out = await asyncio.to_thread(trainbus, "ctl", "save", "--run", run, "--wait", url=url)
    assert out.returncode == 0, out.stderr

    def saved_verdict(events: list[Event]) -> AuditVerdict | None:
        saved = [c for c in of(events, Checkpoint) if c.trigger == "command"]
        judged = {v.checkpoint_event_id: v for v in of(events, AuditVerdict)}
        return judged.get(saved[0].event_id) if saved else None

    verdict = await wait_for(nc, run, saved_verdict, "the verdict on the paused save", trainer, 30)
    assert verdict.verdict == "rejected" and verdict.checkpoint_step == pause.step
    assert any(flag.event_id in reason for reason in verdict.reasons), verdict.reasons

    out = await asyncio.to_thread(trainbus, "ctl", "stop", "--run", run, url=url)
    assert out.returncode == 0, out.stderr
    assert await asyncio.to_thread(trainer.wait, 60) == 0

    def all_judged(events: list[Event]) -> list[Event] | None:
        done = of(events, RunFinished) and len(of(events, AuditVerdict)) == len(of(events, Checkpoint))
        return events if done else None

    events = await wait_for(nc, run, all_judged, "a verdict on every checkpoint", trainer, 30)
    verdicts = {v.checkpoint_event_id: v for v in of(events, AuditVerdict)}
    assert len(verdicts) == len(of(events, AuditVerdict))  # exactly one each
    for ckpt in of(events, Checkpoint):
        expected = "approved" if ckpt.step < flag.step else "rejected"
        assert verdicts[ckpt.event_id].verdict == expected, (ckpt.step, flag.step, verdicts[ckpt.event_id].reasons)
    assert first.checkpoint_step < flag.step
    assert of(events, RunFinished)[0].status == "stopped"
