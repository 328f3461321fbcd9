"""configs/nats/roles.conf enforced by a real nats-server: who may publish what."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS

from runtime.bus import BusTarget, Credentials, connect
from runtime.errors import BusUnavailable
from runtime.natsserver import RunningServer
from runtime.settings import BusSettings, Settings
from runtime.stream import ensure_stream


async def login(server: RunningServer, user: str, password: str, errors: list[str] | None = None) -> NATS:
    settings = Settings(bus=BusSettings(url=server.url, connect_timeout=2))
    nc = await connect(
        BusTarget([server.url], "test"),
        settings,
        name=f"test-{user}",
        credentials=Credentials(user=user, password=password),
    )
    if errors is not None:
        previous = nc._error_cb  # record asynchronous permission errors the server sends

        async def record(err: Exception) -> None:
            errors.append(str(err))
            await previous(err)

        nc._error_cb = record
    return nc


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    """True as soon as ``check()`` is; the server's -ERR is delivered asynchronously."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def received(listener: NATS, subject: str, publish: NATS, payload: bytes) -> bool:
    """Whether a message ``publish`` sends on ``subject`` reaches ``listener`` (allowed ones take ms)."""
    sub = await listener.subscribe(subject)
    await listener.flush()
    await publish.publish(subject, payload)
    await publish.flush()
    try:
        await sub.next_msg(timeout=0.5)
        return True
    except (TimeoutError, nats.errors.TimeoutError):
        return False
    finally:
        await sub.unsubscribe()


async def test_viewer_cannot_send_control_commands_operator_can(
    secured_server: RunningServer, role_passwords: dict[str, str]
) -> None:
    admin = await login(secured_server, "admin", role_passwords["admin"])
    errors: list[str] = []
    viewer = await login(secured_server, "viewer", role_passwords["viewer"], errors)
    operator = await login(secured_server, "operator", role_passwords["operator"])
    command = json.dumps({"type": "pause", "command_id": "c1", "run_id": "r1", "issued_by": "x"}).encode()
    assert not await received(admin, "trainbus.control.r1", viewer, command)
    assert await eventually(
        lambda: any("permissions violation" in e.lower() and "trainbus.control.r1" in e for e in errors)
    )
    assert await received(admin, "trainbus.control.r1", operator, command)
    for conn in (admin, viewer, operator):
        await conn.close()


async def test_trainer_cannot_publish_audit_events(
    secured_server: RunningServer, role_passwords: dict[str, str]
) -> None:
    admin = await login(secured_server, "admin", role_passwords["admin"])
    await ensure_stream(admin.jetstream(), Settings().stream)
    errors: list[str] = []
    trainer = await login(secured_server, "trainer", role_passwords["trainer"], errors)
    auditor = await login(secured_server, "auditor", role_passwords["auditor"])
    assert not await received(admin, "trainbus.events.r1.audit.flag", trainer, b"{}")
    assert await eventually(lambda: any("trainbus.events.r1.audit.flag" in e for e in errors))
    assert await received(admin, "trainbus.events.r1.train.step", trainer, b"{}")
    assert await received(admin, "trainbus.events.r1.audit.flag", auditor, b"{}")
    ack = await trainer.jetstream().publish("trainbus.events.r1.train.step", b"{}", headers={"Nats-Msg-Id": "roles-1"})
    assert ack.stream == "TRAINBUS_EVENTS"  # the trainer's events are stored
    for conn in (admin, trainer, auditor):
        await conn.close()


async def test_wrong_password_fails_with_a_clear_error(
    secured_server: RunningServer, role_passwords: dict[str, str]
) -> None:
    with pytest.raises(BusUnavailable, match="authorization violation"):
        await login(secured_server, "operator", "wrong")


def test_cli_with_wrong_password_exits_3(secured_server: RunningServer, tmp_path: Path) -> None:
    env = {"NATS_URL": secured_server.url, "NATS_USER": "viewer", "NATS_PASSWORD": "nope", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "runs", "--set", "bus.connect_timeout=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 3
    assert "authorization violation" in out.stderr and "nope" not in out.stderr
