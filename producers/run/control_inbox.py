"""The trainer's side of the control channel: validate and answer at once, apply at a step boundary.

``ControlChannel.handle`` runs where the run's bus connection is, for every request on
``trainbus.control.<run_id>``: it parses the command with the schema, decides ``accepted`` or
``rejected`` (with a reason code) against the state the run will be in once queued commands
are applied, records the reply by ``command_id`` (a repeated id gets the same reply, is
applied once and recorded once), and hands the command to the training thread, which takes it
at the next step boundary. Every first reply also goes into the event stream as a
``command.result``, before the command can be applied. When the run ends, ``close`` hands back
the commands accepted but never applied, so that each gets an outcome.

Where the two halves meet is a link: ``LocalLink`` when both are in one process (a run without a bus,
tests), ``PipeLink`` when the bus connection is the training run's publisher process
(``runtime.publish.process``): then the publisher process's channel decides and writes accepted
commands to a pipe, the training process's channel reads them, and the state both decide on
(step, paused or stopping, finished) is the journal's shared state, changed under the journal's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import termios
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from pydantic import ValidationError

from runtime.publish.journal import Journal
from schemas import Command, CommandReply, Stop, parse_command

_ALWAYS = {"save_checkpoint", "evaluate", "set", "stop"}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def _command_id(data: bytes) -> str | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    value = obj.get("command_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else None


class Link(Protocol):
    """Where a channel's decisions and the training thread meet (see the module docstring)."""

    step: int
    state: str
    finished: bool

    def locked(self) -> AbstractContextManager[object]: ...

    def room_for(self, command: Command) -> bool: ...

    def send(self, command: Command) -> None: ...

    def receive(self, timeout: float) -> list[Command]: ...


class LocalLink:
    """Both halves in one process: a queue under a condition variable."""

    def __init__(self) -> None:
        self.step = 0
        self.state = "running"
        self.finished = False
        self._queue: list[Command] = []
        self._cv = threading.Condition()

    def locked(self) -> AbstractContextManager[object]:
        return self._cv

    def room_for(self, command: Command) -> bool:
        return True

    def send(self, command: Command) -> None:
        with self._cv:
            self._queue.append(command)
            self._cv.notify_all()

    def receive(self, timeout: float) -> list[Command]:
        with self._cv:
            if not self._queue and timeout > 0 and not self.finished:
                self._cv.wait(timeout)
            out, self._queue = self._queue, []
            return out


class PipeLink:
    """The training process and its publisher process: commands on a pipe, the rest in the journal's shared state.

    The publisher process only writes (``write_fd``); the training process reads (``read_fd``) and writes the
    commands it issues itself (a SIGTERM's stop). A command is accepted only if the pipe has room for
    it, so a write never blocks while the journal lock is held. Each write also counts in the shared
    state, so the training thread's ``receive`` at a step boundary is one read of shared memory
    unless a command came.
    """

    def __init__(self, journal: Journal, *, read_fd: int | None = None, write_fd: int | None = None) -> None:
        self.journal = journal
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buffer = b""
        self._taken = journal.commands

    def locked(self) -> AbstractContextManager[object]:
        return self.journal.locked()

    @property
    def step(self) -> int:
        return self.journal.step

    @step.setter
    def step(self, step: int) -> None:
        self.journal.step = step

    @property
    def state(self) -> str:
        return self.journal.state

    @state.setter
    def state(self, name: str) -> None:
        self.journal.state = name

    @property
    def finished(self) -> bool:
        return self.journal.finished

    @finished.setter
    def finished(self, flag: bool) -> None:
        self.journal.finished = flag

    def room_for(self, command: Command) -> bool:
        if self.write_fd is None:
            return False
        waiting = bytearray(4)
        fcntl.ioctl(self.write_fd, termios.FIONREAD, waiting)
        capacity = fcntl.fcntl(self.write_fd, F_GETPIPE_SZ)
        return int.from_bytes(waiting, "little") + len(_line(command)) <= capacity

    def send(self, command: Command) -> None:
        assert self.write_fd is not None
        data = memoryview(_line(command))
        while data:
            data = data[os.write(self.write_fd, data) :]
        self.journal.commands += 1  # under the journal lock, as every decision

    def receive(self, timeout: float) -> list[Command]:
        if timeout <= 0 and self.journal.commands == self._taken:
            return []  # the usual step boundary: nothing came
        out = self._read()
        if not out and timeout > 0 and self.read_fd is not None:
            select.select([self.read_fd], [], [], timeout)
            out = self._read()
        return out

    def _read(self) -> list[Command]:
        if self.read_fd is None:
            return []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 1 << 16):
                self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        self._taken += len(lines)
        return [parse_command(line) for line in lines if line]


F_GETPIPE_SZ = 1032  # fcntl.F_GETPIPE_SZ, named in the fcntl module only from Python 3.12 on


def _line(command: Command) -> bytes:
    return command.model_dump_json().encode() + b"\n"


