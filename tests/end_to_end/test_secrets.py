"""No password leaks: a secured run (configs/nats/roles.conf) where every process has every role's
password in its environment, and not one of them appears in any log line, run file, stored event
or metric.

Each process authenticates as its own role, each in one of the ways the README offers: the
trainer with the password in its bus URL (``TRAINBUS_BUS__URL``, a run-config key, so it would
be snapshotted if nothing redacted it), the audit gate with it in ``NATS_URL``, the exporter and
the operator's ``trainbus ctl`` with ``NATS_USER``/``NATS_PASSWORD``, and all at debug log level.
"""

from __future__ import annotations

import asyncio
import select
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from runtime.bus.server import RunningServer
from runtime.bus.stream import ensure_stream, replay
from runtime.settings import StreamSettings
from schemas import run_events
from schemas.subjects import CHECKPOINTS_BUCKET
from tests.conftest import wait_until
from tests.end_to_end.conftest import REPO, ctl, of_type, start_trainer, trainbus_env, wait_events

RUN = "secret-run"


def with_password(url: str, user: str, password: str) -> str:
    """``nats://host:port`` → ``nats://user:password@host:port``."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest}"


def role_env(url: str, passwords: dict[str, str], **extra: str) -> dict[str, str]:
    """Every role's password (as a server operator's shell would hold them), debug logs, ``extra``."""
    every = {f"TRAINBUS_{role.upper()}_PASSWORD": password for role, password in passwords.items()}
    return {**every, "TRAINBUS_LOG__LEVEL": "debug", **extra}


def leaks(blob: bytes, passwords: dict[str, str]) -> list[str]:
    """The roles whose password occurs in ``blob``."""
    return [role for role, password in passwords.items() if password.encode() in blob]


def stored_messages(url: str, admin: dict[str, str]) -> list[bytes]:
    """Every stored message of the run, raw, and every entry of the checkpoint bucket."""

    async def read() -> list[bytes]:
        nc = NATS()
        await nc.connect(url, **admin)
        try:
            js = nc.jetstream()
            blobs = [d.data async for d in replay(js, run_events(RUN))]
            kv = await js.key_value(CHECKPOINTS_BUCKET)
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            for key in keys:
                entry = await kv.get(key)
                blobs.append(key.encode() + b"=" + (entry.value or b""))
            return blobs
        finally:
            await nc.close()

    return asyncio.run(read())


def provision(url: str, admin: dict[str, str]) -> None:
    """What `trainbus up` does as admin: only the admin may create the events stream."""

    async def create() -> None:
        nc = NATS()
        await nc.connect(url, **admin)
        try:
            await ensure_stream(nc.jetstream(), StreamSettings())
        finally:
            await nc.close()

    asyncio.run(create())


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(20)


def test_no_password_appears_in_logs_files_events_or_metrics(
    secured_server: RunningServer,
    role_passwords: dict[str, str],
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
) -> None:
    url = secured_server.url
    admin = {"user": "admin", "password": role_passwords["admin"]}
    logs: dict[str, Path] = {}
    provision(url, admin)

    def service(name: str, *args: str, **env: str) -> subprocess.Popen[str]:
        logs[name] = tmp_path / f"{name}.stderr"
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", *args],
            cwd=REPO, env=trainbus_env(url, **role_env(url, role_passwords, **env)),
            stdout=subprocess.PIPE, stderr=logs[name].open("w"), text=True,
        )  # fmt: skip
        processes.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, f"{name} printed nothing within 60 s: {logs[name].read_text()[-2000:]}"
        return proc

    audit = service("audit", "audit", "--run", RUN, NATS_URL=with_password(url, "auditor", role_passwords["auditor"]))
    audit_first = audit.stdout.readline() if audit.stdout else ""
    assert audit_first.startswith("trainbus audit: watching"), audit_first
    exporter = service(
        "exporter", "exporter", "--port", "0", NATS_USER="viewer", NATS_PASSWORD=role_passwords["viewer"]
    )
    exporter_first = exporter.stdout.readline() if exporter.stdout else ""
    assert exporter_first.startswith("trainbus exporter: serving http://127.0.0.1:"), exporter_first
    metrics_url = exporter_first.split()[-1]

    trainer = start_trainer(
        url, "configs/tiny.yaml", RUN, tmp_path,
        "training.max_steps=100000", "training.logging_steps=1", "training.eval_steps=4", "training.save_steps=4",
        "data.max_eval_samples=16",
        **role_env(url, role_passwords, TRAINBUS_BUS__URL=with_password(url, "trainer", role_passwords["trainer"])),
    )  # fmt: skip
    try:
        wait_events(
            url, RUN,
            lambda ev: of_type(ev, "eval") and of_type(ev, "audit.verdict"),
            timeout=180, **admin,
        )  # fmt: skip
        operator = {"NATS_USER": "operator", "NATS_PASSWORD": role_passwords["operator"]}
        stopped = ctl(url, "stop", "--run", RUN, "--wait", **role_env(url, role_passwords, **operator))
        assert stopped.returncode == 0, stopped.stderr
        assert trainer.wait(120) == 0, trainer.output()[-2000:]
    finally:
        if trainer.process.poll() is None:
            trainer.process.kill()
    events = wait_events(
        url, RUN,
        lambda ev: len(of_type(ev, "audit.verdict")) >= len(of_type(ev, "checkpoint")) and of_type(ev, "run.finished"),
        **admin,
    )  # fmt: skip
    assert of_type(events, "run.finished")[0].status == "stopped"
    viewer = role_env(url, role_passwords, NATS_USER="viewer", NATS_PASSWORD=role_passwords["viewer"])
    listed = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "events", "--run", RUN, "--json"],
        cwd=REPO, env=trainbus_env(url, **viewer), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert listed.returncode == 0 and "run.finished" in listed.stdout, listed.stderr

    def scrape() -> str:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text: str = response.read().decode()
        return text if f'run_id="{RUN}"' in text and "trainbus_checkpoints" in text else ""

    metrics = wait_until(scrape, timeout=60, what="the run's checkpoints on /metrics")
    for proc in (audit, exporter):
        proc.terminate()
    outputs = {name: proc.communicate(timeout=60)[0] for name, proc in (("audit", audit), ("exporter", exporter))}

    searched: dict[str, bytes] = {
        "trainer output": trainer.output().encode(),
        "ctl stop": (stopped.stdout + stopped.stderr).encode(),
        "trainbus events": (listed.stdout + listed.stderr).encode(),
        "/metrics": metrics.encode(),
        "nats-server log": secured_server.log_path.read_bytes(),
    }
    for name, out in outputs.items():
        searched[f"{name} stdout"] = (audit_first if name == "audit" else exporter_first).encode() + out.encode()
        searched[f"{name} stderr"] = logs[name].read_bytes()
    run_dir = tmp_path / "runs" / RUN
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert (run_dir / "trainbus-run.json") in files and any(p.name == "adapter_model.safetensors" for p in files)
    searched.update({str(p.relative_to(tmp_path)): p.read_bytes() for p in files})
    stored = stored_messages(url, admin)
    assert len(stored) >= len(events)  # the events and the audit gate's checkpoint entries
    searched.update({f"stored message {i}": blob for i, blob in enumerate(stored)})

    found = {where: roles for where, blob in searched.items() if (roles := leaks(blob, role_passwords))}
    assert found == {}, f"passwords found in: {found}"
