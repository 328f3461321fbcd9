"""`trainbus serve --run RUN` with no approved checkpoint, against a real nats-server (#21.3): a
finished run whose checkpoints were all rejected ends it at once (exit 2, the verdicts and how to
serve one anyway); for a live run it says what it waits for."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats

from runtime.bus.server import RunningServer
from runtime.publish.sinks import Stamper
from schemas import AuditVerdict, Checkpoint, RunFinished, RunStarted, TrainStep, event_subject

REPO = Path(__file__).resolve().parents[2]


class _Collect:
    def publish(self, event: Any) -> None:
        pass

    def close(self, timeout: float = 10.0) -> Any:
        return None


def publish(url: str, events: list[Any]) -> None:
    async def send() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for event in events:
            data = event.model_dump_json().encode()
            await js.publish(event_subject(event.run_id, event.type), data, headers={"Nats-Msg-Id": event.event_id})
        await nc.close()

    asyncio.run(send())


def started(run_id: str) -> tuple[Stamper, Any]:
    trainer = Stamper(_Collect(), run_id)
    event = trainer.emit(RunStarted, config={}, config_hash="h", model="tiny", adapter="lora", data_fingerprint="d",
                         hyperparameters={"learning_rate": 1e-3})  # fmt: skip
    return trainer, event


def test_a_finished_run_without_an_approved_checkpoint_is_refused_at_once(
    nats_server: RunningServer, nc: Any, tmp_path: Path
) -> None:
    run_id = f"served-rejected-{time.monotonic_ns()}"
    trainer, first = started(run_id)
    audit = Stamper(_Collect(), run_id, source="audit")
    events: list[Any] = [first]
    for step in (20, 40):
        path = f"/runs/{run_id}/checkpoint-{step}"
        ckpt = trainer.emit(Checkpoint, step=step, path=path, sha256="ab" * 32, size_bytes=1)
        verdict = audit.emit(AuditVerdict, checkpoint_event_id=ckpt.event_id, checkpoint_step=step,
                             checkpoint_path=path, verdict="rejected", reasons=["accuracy_floor"])  # fmt: skip
        events += [ckpt, verdict]
    events.append(trainer.emit(RunFinished, status="completed", step=40, reason="max_steps reached"))
    publish(nats_server.url, events)
    out = serve(nats_server.url, tmp_path, run_id)
    try:
        _, err = out.communicate(timeout=120)  # it used to wait, silently, for ever
    finally:
        out.kill()
    assert out.returncode == 2
    assert err.splitlines() == [
        f"trainbus serve: run {run_id} completed at step 40 and the audit gate approved none of its checkpoints "
        f"(step 20 rejected, step 40 rejected); serve one anyway with --step S --force, "
        f"e.g. trainbus serve --run {run_id} --step 40 --force"
    ]


def test_for_a_live_run_it_says_what_it_waits_for(nats_server: RunningServer, nc: Any, tmp_path: Path) -> None:
    run_id = f"served-live-{time.monotonic_ns()}"
    trainer, first = started(run_id)
    publish(nats_server.url, [first, trainer.emit(TrainStep, step=7, epoch=0.1, loss=1.0, learning_rate=1e-3)])
    server = serve(nats_server.url, tmp_path, run_id)
    try:
        assert server.stdout is not None
        lines = [server.stdout.readline()]
        if "checkpoint bucket" in lines[0]:  # the session's bus may have no audit gate's bucket yet
            lines.append(server.stdout.readline())
        assert lines[-1].strip() == (
            f"trainbus serve: waiting for the audit gate to approve a checkpoint of run {run_id} "
            "(training, at step 7; no checkpoint yet); serving starts with the first approved one"
        ), lines
        assert server.poll() is None  # it goes on waiting
    finally:
        server.terminate()
        server.wait(30)


def serve(url: str, tmp: Path, run_id: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--run", run_id, "--set", f"state_dir={tmp}"],
        cwd=tmp, env={**env, "NATS_URL": url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
