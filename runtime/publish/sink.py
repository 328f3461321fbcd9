"""``PublisherSink``: a training process's event sink; the bus connection runs in its publisher process.

The training process pays for an event with building it, one ``write`` to the journal (the run's
outbox file, see ``runtime.publish.journal``) and, for an event that goes at once or when the
publisher process is idle, one byte on a wake pipe (``runtime.publish.window``); it runs no bus
thread and leaves Python's GIL switch interval alone. The publisher process
(``runtime.publish.process``, started as ``argv``) owns the NATS connection, publishes the journal in
order, answers the run's control subject and hands accepted commands back on a pipe
(``producers.run.control_inbox.PipeLink``).

Nothing handed over is lost: an event is in the journal before ``publish`` returns, so a SIGKILL of
the training process leaves it for the publisher process to send (it sends what is left and exits
when the wake pipe closes), and a killed publisher process is started again (up to ``max_restarts``
times) and resumes from what JetStream acknowledged. Past that the run says once, loudly, that it no
longer publishes, and every later event still goes to the journal, which the next start or
``--resume`` sends. The publisher process's log lines are copied to this process's ``sys.stderr``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from runtime.bus.connect import BusTarget
from runtime.errors import BusUnavailable, ConfigError, TrainbusError
from runtime.logs import get_logger, status
from runtime.publish.journal import Journal, state_path
from runtime.publish.outbox import Outbox, Record, record_of
from runtime.publish.process import Spec
from runtime.publish.sinks import PublisherStats
from runtime.publish.window import NOW, SOON, may_wait
from runtime.settings import Settings
from schemas import Event

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in the fcntl module only from Python 3.12 on
CHECK_EVERY_S = 1.0
"""How often ``publish`` looks whether the publisher process is alive and copies its log lines (not every event: each costs syscalls)."""
START_GRACE_S = 60.0
"""Beyond the connect timeout, how long a starting publisher process may take (Python's start-up on a loaded machine)."""
WINDOW_S = 0.03
"""How long an event that may wait waits for others to go with it (``publish.window_ms``)."""


@contextmanager
def owned_server(target: BusTarget, owns: bool) -> Iterator[None]:
    """On the way out, stop the embedded server in ``target`` if the sink owns it (its store keeps the events)."""
    try:
        yield
    finally:
        if owns and target.server is not None:
            target.server.stop()


def _pipe(size: int = 1 << 20) -> tuple[int, int]:
    r, w = os.pipe()
    with contextlib.suppress(OSError):  # beyond /proc/sys/fs/pipe-max-size: the default 64 KiB
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    return r, w


def _pending(path: Path) -> int:
    """Events in the outbox at ``path`` not yet acknowledged."""
    if not path.exists():
        return 0
    outbox = Outbox(path)
    try:
        return len(outbox)
    finally:
        outbox.close()


class PublisherSink:
    """Event sink of a training process; see the module docstring."""

    def __init__(
        self,
        target: BusTarget,
        settings: Settings,
        *,
        outbox_path: Path,
        argv: Sequence[str],
        run_id: str,
        name: str = "trainbus-publisher",
        control: bool = True,
        batch_size: int = 1024,
        provision_stream: bool = True,
        offline_ok: bool = False,
        owns_server: bool = False,
        max_restarts: int = 3,
        window: float = WINDOW_S,
    ) -> None:
        self.target = target
        self.settings = settings
        self.outbox_path = outbox_path
        self.argv = list(argv)
        self.run_id = run_id
        self.name = name
        self.control = control
        self.batch_size = batch_size
        self.provision_stream = provision_stream
        self.offline_ok = offline_ok
        self.owns_server = owns_server
        self.max_restarts = max_restarts
        self.window = window
        self.stats = PublisherStats()
        self.failure: str | None = None
        self.restarts = 0
        self.log = get_logger(component="publisher")
        self.journal: Journal | None = None
        self.commands_fd = self.commands_w = self._wake_r = self._wake_w = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._backlog: list[Record] = []
        self._closing = False
        self._err = b""
        self._next_check = 0.0

    @property
    def counter(self) -> Journal:
        """The shared numbering (``runtime.publish.sinks.Counter``): the publisher process's replies take seqs from it too."""
        assert self.journal is not None, "start() first"
        return self.journal

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- starting --------------------------------------------------------------------------

    def start(self) -> PublisherSink:
        """Start the publisher process and wait until it is connected (or offline, with ``offline_ok``);
        raises ``BusUnavailable`` (or the process's own error) when its first connection fails."""
        Outbox(self.outbox_path).close()  # repairs a torn last line a kill left; no publisher process reads it yet
        self.journal = Journal(self.outbox_path, fresh=True)
        self._wake_r, self._wake_w = _pipe(1 << 16)
        os.set_blocking(self._wake_w, False)
        if self.control:
            self.commands_fd, self.commands_w = _pipe()
            os.set_blocking(self.commands_fd, False)
        self._spawn()
        try:
            self._wait_ready(self.settings.bus.connect_timeout + START_GRACE_S)
        except BaseException:
            self._discard()
            raise
        return self

    def _spawn(self) -> None:
        assert self.journal is not None
        spec = Spec(
            servers=self.target.servers, origin=self.target.origin, settings=self._settings(),
            state_dir=str(self.target.state_dir.resolve()) if self.target.state_dir else None,
            journal=str(self.outbox_path), run_id=self.run_id, name=self.name, wake_fd=self._wake_r,
            commands_fd=self.commands_w, parent_pid=os.getpid(), batch_size=self.batch_size, window=self.window,
            provision_stream=self.provision_stream, offline_ok=self.offline_ok or self.restarts > 0,
            log_level=self.settings.log.level, log_format=self._log_format(), restart=self.restarts,
        )  # fmt: skip
        fds = (self._wake_r, self.commands_w) if self.control else (self._wake_r,)
        # a session of its own: Ctrl-C (or a signal to the process group) stops training, which then
        # closes the wake pipe; the publisher process must live on to send what the trainer handed over
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds,
            start_new_session=True,
        )  # fmt: skip
        assert self._proc.stdin is not None and self._proc.stdout is not None and self._proc.stderr is not None
        self._proc.stdin.write(spec.model_dump_json().encode())
        self._proc.stdin.close()
        os.set_blocking(self._proc.stderr.fileno(), False)

    def _settings(self) -> dict[str, object]:
        # only what every process shares (a run config has more); bus.url is redacted in a dump,
        # which is why the publisher process connects to ``servers``
        return Settings.model_validate(self.settings.model_dump(include=set(Settings.model_fields))).model_dump(mode="json")  # fmt: skip

    def _log_format(self) -> str:
        fmt = self.settings.log.format
        return ("console" if sys.stderr.isatty() else "json") if fmt == "auto" else fmt

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        out = self._proc.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusUnavailable(f"the publisher process did not start within {timeout:.0f}s")
            ready, _, _ = select.select([out], [], [], min(left, 0.5))
            self._copy_logs()
            if ready:
                chunk = os.read(out, 1)
                if not chunk:
                    self._copy_logs(final=True)
                    raise TrainbusError(f"the publisher process exited with {self._proc.wait()} before it was ready")
                line += chunk
        word, _, rest = line.decode().strip().partition(" ")
        if word == "error":
            exit_code, _, message = rest.partition(" ")
            self._proc.wait()
            self._copy_logs(final=True)
            kind = {BusUnavailable.exit_code: BusUnavailable, ConfigError.exit_code: ConfigError}.get(int(exit_code), TrainbusError)  # fmt: skip
            raise kind(message)

    # ---- the training thread -----------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Append ``event`` to the journal and wake the publisher process if it must; never blocks on the network."""
        journal = self.journal
        record = record_of(event)
        if journal is None:  # not started, or closed: the outbox keeps it for the next start
            outbox = Outbox(self.outbox_path)
            outbox.append([record])
            outbox.close()
            return
        try:
            journal.append([*self._backlog, record] if self._backlog else [record])
            self._backlog = []
        except OSError as exc:  # a full disk: keep them, in order, and try again with the next event
            if not self._backlog:
                self.log.error("cannot write the outbox; events wait in memory", error=str(exc), path=str(self.outbox_path))  # fmt: skip
            self._backlog.append(record)
        if not may_wait(event) or self.window <= 0:
            self._wake(NOW)
        elif journal.idle:  # otherwise it looks at the journal by itself when its window ends
            journal.idle = False
            self._wake(SOON)
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY_S
            self._copy_logs()
            if self._proc is not None and self._proc.poll() is not None and not self._closing:
                self._died()

    def _wake(self, byte: bytes) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is waiting anyway; gone: seen in publish
            os.write(self._wake_w, byte)

    def _died(self) -> None:
        assert self._proc is not None
        code = self._proc.returncode
        self._copy_logs(final=True)
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if self.restarts < self.max_restarts:
            self.restarts += 1
            self.log.warning("publisher process ended; starting it again", how=how, restart=self.restarts)
            self._close_streams()
            self._spawn()  # not waited for: it connects in the background, offline if it must
            return
        self._proc = None
        if self.failure is None:
            self.failure = self.stats.failure = f"the publisher process ended ({how}) {self.restarts + 1} times"
            self.log.error(
                "this run no longer publishes: its events stay in the outbox, which the next start or --resume sends",
                reason=self.failure, outbox=str(self.outbox_path),
            )  # fmt: skip

    def _copy_logs(self, final: bool = False) -> None:
        """Copy the publisher process's complete log lines to this process's ``sys.stderr`` (pytest and notebooks swap it)."""
        stream: IO[bytes] | None = self._proc.stderr if self._proc is not None else None
        if stream is None:
            return
        with contextlib.suppress(OSError):
            while chunk := os.read(stream.fileno(), 1 << 16):
                self._err += chunk
        *lines, self._err = self._err.split(b"\n")
        if final and self._err:
            lines, self._err = [*lines, self._err], b""
        for line in lines:  # above the training progress bar, when there is one
            status.print_above(line.decode(errors="replace"))

    # ---- closing ---------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> PublisherStats:
        """Let the publisher process send what is pending for up to ``timeout`` s; the rest stays in the outbox.

        With ``owns_server`` the embedded server in ``target`` stops too, once the events are in its store.
        """
        with owned_server(self.target, self.owns_server):
            return self._close(timeout)

    def _close(self, timeout: float) -> PublisherStats:
        journal = self.journal
        if journal is None or self._closing:
            return self.stats
        self._closing = True
        if self._backlog:
            with contextlib.suppress(OSError):
                journal.append(self._backlog)
                self._backlog = []
        journal.close_timeout = timeout
        self._close_fd("_wake_w")  # end of file: the publisher process sends what is left and exits
        report = self._finish_process(timeout + 10)
        published = journal.published
        self._discard()
        for key, value in report.items():
            if hasattr(self.stats, key) and key != "failure":
                setattr(self.stats, key, value)
        self.stats.published = max(published, self.stats.published)
        if self.failure is not None:
            self.stats.failure = self.failure
            self.stats.outbox_pending = _pending(self.outbox_path)
        if self.stats.outbox_pending:
            self.log.warning("events left in the outbox", pending=self.stats.outbox_pending, path=str(self.outbox_path))  # fmt: skip
        return self.stats

    def _finish_process(self, timeout: float) -> dict[str, object]:
        """Wait for the publisher process to exit; its last stdout line is its ``PublisherStats``."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return {}
        deadline = time.monotonic() + timeout
        out = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout.fileno()], [], [], 0.2)
            self._copy_logs()
            if ready:
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                out += chunk
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.failure = self.failure or f"the publisher process did not finish within {timeout:.0f}s"
        self._copy_logs(final=True)
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                report: dict[str, object] = json.loads(line)
                return report
        if proc.returncode != 0:
            self.failure = self.failure or f"the publisher process ended with {proc.returncode} while closing"
        return {}

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        setattr(self, name, -1)  # a closed number can be reused at once: never close it twice
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_streams(self) -> None:
        if self._proc is not None:
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()

    def _discard(self) -> None:
        """Close this side's pipes and the journal; the state file goes with the attempt."""
        for name in ("_wake_r", "_wake_w", "commands_fd", "commands_w"):
            self._close_fd(name)
        self._close_streams()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
            state_path(self.outbox_path).unlink(missing_ok=True)
