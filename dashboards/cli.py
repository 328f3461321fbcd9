"""`trainbus dashboard`: serve the Streamlit live dashboard against the bus.

    trainbus dashboard                          # http://127.0.0.1:8501, or the next free port
    trainbus dashboard --port 8600 --host 0.0.0.0

It finds the bus like every trainbus command (``NATS_URL``, the server `trainbus up` started
in this folder, else an embedded one for its lifetime) and runs Streamlit in this process,
headless and with usage statistics off. The first line it prints names the URL, once the
server answers there. `trainbus up` and `make demo` run it as a service (see ``service``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from runtime.bus.connect import Credentials, bus_target
from runtime.cli.args import add_settings_args, settings_from
from runtime.errors import ConfigError

DEFAULT_PORT = 8501
APP = Path(__file__).resolve().parent / "app" / "main.py"
"""The Streamlit entry script."""
_PORTS_TRIED = 20


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535; 0 picks a free one)")
    return port


def register_dashboard(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="serve the live dashboard in the browser (Streamlit)")
    p.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"port to serve on (default {DEFAULT_PORT}, else the next free one; 0: any free port)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for others)")
    add_settings_args(p)
    p.set_defaults(func=cmd_dashboard)


def service() -> list[str]:
    """The command `trainbus up` and `trainbus demo` run for the dashboard."""
    return [sys.executable, "-m", "runtime.cli", "dashboard"]


def _bindable(host: str, port: int) -> int | None:
    """``port`` (a free one for 0) if this host can listen on it now, else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return None
            raise ConfigError(f"--host {host}: cannot listen there: {exc.strerror or exc}") from None
        return int(sock.getsockname()[1])


def choose_port(host: str, wanted: int | None) -> int:
    """The port to serve on: ``wanted`` (0: any free one), or the first free from 8501."""
    if wanted is not None:
        port = _bindable(host, wanted)
        if port is None:
            raise ConfigError(f"--port {wanted}: address already in use")
        return port
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + _PORTS_TRIED):
        if (port := _bindable(host, candidate)) is not None:
            return port
    return _bindable(host, 0) or 0


def url_of(host: str, port: int) -> str:
    """The URL to open (an any-address bind is shown as 127.0.0.1)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
    return f"http://{shown}:{port}"


def streamlit_args(host: str, port: int) -> list[str]:
    """``streamlit run`` arguments: headless, no usage statistics, no file watching, no tracebacks,
    no forced garbage collection after every rerun."""
    options = {
        "server.port": str(port),
        "server.address": host,
        "server.headless": "true",
        "browser.gatherUsageStats": "false",
        "server.fileWatcherType": "none",
        "server.runOnSave": "false",
        "client.showErrorDetails": "none",
        "client.toolbarMode": "viewer",
        "logger.hideWelcomeMessage": "true",
        "global.developmentMode": "false",
        "logger.level": "warning",
        # A full gc.collect() after every run costs ~70 ms here, and the live parts rerun several
        # times a second; Python's own collector still runs (`trainbus bench dashboard` watches RSS).
        "runner.postScriptGC": "false",
    }
    flags = [item for key, value in options.items() for item in (f"--{key}", value)]
    return ["run", str(APP), *flags]


def _announce(url: str, bus: str, timeout: float = 300.0) -> None:
    """Print the URL once the server answers (the first line, which `trainbus demo` waits for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as reply:
            if reply.status == 200:
                print(f"trainbus dashboard: serving {url} (bus {bus})", flush=True)
                return
        time.sleep(0.1)


def cmd_dashboard(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    Credentials.from_env()  # a bad NATS_CREDS/NATS_NKEY is one line and exit 2 here, not an error page later
    port = choose_port(args.host, args.port)
    with bus_target(settings) as target:
        # the app (this process) reads the bus from NATS_URL, like every other trainbus process
        os.environ["NATS_URL"] = ",".join(target.servers)
        url = url_of(args.host, port)
        threading.Thread(target=_announce, args=(url, target.display), daemon=True).start()
        from streamlit.web import cli as streamlit_cli

        streamlit_cli.main.main(args=streamlit_args(args.host, port), prog_name="streamlit", standalone_mode=False)
    return 0
