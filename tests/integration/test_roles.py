"""configs/nats/roles.conf enforced by a real nats-server: who may publish what."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from runtime.bus.connect import BusTarget, Credentials, connect, round_trip
from runtime.bus.server import RunningServer
from runtime.bus.stream import ensure_stream
from runtime.errors import BusUnavailable
from runtime.settings import BusSettings, Settings

TIMEOUT = 20.0
"""The suite's normal wait for something that should happen; never a verdict by itself."""


async def login(server: RunningServer, user: str, password: str, denials: list[str] | None = None) -> NATS:
    """Connect as ``user``; the server's permission errors for it are collected in ``denials``."""
    settings = Settings(bus=BusSettings(url=server.url, connect_timeout=2))
    return await connect(
        BusTarget([server.url], "test"),
        settings,
        name=f"test-{user}",
        credentials=Credentials(user=user, password=password),
        on_permission_error=denials.append if denials is not None else None,
    )


async def eventually(check: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """True as soon as ``check()`` is; the server's -ERR is delivered asynchronously."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def delivered(listener: NATS, subject: str, publisher: NATS, payload: bytes) -> bytes:
    """What ``listener`` receives when ``publisher`` sends ``payload`` on ``subject`` (an allowed publish)."""
    sub = await listener.subscribe(subject)
    await round_trip(listener)
    try:
        await publisher.publish(subject, payload)
        await publisher.flush()
        return bytes((await sub.next_msg(timeout=TIMEOUT)).data)
    finally:
        await sub.unsubscribe()


async def denied(listener: NATS, subject: str, publisher: NATS, payload: bytes, denials: list[str]) -> None:
    """``publisher`` may not send on ``subject``: the server says so, and ``listener`` gets nothing."""
    sub = await listener.subscribe(subject)
    await round_trip(listener)
    try:
        await publisher.publish(subject, payload)
        await publisher.flush()
        assert await eventually(lambda: any(subject in d for d in denials)), f"no permission error for {subject}"
        # the server refused the message before it sent the error: a round trip to the listener
        # now brings in anything it had forwarded
        await listener.flush()
        assert sub.pending_msgs == 0, f"{subject} was delivered although the server refused it"
    finally:
        await sub.unsubscribe()


async def test_viewer_cannot_send_control_commands_operator_can(
    secured_server: RunningServer, role_passwords: dict[str, str]
) -> None:
    admin = await login(secured_server, "admin", role_passwords["admin"])
    denials: list[str] = []
    viewer = await login(secured_server, "viewer", role_passwords["viewer"], denials)
    operator = await login(secured_server, "operator", role_passwords["operator"])
    command = json.dumps({"type": "pause", "command_id": "c1", "run_id": "r1", "issued_by": "x"}).encode()
    await denied(admin, "trainbus.control.r1", viewer, command, denials)
    assert all("permissions violation" in d.lower() for d in denials)
    assert await delivered(admin, "trainbus.control.r1", operator, command) == command
    for conn in (admin, viewer, operator):
        await conn.close()


async def test_trainer_cannot_publish_audit_events(
    secured_server: RunningServer, role_passwords: dict[str, str]
) -> None:
    admin = await login(secured_server, "admin", role_passwords["admin"])
    await ensure_stream(admin.jetstream(), Settings().stream)
    denials: list[str] = []
    trainer = await login(secured_server, "trainer", role_passwords["trainer"], denials)
    auditor = await login(secured_server, "auditor", role_passwords["auditor"])
    await denied(admin, "trainbus.events.r1.audit.flag", trainer, b"{}", denials)
    assert await delivered(admin, "trainbus.events.r1.train.step", trainer, b"{}") == b"{}"
    assert await delivered(admin, "trainbus.events.r1.audit.flag", auditor, b"{}") == b"{}"
    ack = await trainer.jetstream().publish("trainbus.events.r1.train.step", b"{}", headers={"Nats-Msg-Id": "roles-1"})
    assert ack.stream == "TRAINBUS_EVENTS"  # the trainer's events are stored
    for conn in (admin, trainer, auditor):
        await conn.close()


async def test_wrong_password_fails_with_a_clear_error(
    secured_server: RunningServer, role_passwords: dict[str, str]
) -> None:
    with pytest.raises(BusUnavailable, match=r"^authorization refused by the bus at .* for user 'operator': wrong"):
        await login(secured_server, "operator", "wrong")


def test_cli_with_wrong_password_exits_3(secured_server: RunningServer, tmp_path: Path) -> None:
    env = {"NATS_URL": secured_server.url, "NATS_USER": "viewer", "NATS_PASSWORD": "nope", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "runs", "--set", "bus.connect_timeout=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 3
    assert out.stderr.startswith("trainbus runs: authorization refused by the bus at ")
    assert "user 'viewer'" in out.stderr and "cannot reach" not in out.stderr and "nope" not in out.stderr
    assert len(out.stderr.splitlines()) == 1