class ControlChannel:
    """Commands of one run, shared by whoever answers requests (``handle``) and the training thread."""

    def __init__(
        self,
        run_id: str,
        on_reply: Callable[[Command | None, CommandReply], None] | None = None,
        link: Link | None = None,
    ) -> None:
        self.run_id = run_id
        self.on_reply = on_reply
        self.link: Link = link or LocalLink()
        self._replies: OrderedDict[str, CommandReply] = OrderedDict()

    @property
    def step(self) -> int:
        return self.link.step

    @step.setter
    def step(self, step: int) -> None:
        self.link.step = step

    @property
    def state(self) -> str:
        """What the run will be once queued commands are applied."""
        return self.link.state

    @property
    def finished(self) -> bool:
        return self.link.finished

    def handle(self, data: bytes) -> bytes:
        """Answer one request: the JSON of a ``CommandReply``."""
        try:
            command = parse_command(data)
        except ValidationError as exc:
            reply = CommandReply(
                command_id=_command_id(data), status="rejected", code="invalid", message=_first_error(exc)
            )
            if self.on_reply is not None:
                self.on_reply(None, reply)
            return reply.model_dump_json().encode()
        return self.submit(command).model_dump_json().encode()

    def refuse(self, data: bytes, code: Any, message: str) -> bytes:
        """A ``rejected`` reply to a request, decided by the caller and recorded nowhere (no run to record it in)."""
        return (
            CommandReply(command_id=_command_id(data), status="rejected", code=code, message=message)
            .model_dump_json()
            .encode()
        )

    def submit(self, command: Command) -> CommandReply:
        """Decide on ``command`` (from a request, or from inside the process: a SIGTERM becomes ``stop``).

        A new reply is recorded while the decision's lock is held, so an ``accepted`` is in the
        stream before the training thread can take, apply and record the command. A repeated id
        gets the first reply again and is not recorded twice.
        """
        with self.link.locked():
            reply, new = self._decide(command)
            if new and self.on_reply is not None:
                self.on_reply(command, reply)
            return reply

    def _decide(self, command: Command) -> tuple[CommandReply, bool]:
        """The reply to ``command``, and whether it is new (False: the id was answered before)."""
        previous = self._replies.get(command.command_id)
        if previous is not None:
            return previous, False
        reply = self._check(command)
        if reply.status == "accepted" and not self.link.room_for(command):
            reply = CommandReply(
                command_id=command.command_id, status="rejected", code="not_applicable", step=self.step,
                message="the trainer has too many commands waiting for its next step boundary; send it again later",
            )  # fmt: skip
        self._replies[command.command_id] = reply
        while len(self._replies) > 10_000:
            self._replies.popitem(last=False)
        if reply.status == "accepted":
            self.link.send(command)
            self.link.state = {"pause": "paused", "resume": "running", "stop": "stopping"}.get(command.type, self.state)
        return reply, True

    def _check(self, command: Command) -> CommandReply:
        def reject(code: Any, message: str) -> CommandReply:
            return CommandReply(
                command_id=command.command_id, status="rejected", code=code, message=message, step=self.step
            )

        if command.run_id != self.run_id:
            return reject("wrong_run", f"this trainer runs {self.run_id!r}, not {command.run_id!r}")
        if self.finished or self.state == "stopping":
            return reject("finished", f"the run is {'finished' if self.finished else 'stopping'}")
        if command.type == "pause" and self.state == "paused":
            return reject("not_applicable", "the run is already paused")
        if command.type == "resume" and self.state != "paused":
            return reject("not_applicable", "the run is not paused")
        if command.type not in _ALWAYS | {"pause", "resume"}:
            return reject("invalid", f"unknown command {command.type}")
        return CommandReply(command_id=command.command_id, status="accepted", step=self.step)

    def take(self, timeout: float = 0.0) -> list[Command]:
        """Accepted commands not yet applied (training thread); waits up to ``timeout`` for one."""
        return self.link.receive(timeout)

    def arrive(self, step: int) -> list[Command]:
        """The training thread reached the boundary after ``step``: record it and take the accepted commands.

        One decision under the lock ``submit`` holds: a command whose ``accepted`` reply names the
        previous boundary is taken here, never one boundary later (its reply was decided either
        before this, and is in the link, or after, and names ``step``).
        """
        with self.link.locked():
            self.link.step = step
            return self.link.receive(0)

    def close(self) -> list[Command]:
        """The run ended: later commands are rejected as ``finished``; returns those accepted but never applied.

        Under the decision's lock: every command accepted before is in the link by then, and every later one sees
        ``finished``.
        """
        with self.link.locked():
            self.link.finished = True
            return self.link.receive(0)


def result_fields(command: Command | None, reply: CommandReply) -> dict[str, Any]:
    """The fields of the ``command.result`` event that records ``reply``."""
    return {
        "command_id": reply.command_id or "unknown",
        "command": command.type if command is not None else "unknown",
        "status": reply.status,
        "code": reply.code,
        "message": reply.message,
        "issued_by": command.issued_by if command is not None else "",
        "step": reply.step,
    }


def internal_stop(run_id: str, reason: str, command_id: str) -> Stop:
    """A ``stop`` (with save) the trainer issues itself, e.g. on SIGTERM."""
    return Stop(command_id=command_id, run_id=run_id, issued_by="trainbus", reason=reason, save=True)
