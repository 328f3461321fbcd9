"""Integration helpers: `trainbus exporter` subprocesses and raw publishes on the session's nats-server."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.bus.server import RunningServer
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Exporter:
    """A `trainbus exporter` subprocess and the URL it said it serves on."""

    proc: subprocess.Popen[str]
    url: str
    log: Path
    """Its stderr (JSON log lines)."""

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            return str(response.read().decode())

    def samples(self) -> Samples:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(self.text())
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def start_exporter(nats_server: RunningServer, tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    """Starts `trainbus exporter --port 0` subprocesses on the session server; all are stopped after."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Exporter:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        env["NATS_URL"] = nats_server.url
        log = tmp_path / f"exporter-{len(procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "exporter", "--port", "0", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the exporter printed no URL within 30 s"
        line = proc.stdout.readline()
        assert line.startswith("trainbus exporter: serving http://127.0.0.1:"), line
        exporter = Exporter(proc, line.split()[-1], log)
        wait_until(lambda: exporter.value("trainbus_exporter_caught_up") == 1, what="the exporter to replay the stream")
        return exporter

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def publish_raw(url: str, subject: str, data: bytes, msg_id: str) -> None:
    """Publish bytes straight to JetStream (a malformed event, or a resend with a new Nats-Msg-Id)."""

    async def go() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        await nc.close()

    asyncio.run(go())
