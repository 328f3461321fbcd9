"""Shared fixtures: a real nats-server per test session, never a stand-in for the broker."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from runtime.bus.connect import BusTarget, connect
from runtime.bus.server import RunningServer, start_server
from runtime.bus.stream import ensure_stream
from runtime.settings import BusSettings, ServerSettings, Settings

REPO = Path(__file__).resolve().parents[1]
ROLE_NAMES = ("trainer", "auditor", "operator", "viewer", "predictor", "agent", "admin")


SHARED_RUN_FILES = ("tests/end_to_end/test_training.py", "tests/end_to_end/test_families.py")
"""The files that use the session's default run: one worker runs them all, so it trains once."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``make test`` runs on 2 workers a file each at a time (the files of ``SHARED_RUN_FILES`` as
    one), longest first: the default run, then end-to-end, integration and unit files, which fill
    the end."""

    def order(item: pytest.Item) -> int:
        if "default_run" in getattr(item, "fixturenames", ()):
            assert str(item.path.relative_to(REPO)) in SHARED_RUN_FILES, (
                f"{item.nodeid}: add its file to SHARED_RUN_FILES"
            )
            return 0
        return {"end_to_end": 1, "integration": 2}.get(item.path.parent.name, 3)

    items.sort(key=order)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, except that the files sharing the default run are one unit of work."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return SHARED_RUN_FILES[0] if file in SHARED_RUN_FILES else file

    return SharedRunScheduling(config, log)


@pytest.fixture(autouse=True)
def _no_ambient_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never talk to a bus named by the developer's environment."""
    for var in ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS", "NATS_NKEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A nats-server with JetStream on a free port, shared by the whole session."""
    server = start_server(ServerSettings(), tmp_path_factory.mktemp("nats"), lock=False)
    yield server
    server.stop()


@pytest.fixture
def settings(nats_server: RunningServer, tmp_path: Path) -> Settings:
    """Settings pointing at the session server, state in the test's tmp dir."""
    return Settings(state_dir=str(tmp_path / ".trainbus"), bus=BusSettings(url=nats_server.url, ack_timeout=2.0))


@pytest.fixture
def target(nats_server: RunningServer) -> BusTarget:
    return BusTarget([nats_server.url], "test")


@pytest.fixture
async def nc(target: BusTarget, settings: Settings) -> AsyncIterator[NATS]:
    """A connection to the session server with the events stream provisioned."""
    conn = await connect(target, settings, name="test")
    await ensure_stream(conn.jetstream(), settings.stream)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def role_passwords() -> dict[str, str]:
    return {name: "pw-" + secrets.token_hex(8) for name in ROLE_NAMES}  # letters: never read as a number


@pytest.fixture(scope="session")
def secured_server(tmp_path_factory: pytest.TempPathFactory, role_passwords: dict[str, str]) -> Iterator[RunningServer]:
    """A nats-server running configs/nats/roles.conf, passwords from its environment."""
    saved = {k: os.environ.get(k) for k in role_passwords}
    for name, password in role_passwords.items():
        os.environ[f"TRAINBUS_{name.upper()}_PASSWORD"] = password
    try:
        server = start_server(
            ServerSettings(config_file=str(REPO / "configs/nats/roles.conf")),
            tmp_path_factory.mktemp("nats-roles"),
            lock=False,
        )
    finally:
        for name in role_passwords:
            os.environ.pop(f"TRAINBUS_{name.upper()}_PASSWORD", None)
    del saved
    yield server
    server.stop()


def require_tool(tool: str) -> str:
    """The path of a Debian tool (e.g. promtool): a failure in CI (CI=true), skipped locally."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is required in CI: list its package in .ci/apt-packages")
        pytest.skip(f"{tool} not installed locally (apt-get install prometheus); CI=true makes this a failure")
    return path


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition", every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``.

    The pause between polls starts at ``every`` and grows to at most 0.5 s: a check that spawns a
    CLI or replays a stream must not keep a core busy while the suite shares two."""
    deadline = time.monotonic() + timeout
    pause = every
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(pause)
        pause = max(pause, min(pause * 1.5, 0.5))
