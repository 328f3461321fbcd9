"""End-to-end helpers: real `trainbus` processes against the session's real nats-server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from runtime.natsserver import RunningServer
from runtime.stream import replay
from schemas import Event, run_events

REPO = Path(__file__).resolve().parents[2]


def trainbus_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    env.update({"NATS_URL": url, **extra})
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


def ctl(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "ctl", *args],
        cwd=REPO, env=trainbus_env(url), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def events_of(url: str, run_id: str) -> list[Event]:
    """Every stored event of ``run_id``, in stream order."""

    async def read() -> list[Event]:
        nc = NATS()
        await nc.connect(url)
        try:
            return [d.event async for d in replay(nc.jetstream(), run_events(run_id)) if d.event is not None]
        except nats.js.errors.NotFoundError:
            return []  # no stream yet: nothing was published
        finally:
            await nc.close()

    return asyncio.run(read())


def wait_events(url: str, run_id: str, until: Callable[[list[Event]], Any], timeout: float = 60) -> list[Event]:
    """Poll the stream until ``until(events)`` is truthy; fail with what was seen."""
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    while time.monotonic() < deadline:
        events = events_of(url, run_id)
        if until(events):
            return events
        time.sleep(0.2)
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


@pytest.fixture(scope="session")
def default_run(nats_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The tiny default config trained once, to the end, on the live bus; many tests read it."""
    tmp = tmp_path_factory.mktemp("default-run")
    trainer = start_trainer(nats_server.url, "configs/tiny.yaml", "default-run", tmp)
    try:
        code = trainer.wait(timeout=300)
    finally:
        if trainer.process.poll() is None:
            trainer.process.kill()
    yield {
        "run_id": trainer.run_id,
        "code": code,
        "output": trainer.output(),
        "events": events_of(nats_server.url, trainer.run_id),
        "run_dir": tmp / "runs" / trainer.run_id,
        "url": nats_server.url,
    }
