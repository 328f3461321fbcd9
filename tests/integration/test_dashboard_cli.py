"""`trainbus dashboard` as a user runs it: where it serves, what it says, and that it cleans up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil

from runtime.bus.server import RunningServer
from tests.conftest import wait_until


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    return {**env, **extra}


def _dashboard(cwd: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "dashboard", *args],
        cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_it_serves_on_the_bus_of_nats_url_says_where_and_stops_on_sigterm(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    dash = _dashboard(tmp_path, "--port", "0", NATS_URL=nats_server.url)
    try:
        assert dash.stdout is not None
        first = dash.stdout.readline()
        assert first.startswith("trainbus dashboard: serving http://127.0.0.1:") and f"(bus {nats_server.url})" in first
        url = first.split("serving ")[1].split()[0]
        with urllib.request.urlopen(url + "/_stcore/health", timeout=30) as reply:
            assert reply.status == 200
        dash.send_signal(signal.SIGTERM)
        assert dash.wait(60) == 0
    finally:
        if dash.poll() is None:
            dash.kill()


def test_without_a_bus_it_starts_an_embedded_one_and_stops_it_with_itself(tmp_path: Path) -> None:
    dash = _dashboard(tmp_path, "--port", "0")
    try:
        assert dash.stdout is not None and "serving http://127.0.0.1:" in dash.stdout.readline()
        children = wait_until(lambda: psutil.Process(dash.pid).children(), what="the embedded nats-server")
        assert any("nats-server" in " ".join(c.cmdline()) for c in children)
        dash.send_signal(signal.SIGTERM)
        assert dash.wait(60) == 0
        assert dash.stderr is not None and "started an embedded nats-server" in dash.stderr.read()
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if dash.poll() is None:
            dash.kill()


def test_a_taken_port_or_a_bad_credentials_file_is_one_line_and_exit_2(
    nats_server: RunningServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _dashboard(tmp_path, "--port", str(port), NATS_URL=nats_server.url)
        out, err = busy.communicate(timeout=60)
    assert busy.returncode == 2 and err.strip() == f"trainbus dashboard: --port {port}: address already in use"
    creds = _dashboard(tmp_path, "--port", "0", NATS_URL=nats_server.url, NATS_CREDS=str(tmp_path / "missing.creds"))
    out, err = creds.communicate(timeout=60)
    assert creds.returncode == 2 and err.strip().endswith("missing.creds is not a readable file") and not out
    assert "Traceback" not in err
