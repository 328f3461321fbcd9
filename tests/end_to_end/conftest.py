"""End-to-end helpers: real `trainbus` processes against the session's real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from consumers.control_client import send_command
from runtime.bus.connect import round_trip
from runtime.bus.server import RunningServer
from runtime.bus.stream import replay
from schemas import Event, Pause, event_subject, run_events

REPO = Path(__file__).resolve().parents[2]


def trainbus_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    # one torch thread per trainer: on 2 cores shared with the bus, the consumers and the tests,
    # OpenMP threads spinning against other processes make steps many times slower
    env.update({"NATS_URL": url, "OMP_NUM_THREADS": "1", **extra})
    return env


def train_argv(config: str, run_id: str, tmp: Path, *overrides: str, resume: bool = False) -> list[str]:
    """`trainbus train` on ``config`` with data and output in ``tmp``."""
    argv = [sys.executable, "-m", "runtime.cli", "train", config]
    argv += ["--resume", run_id] if resume else ["--run-id", run_id]
    base = [
        f"training.output_dir={tmp / 'runs'}",
        f"data.train_file={tmp / 'data/train.jsonl'}",
        f"data.validation_file={tmp / 'data/validation.jsonl'}",
        f"data.test_file={tmp / 'data/test.jsonl'}",
    ]
    for item in [*base, *overrides]:
        argv += ["--set", item]
    return argv


def ctl(url: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "ctl", *args],
        cwd=REPO, env=trainbus_env(url, **env), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def events_of(url: str, run_id: str, **auth: str) -> list[Event]:
    """Every stored event of ``run_id``, in stream order (``user``/``password`` for a secured server)."""

    async def read() -> list[Event]:
        nc = NATS()
        await nc.connect(url.split(","), **auth)  # a cluster: comma-separated, as NATS_URL
        try:
            return [d.event async for d in replay(nc.jetstream(), run_events(run_id)) if d.event is not None]
        except nats.js.errors.NotFoundError:
            return []  # no stream yet: nothing was published
        finally:
            await nc.close()

    return asyncio.run(read())


def wait_events(
    url: str, run_id: str, until: Callable[[list[Event]], Any], timeout: float = 60, **auth: str
) -> list[Event]:
    """Poll the stream until ``until(events)`` is truthy; fail with what was seen. Each poll replays
    the run, so the pause between polls grows from 0.2 s to 1 s."""
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    pause = 0.2
    while time.monotonic() < deadline:
        events = events_of(url, run_id, **auth)
        if until(events):
            return events
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)
    kinds = [e.type for e in events][-20:]
    raise AssertionError(f"timed out after {timeout}s waiting on run {run_id}; last events: {kinds}")


def of_type(events: list[Event], kind: str) -> list[Any]:
    return [e for e in events if e.type == kind]


@dataclass
class Trainer:
    """A `trainbus train` subprocess."""

    run_id: str
    process: subprocess.Popen[str]
    log: Path

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()


def start_trainer(
    url: str, config: str, run_id: str, tmp: Path, *overrides: str, resume: bool = False, **env: str
) -> Trainer:
    log = tmp / f"{run_id}-{time.monotonic_ns()}.log"
    handle = log.open("w")
    process = subprocess.Popen(
        train_argv(config, run_id, tmp, *overrides, resume=resume),
        cwd=REPO, env=trainbus_env(url, **env), stdout=handle, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return Trainer(run_id, process, log)


def pause_on(url: str, run_id: str, kind: str, step: int | None = None) -> threading.Thread:
    """Pause ``run_id`` the moment it publishes a ``kind`` event (at ``step``, if given): a `ctl`
    process would start too late, as the tiny model trains the remaining steps in seconds. The
    command lands at the next step boundary; join the thread to wait until the trainer took it.
    Returns once the server has the subscription, so the run may start."""
    listening = threading.Event()

    async def pause() -> None:
        nc = NATS()
        await nc.connect(url)
        seen = asyncio.get_running_loop().create_future()

        async def on_event(msg: Any) -> None:
            if (step is None or json.loads(msg.data).get("step") == step) and not seen.done():
                seen.set_result(None)

        await nc.subscribe(event_subject(run_id, kind), cb=on_event)
        await round_trip(nc)
        listening.set()
        await asyncio.wait_for(seen, 300)
        command = Pause(command_id=f"pause-{run_id}", run_id=run_id, issued_by="test", reason="hold it here")
        await send_command(nc, command, timeout=30)
        await nc.close()

    thread = threading.Thread(target=lambda: asyncio.run(pause()), daemon=True)
    thread.start()
    assert listening.wait(60), f"pause_on({run_id}, {kind}) never subscribed"
    return thread


def paused(events: list[Event]) -> bool:
    """Whether the run has announced that it is paused."""
    return any(e.type == "run.state" and e.state == "paused" for e in events)


@pytest.fixture(scope="session")
def default_run(nats_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The tiny default config trained once, to the end, on the live bus with the audit gate
    watching (the shipped configs/audit.yaml); many tests read what it left in the stream."""
    tmp = tmp_path_factory.mktemp("default-run")
    run_id = "default-run"
    audit = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "audit", "--run", run_id],
        cwd=REPO, env=trainbus_env(nats_server.url), stdout=subprocess.PIPE, stderr=(tmp / "audit.log").open("w"), text=True,
    )  # fmt: skip
    try:
        assert audit.stdout is not None
        watching = audit.stdout.readline()
        assert watching.startswith("trainbus audit: watching"), watching
        trainer = start_trainer(nats_server.url, "configs/tiny.yaml", run_id, tmp)
        try:
            code = trainer.wait(timeout=300)
        finally:
            if trainer.process.poll() is None:
                trainer.process.kill()
        events = wait_events(
            nats_server.url,
            run_id,
            lambda ev: len(of_type(ev, "audit.verdict")) >= len(of_type(ev, "checkpoint")),
            timeout=60,
        )
    finally:
        audit.terminate()
        audit.wait(20)
    yield {
        "run_id": run_id,
        "code": code,
        "output": trainer.output(),
        "events": events,
        "run_dir": tmp / "runs" / run_id,
        "data_dir": tmp / "data",
        "url": nats_server.url,
    }
