"""The inside of a training run's publisher process: its journal to JetStream, its requests answered.

``runtime.publish.sink.PublisherSink`` starts it with a ``Spec`` on stdin. It runs the ``Sender``
(``runtime.publish.sender``: connection, batches, backoff, dead letters, offline start) on its main
thread, with the journal as its outbox (``runtime.publish.journal``): the training process appends
events there, and wakes it through the pipe for what goes at once, or when it said it is idle; the
``Window`` (``runtime.publish.window``) decides when what waits goes. Requests on the
``responders`` subjects (the run's control channel) are answered here, so the training process
runs no bus thread at all.

It says ``ready`` on stdout once connected (or once offline with ``offline_ok``), or ``error CODE
MESSAGE`` and exits when the first connection fails. The wake pipe's end of file means the training
process closed the sink or died: it then sends what is left until the close timeout (from the shared
state), leaves the rest in the journal, prints its ``PublisherStats`` as one JSON line and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from runtime.bus.connect import BusTarget
from runtime.errors import TrainbusError
from runtime.logs import get_logger, setup_logging
from runtime.publish.journal import Journal, JournalOutbox
from runtime.publish.outbox import record_of
from runtime.publish.sender import Sender
from runtime.publish.sinks import PublisherStats
from runtime.publish.window import Window
from runtime.settings import Settings
from schemas import Event

Responders = dict[str, Callable[[bytes], bytes]]
Listeners = dict[str, Callable[[bytes], None]]


class Spec(BaseModel):
    """What a publisher process is told when it starts (on stdin: nothing of it shows in ``ps``)."""

    servers: list[str]
    origin: str
    state_dir: str | None = None
    """The folder whose ``bus.json`` named the servers: the process follows the bus when ``up`` moves it."""
    settings: dict[str, object]
    journal: str
    run_id: str
    name: str
    wake_fd: int
    commands_fd: int
    """Where accepted commands go to the training process; -1: no control channel."""
    parent_pid: int
    batch_size: int = 1024
    window: float = 0.0
    """Seconds an event that may wait waits for others (``runtime.publish.window``)."""
    provision_stream: bool = True
    offline_ok: bool = False
    log_level: str = "info"
    log_format: str = "json"
    restart: int = 0
    """How many publisher processes of this attempt ran before this one."""


def lock_path(journal: Path) -> Path:
    """The lock a publisher process holds on its journal for as long as it runs."""
    return journal.with_name(journal.name + ".publisher")


class JournalSink:
    """The process's own events (command replies) go into the journal like the trainer's, and go at once."""

    def __init__(self, journal: Journal, window: Window) -> None:
        self.journal = journal
        self.counter = journal
        self.window = window
        self.closing = False
        """The training process closed the sink or died: nothing would apply a command any more."""

    def publish(self, event: Event) -> None:
        self.journal.append([record_of(event)])
        self.window.ring()

    def close(self, timeout: float = 10.0) -> PublisherStats:
        return PublisherStats()


def serve(
    spec: Spec,
    journal: Journal,
    responders: Callable[[JournalSink], Responders],
    listeners: Callable[[Callable[[], bool]], Listeners] | None = None,
) -> int:
    """Run until the training process closes the wake pipe (or dies); returns the exit code.

    ``listeners`` are subjects the process only reads, given whether the connection is up now."""
    setup_logging(spec.log_level, spec.log_format)
    log = get_logger(component="publisher", pid=os.getpid())
    # one publisher process per journal at a time: the one of a killed attempt may still be sending
    # when `--resume` starts the next; this one waits for it (at most its close timeout) and lives
    # on with the lock until it exits
    lock = os.open(lock_path(Path(spec.journal)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    window = Window(spec.window, shared=journal)
    stats = PublisherStats()
    sink = JournalSink(journal, window)
    target = BusTarget(spec.servers, spec.origin, state_dir=Path(spec.state_dir) if spec.state_dir else None)
    sender = Sender(
        target, Settings.model_validate(spec.settings), window, stats, log,
        outbox=JournalOutbox(Path(spec.journal), journal), batch_size=spec.batch_size, name=spec.name,
        provision_stream=spec.provision_stream, responders=responders(sink), offline_ok=spec.offline_ok,
        on_ready=lambda: _say("ready"),
    )  # fmt: skip
    if listeners is not None:
        sender.listeners = listeners(lambda: sender.connected)
    if spec.restart:
        log.warning("publisher process restarted; sending the journal from where it was acknowledged", restarts=spec.restart)  # fmt: skip
    base = journal.published  # what earlier publisher processes of this attempt sent
    try:
        asyncio.run(_main(spec, sender, sink, lambda: setattr(journal, "published", base + stats.published)))
    except TrainbusError as exc:  # the first connection failed
        _say(f"error {exc.exit_code} {exc}")
        return exc.exit_code
    journal.published = stats.published = base + stats.published
    _say(json.dumps(stats.as_dict()))
    return 0


async def _main(spec: Spec, sender: Sender, sink: JournalSink, count: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    window = sender.window

    def on_wake() -> None:
        try:
            data = os.read(spec.wake_fd, 65536)
        except BlockingIOError:
            return
        count()
        if data:
            window.on_bytes(data)
            return
        loop.remove_reader(spec.wake_fd)  # every writer is gone: the training process closed the sink, or died
        _closing(sink)

    os.set_blocking(spec.wake_fd, False)
    loop.add_reader(spec.wake_fd, on_wake)
    watch = loop.create_task(_watch_parent(spec.parent_pid, sink))
    try:
        await sender.run()
    finally:
        watch.cancel()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(spec.wake_fd)


def _closing(sink: JournalSink) -> None:
    sink.closing = True
    sink.window.close(sink.journal.close_timeout or 10.0)


async def _watch_parent(pid: int, sink: JournalSink) -> None:
    """A training process killed while a forked child of it (a data loader worker) still holds the
    wake pipe: the end of file would wait for that child, so the parent is watched too."""
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    _closing(sink)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.write(line.replace("\n", " ") + "\n")
        sys.stdout.flush()
